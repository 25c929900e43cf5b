"""Recorder: events staged in memory before `open(path, meta)` reach the file first, under the completed metadata;
`update_meta` completes the metadata of an in-memory recorder."""

from __future__ import annotations

import pytest

from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.trace import TruncatedTraceWarning, load_trace, trace_from_recorder


def test_open_writes_staged_batches_first_under_the_completed_meta(tmp_path):
    rec = Recorder(None, {"allocator": "vmm"}, flush_events=2)
    for i in range(3):  # one full batch staged in memory, one event still buffered
        rec.emit(Kind.PAGE_CREATE, block=i, bytes=4096)
    rec.open(tmp_path / "run" / "t.kvtrace", {"allocator_config": {"page_size": 4096}})
    rec.emit(Kind.APPEND, seq=0, n=5, aux=5)
    rec.close(steps=1)
    trace = load_trace(tmp_path / "run" / "t.kvtrace")
    assert trace.meta["allocator"] == "vmm" and trace.meta["allocator_config"] == {"page_size": 4096}
    assert list(trace.events["kind"]) == ["page_create"] * 3 + ["append", "run_end"]
    assert list(trace.events["block"][:3]) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="already"):
        rec.update_meta({"model": "x"})


def test_open_twice_is_refused(tmp_path):
    rec = Recorder(tmp_path / "a.kvtrace")
    with pytest.raises(RuntimeError, match="already writes to"):
        rec.open(tmp_path / "b.kvtrace")
    rec.close()


def test_update_meta_of_an_in_memory_recorder_reaches_earlier_batches():
    rec = Recorder(None, {"allocator": "paged"}, flush_events=1)
    rec.emit(Kind.BLOCK_ALLOC, block=3, seq=0, addr=0, bytes=64)
    rec.update_meta({"model": "tiny"})
    rec.emit(Kind.APPEND, seq=0, n=1, aux=1)
    trace = trace_from_recorder(rec)
    assert trace.meta["allocator"] == "paged" and trace.meta["model"] == "tiny"
    assert list(trace.events["kind"]) == ["block_alloc", "append"]


def test_emit_usage_writes_one_sample_per_field_in_acct_fields_order():
    from kvscope.alloc.base import Usage, emit_usage
    from kvscope.events import ACCT_FIELDS

    usage = Usage(capacity=100, reserved=60, used=30, logical=45, internal=10, reservation=15, mapped_idle=5,
                  cached_idle=20, free=20)  # fmt: skip
    rec = Recorder(None)
    emit_usage(rec, usage)
    events = rec.to_table().to_pandas()
    assert list(events["kind"]) == [k.name.lower() for k in ACCT_FIELDS]
    assert list(events["bytes"]) == [getattr(usage, f) for f in ACCT_FIELDS.values()]


# ---- one emit is all or nothing ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "columns, error, match",
    [
        ({"bytes": 1 << 63}, OverflowError, "'bytes'"),
        ({"aux": -(1 << 63) - 1}, OverflowError, "'aux'"),
        ({"n": 1.5}, TypeError, "'n'"),
        ({"seq": "3"}, TypeError, "'seq'"),
    ],
)
def test_a_failed_emit_leaves_the_buffer_as_it_was_and_raises_the_real_error(tmp_path, columns, error, match):
    path = tmp_path / "t.kvtrace"
    rec = Recorder(path, flush_events=4)
    for i in range(3):
        rec.emit(Kind.APPEND, seq=i, n=1, aux=i)
    with pytest.raises(error, match=match):
        rec.emit(Kind.APPEND, **columns)
    for i in range(3, 10):  # the batches after the failure are still whole, and nothing was dropped
        rec.emit(Kind.APPEND, seq=i, n=1, aux=i)
    rec.close()
    ev = load_trace(path).events
    assert ev["seq"].tolist() == [*range(10), -1] and ev["kind"].iloc[-1] == "run_end"


def test_unknown_kinds_and_out_of_range_steps_are_refused_at_the_call():
    rec = Recorder(None, flush_events=2)
    rec.emit(Kind.APPEND, seq=1)
    for bad in (-1, 10_000):
        with pytest.raises(ValueError, match="unknown event kind"):
            rec.emit(bad)
        with pytest.raises(ValueError, match="unknown event kind"):
            rec.emit_at(5, bad)
    with pytest.raises(ValueError, match="int32"):
        rec.step = 1 << 31
    with pytest.raises(TypeError):
        rec.emit_at(5, Kind.MEM_NVML, byts=7)  # a misspelt column is an error, not silently dropped
    rec.emit(Kind.APPEND, seq=2)
    assert trace_from_recorder(rec).events["seq"].tolist() == [1, 2]


