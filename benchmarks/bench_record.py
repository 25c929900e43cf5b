"""What recording costs (issue 13, item 1): one Recorder.emit amortised, and a simulated run with and without it.

    python benchmarks/bench_record.py --out benchmarks/results/record.json          # 10,000 ShareGPT-like requests
    python benchmarks/bench_record.py --requests 500 --events 200000 --out /tmp/r.json   # a smoke run

Three measurements, each in this process, CPU seconds from time.process_time:
  emit      `--events` APPEND rows emitted in a loop into a recorder that keeps them in memory (the flushes to
            Arrow batches included), per event: the recorder's one-event path, as allocators call it for
            everything but decode appends
  batched   the same rows through `emit_appends` in runs of 16 and of 256 (a decode step's appends between two
            block crossings with block size 16, and a whole batch), per event, the list appends that gather them
            included: the path the paged allocator's `append_decode` records a step's decode appends through
            (its block crossings' BLOCK_ALLOCs included)
  rows      BLOCK_FREE rows through `emit_rows` in groups of 20 (a release's frees, a step's samples), building
            the rows included
  run       `record_run` of `--requests` ShareGPT-like requests on --device sim (paged, the engine's defaults),
            writing its trace to a temporary file: the whole run's CPU time and its events (a digest record_run
            may write into the finished trace is held back and timed after the run, digest_cpu_s, not counted)
  no-trace  the same run with every emit discarded (a recorder whose emit paths do nothing): what the engine and
            the allocator cost without recording; run - no-trace is what recording the run costs
Targets from the issue: <= 150 ns an event amortised, and the run in <= 3 s of CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def time_emit(events: int) -> dict[str, Any]:
    from kvscope.events import Kind
    from kvscope.recorder import Recorder

    recorder = Recorder(None)
    recorder.step = 0
    emit, append = recorder.emit, Kind.APPEND
    t0 = time.process_time()
    for i in range(events):
        emit(append, seq=i & 1023, n=1, aux=i)
    recorder.flush()
    cpu = time.process_time() - t0
    return {"events": events, "cpu_s": round(cpu, 3), "ns_per_event": round(1e9 * cpu / events, 1)}


def time_emit_appends(events: int, run: int) -> dict[str, Any]:
    from kvscope.recorder import Recorder

    recorder = Recorder(None)
    recorder.step = 0
    emit_appends = recorder.emit_appends
    seqs: list[int] = []
    held: list[int] = []
    t0 = time.process_time()
    for i in range(events):
        seqs.append(i & 1023)
        held.append(i)
        if len(seqs) == run:
            emit_appends(seqs, held)
            seqs.clear()
            held.clear()
    emit_appends(seqs, held)
    recorder.flush()
    cpu = time.process_time() - t0
    assert recorder.events_written == events
    return {"events": events, "run": run, "cpu_s": round(cpu, 3), "ns_per_event": round(1e9 * cpu / events, 1)}


def time_emit_rows(events: int, run: int) -> dict[str, Any]:
    from kvscope.events import Kind
    from kvscope.recorder import Recorder

    recorder = Recorder(None)
    recorder.step = 0
    emit_rows = recorder.emit_rows
    kind = int(Kind.BLOCK_FREE)
    t0 = time.process_time()
    for i in range(0, events, run):
        rows: list[int] = []
        for j in range(i, min(i + run, events)):  # t_ns, step, kind, seq, block, n, bytes, addr, aux, dur_ns
            rows += (0, 0, kind, j & 1023, j, 0, 0, -1, 0, 0)
        emit_rows(rows)
    recorder.flush()
    cpu = time.process_time() - t0
    assert recorder.events_written == events
    return {"events": events, "run": run, "cpu_s": round(cpu, 3), "ns_per_event": round(1e9 * cpu / events, 1)}


def time_run(requests: int, *, record: bool) -> dict[str, Any]:
    from kvscope.engine import api
    from kvscope.engine.api import RunConfig, record_run
    from kvscope.recorder import Recorder
    from kvscope.workload_gen import resolve_workload

    def discard(*args: Any, **kwargs: Any) -> None:
        pass

    class Discarding(Recorder):
        """Every emit path discards. emit is replaced on the instance, not overridden in the class: callers that
        batch rows when the recorder's class has the base emit (kvscope.alloc.base._emit_samples, the engine's
        step rows, the paged allocator's frees) take the same path as on a real recorder."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.emit = self.emit_at = discard  # type: ignore[method-assign]

        def emit_appends(self, *args: Any, **kwargs: Any) -> None:
            pass

        def emit_rows(self, *args: Any, **kwargs: Any) -> None:
            pass

    class Timed(Recorder):
        """Counts the CPU time of flushes (building, checking, compressing and writing the batches): few calls,
        so timing them costs nothing measurable."""

        flush_cpu_s = 0.0

        def flush(self) -> None:
            t = time.process_time()
            super().flush()
            Timed.flush_cpu_s += time.process_time() - t

    reqs, desc = resolve_workload("sharegpt", requests=requests, seed=0)
    original = api.Recorder
    api.Recorder = Timed if record else Discarding  # type: ignore[misc]
    # record_run may write a digest of the finished trace into it (a read of the whole trace after the run): not
    # recording, so it is held back during the run and timed on its own afterwards
    write_digest = getattr(api, "_write_digest", None)
    digest_args: list[tuple[Any, ...]] = []
    if write_digest is not None:
        api._write_digest = lambda *args: digest_args.append(args)
    digest_cpu = 0.0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "run.kvtrace"
            t0, w0 = time.process_time(), time.perf_counter()
            result = record_run(reqs, RunConfig(allocator="paged", device="sim"), path=path, workload=desc)
            cpu, wall = time.process_time() - t0, time.perf_counter() - w0
            events = result.recorder.events_written
            if write_digest is not None:
                t = time.process_time()
                for args in digest_args:
                    write_digest(*args)
                digest_cpu = time.process_time() - t
            size = path.stat().st_size
    finally:
        api.Recorder = original  # type: ignore[misc]
        if write_digest is not None:
            api._write_digest = write_digest
    return {
        "requests": requests,
        "cpu_s": round(cpu, 2),
        "digest_cpu_s": round(digest_cpu, 2),
        "flush_cpu_s": round(Timed.flush_cpu_s, 2) if record else 0.0,
        "wall_s": round(wall, 2),
        "events": events,
        "trace_bytes": size,
        "steps": result.stats.steps,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--out", help="JSON results")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    emit = time_emit(args.events)
    print(f"emit: {emit['ns_per_event']:.0f} ns an event ({emit['events']:,} events, {emit['cpu_s']} CPU s)")
    batched = [time_emit_appends(args.events, run) for run in (16, 256)]
    for b in batched:
        print(f"emit_appends, runs of {b['run']}: {b['ns_per_event']:.0f} ns an event")
    rows = time_emit_rows(args.events, 20)
    print(f"emit_rows, rows of 20: {rows['ns_per_event']:.0f} ns an event")
    run = time_run(args.requests, record=True)
    print(
        f"run: {run['cpu_s']} CPU s, {run['events']:,} events, {run['trace_bytes'] / 2**20:.1f} MiB trace"
        f" (+ {run['digest_cpu_s']} CPU s writing its digest)"
    )
    bare = time_run(args.requests, record=False)
    share = (run["cpu_s"] - bare["cpu_s"]) / run["cpu_s"] if run["cpu_s"] else 0.0
    per_event = 1e9 * (run["cpu_s"] - bare["cpu_s"]) / max(run["events"], 1)
    print(
        f"no-trace: {bare['cpu_s']} CPU s; recording is {100 * share:.0f}% of the run, "
        f"{per_event:.0f} ns an event in the run, of which flushes (Arrow batches, checksums, zstd, writes) "
        f"{1e9 * run['flush_cpu_s'] / max(run['events'], 1):.0f} ns"
    )
    results = {
        "what": "Recorder.emit amortised and a simulated paged run with and without recording (issue 13 item 1)",
        "emit": emit,
        "emit_appends": batched,
        "emit_rows": rows,
        "run": run,
        "no_trace": bare,
        "recording_share_of_run": round(share, 3),
        "recording_ns_per_event_in_run": round(per_event, 1),
        "targets": {"ns_per_event": 150, "run_cpu_s": 3.0},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