# ---- several threads ---------------------------------------------------------------------------------------------
def test_two_emitting_threads_and_a_flushing_one_lose_and_duplicate_nothing(tmp_path):
    import threading

    path = tmp_path / "threads.kvtrace"
    rec = Recorder(path, flush_events=7, flush_seconds=0.0)
    n = 10_000
    done = threading.Event()

    def emitter(seq: int) -> None:
        for i in range(n):
            rec.emit(Kind.APPEND, seq=seq, block=i, n=i, aux=i)

    def flusher() -> None:  # end_step and flush race the emitters' own flushes
        while not done.is_set():
            rec.end_step()
            rec.flush()

    threads = [threading.Thread(target=emitter, args=(s,)) for s in (1, 2)]
    side = threading.Thread(target=flusher)
    side.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    side.join()
    rec.close()
    ev = load_trace(path).events.iloc[:-1]
    assert len(ev) == 2 * n and rec.events_written == 2 * n + 1
    for seq in (1, 2):
        assert ev.loc[ev["seq"] == seq, "block"].tolist() == list(range(n))  # all there, once each, in order
    assert (ev["n"] == ev["block"]).all() and (ev["aux"] == ev["block"]).all()  # no torn rows
    assert ev["t_ns"].is_monotonic_increasing  # stamped under the lock: file order is emit order


# ---- Ctrl-C --------------------------------------------------------------------------------------------------------
def test_defer_sigint_holds_ctrl_c_until_the_block_is_done():
    import os
    import signal

    from kvscope.recorder import defer_sigint

    reached = []
    with pytest.raises(KeyboardInterrupt), defer_sigint():
        os.kill(os.getpid(), signal.SIGINT)
        with defer_sigint():  # nested: still held by the outer block
            os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the signals")
    assert reached == ["after the signals"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_inside_a_flush_still_writes_the_whole_batch(tmp_path, monkeypatch):
    import os
    import signal

    path = tmp_path / "t.kvtrace"
    rec = Recorder(path, flush_events=1000)
    for i in range(50):
        rec.emit(Kind.APPEND, seq=i)
    to_batch = rec._to_batch

    def interrupted(buf):  # the signal lands after the buffer was swapped out, before its batch is written
        os.kill(os.getpid(), signal.SIGINT)
        return to_batch(buf)

    monkeypatch.setattr(rec, "_to_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rec.flush()
    monkeypatch.undo()
    rec.abort()
    with pytest.warns(TruncatedTraceWarning):
        trace = load_trace(path)
    assert trace.events["seq"].tolist() == list(range(50))


def run_argv(out) -> list[str]:
    return ["run", "-w", "sharegpt", "-n", "3000", "-a", "paged", "-q", "-o", str(out)]


def reference_events(out, steps: int):
    """The same run in-process, stopped before step `steps` (sim is deterministic except for wall times)."""
    from kvscope.cli import build_parser
    from kvscope.commands.run import config_from_args
    from kvscope.engine import record_run
    from kvscope.workload_gen import resolve_workload

    args = build_parser().parse_args(run_argv(out))
    cfg = config_from_args(args)
    requests, description = resolve_workload(args.workload, requests=args.requests, seed=args.seed)

    def stop_at(engine) -> None:
        step = engine.step

        def limited() -> None:
            if engine.steps >= steps:
                raise KeyboardInterrupt
            step()

        engine.step = limited

    with pytest.raises(KeyboardInterrupt):
        record_run(requests, cfg, path=out, workload=description, setup=stop_at)
    with pytest.warns(TruncatedTraceWarning):
        return load_trace(out).events


@pytest.mark.parametrize("delay", [0.0, 0.3])
def test_ctrl_c_during_kvscope_run_keeps_every_event_up_to_the_interruption(tmp_path, delay):
    """SIGINT to a `kvscope run` that has written some steps: exit 130, one line on stderr, and the trace holds
    every event emitted before the interruption, the interrupted step's included, as the exact prefix of the
    same run's events."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "interrupted.kvtrace"
    cmd = [sys.executable, "-m", "kvscope.cli", *run_argv(out)]
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size > 100_000):  # a few batches of steps are on disk
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stdout == "" and len(stderr.strip().splitlines()) == 1 and "interrupted" in stderr, stderr
    with pytest.warns(TruncatedTraceWarning, match="without RUN_END"):
        trace = load_trace(out)
    got = trace.events
    steps = int(got["step"].max())
    assert steps > 0 and (got["kind"] == "step").sum() >= steps  # every step before the last is complete
    ref = reference_events(tmp_path / "reference.kvtrace", steps + 1)
    assert len(ref) >= len(got) and os.path.getsize(out) > 0
    same = [c for c in got.columns if c not in ("t_ns", "dur_ns")]  # wall-clock columns differ between runs
    assert got[same].equals(ref[same].iloc[: len(got)])
