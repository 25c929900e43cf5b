"""Export a trace as Chrome trace-event JSON, which ui.perfetto.dev (and chrome://tracing) open.

A writer over kvscope.analysis: memory_timeline, throughput_timeline, request_occupancy, request_lifetimes,
request_timestamps, step_durations, driver_calls, incidents and pool_geometry give every number; this module only
stamps them on the chosen clock and shapes them into trace events, so the export shows what the report and the
dashboard show.

Layout (pids and tids are fixed so that two exports line up):
    pid 1  "<label>: KV pool <size> (<blocks/pages/rows>) and engine"  process-level counter tracks:
             KV memory        args used / internal / reservation / mapped_idle / cached_idle / free (bytes; they add
                              up to the capacity, so chrome://tracing's stacked view is the memory stack)
             KV totals        args reserved / used / logical / waste (bytes)
             device memory    args nvml / torch (bytes; only when sampled)
             throughput       args tokens_per_s / decode_tokens_per_s
             batch            args sequences / prefill_tokens / decode_tokens
             requests         args waiting / running (/ swapped, when any sequence was swapped out): sequences
                              in each phase during the step (kvscope.analysis.requests.request_occupancy)
             KV bandwidth     args achieved_tbps (only with kernel timings)
           tid 1 "engine steps": one complete ("X") slice per step
           tid 2 "VMM driver calls": one "X" slice per timed driver / OS call (aggregated past a cap)
           tid 3 "events": instants ("i") for preemptions, swaps, OOMs, rejections, prefix-cache evictions
    pid 2  "<label>: requests"  one async slice ("b"/"e", cat "request", id = seq, named by the request id) per
           sequence from its arrival (or fork) to its finish or rejection; args say when it was admitted, how long
           it waited, tokens, preemptions, prefix hits. Every "b" has its "e": sequences alive at the end of the
           trace close there, marked unfinished. (Perfetto keys async tracks by name and id, so waiting and running
           phases are not separate slices: the "requests" counter shows how many wait and run.)

Timestamps are microseconds: host time (t_ns / 1000) by default; `clock="sim"` puts every event at its step's
simulated time instead (simulated runs only). Counters carry one sample per step: counters of the state at the end of
a step (KV memory, KV totals, device memory) at the step's end, counters of what a step did (throughput, batch,
requests, KV bandwidth, per-step driver calls and evictions) at its start, so that each value holds while its step
runs, next to the step's slice; a run with more steps than
`max_counter_points` is sampled evenly (the step of the peak reserved bytes always kept). Step slices, driver calls,
request slices and evictions have caps as well, past which they are aggregated into counters or left out (the
file's otherData.aggregated says which). The file is written as a stream, never held in memory as one string.
"""

# This module is longer than 400 lines: one writer per track of the file layout in the docstring above; split apart,
# the layout would no longer be written and described in one place.

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.driver import driver_calls
from kvscope.analysis.memory import memory_timeline
from kvscope.analysis.pressure import incidents
from kvscope.analysis.replay import pool_geometry
from kvscope.analysis.requests import request_lifetimes, request_occupancy, request_timestamps
from kvscope.analysis.steps import CLOCKS, run_clock, run_end_s, step_durations
from kvscope.analysis.throughput import throughput_timeline
from kvscope.units import format_bytes

PID_MAIN, PID_REQUESTS = 1, 2
TID_COUNTERS, TID_STEPS, TID_DRIVER, TID_EVENTS = 0, 1, 2, 3

MAX_COUNTER_POINTS = 200_000
MAX_STEP_SLICES = 200_000
MAX_DRIVER_SLICES = 100_000
MAX_REQUESTS = 50_000
MAX_INSTANTS = 50_000

# Instants: the name each incident kind (kvscope.analysis.pressure) gets, and which of its columns become args.
_INSTANT_NAMES = {
    "preempt": "preempt",
    "swap_out": "swap out",
    "swap_in": "swap in",
    "oom": "OOM",
    "reject": "reject",
    "block_evict": "evict",
}
_INSTANT_ARGS = {
    "preempt": ("tokens", "mode"),
    "swap_out": ("blocks", "bytes"),
    "swap_in": ("blocks", "bytes"),
    "oom": ("tokens", "bytes"),
    "reject": ("tokens",),
    "block_evict": ("block",),
}


def export_perfetto(
    trace,
    path: str | os.PathLike,
    *,
    clock: str = "host",
    max_counter_points: int = MAX_COUNTER_POINTS,
    max_step_slices: int = MAX_STEP_SLICES,
    max_driver_slices: int = MAX_DRIVER_SLICES,
    max_requests: int = MAX_REQUESTS,
    max_instants: int = MAX_INSTANTS,
) -> dict[str, Any]:
    """Write `trace` to `path` as trace-event JSON; returns what was written ({'events': n, 'aggregated': [...]})."""
    exporter = _Exporter(
        trace,
        clock=clock,
        max_counter_points=max_counter_points,
        max_step_slices=max_step_slices,
        max_driver_slices=max_driver_slices,
        max_requests=max_requests,
        max_instants=max_instants,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"displayTimeUnit": "ms", "traceEvents": [\n')
        for i, event in enumerate(exporter.events()):
            if i:
                f.write(",\n")
            f.write(json.dumps(event, separators=(",", ":"), allow_nan=False))
            count += 1
        f.write("\n],\n")
        # otherData: the format's place for run metadata (string values; viewers show it as trace info).
        other = {
            k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in exporter.metadata(count).items()
        }
        f.write('"otherData": ' + json.dumps(other, allow_nan=False) + "}\n")
    return {"events": count, "aggregated": list(exporter.aggregated), "path": str(path)}


def trace_events(trace, **options: Any) -> list[dict[str, Any]]:
    """The trace-event dicts export_perfetto writes, given its keyword options (for tests and notebooks; small
    traces)."""
    return list(_Exporter(trace, **options).events())


def _clean(value: Any) -> Any:
    """JSON-safe scalars: numpy to Python, NaN to None."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    return value


class _Exporter:
    """A writer over kvscope.analysis: every number it writes comes from an analysis function; it only stamps them on
    the chosen clock and shapes them into trace events."""

    def __init__(
        self,
        trace,
        *,
        clock: str = "host",
        max_counter_points: int = MAX_COUNTER_POINTS,
        max_step_slices: int = MAX_STEP_SLICES,
        max_driver_slices: int = MAX_DRIVER_SLICES,
        max_requests: int = MAX_REQUESTS,
        max_instants: int = MAX_INSTANTS,
    ) -> None:
        if clock not in CLOCKS:
            raise ValueError(f"perfetto export: clock must be 'host' or 'sim', got {clock!r}")
        if clock == "sim" and run_clock(trace) != "sim":
            raise ValueError(
                f"perfetto export: {trace.name!r} has no simulated clock (not a sim run); use clock='host'"
            )
        for name, value in (
            ("max_counter_points", max_counter_points),
            ("max_step_slices", max_step_slices),
            ("max_driver_slices", max_driver_slices),
            ("max_requests", max_requests),
            ("max_instants", max_instants),
        ):
            if value < 1:
                raise ValueError(f"perfetto export: {name} must be at least 1, got {value}")
        self.trace = trace
        self.clock = clock
        self.max_counter_points = max_counter_points
        self.max_step_slices = max_step_slices
        self.max_driver_slices = max_driver_slices
        self.max_requests = max_requests
        self.max_instants = max_instants
        self.aggregated: list[str] = []
        self.label = str(trace.label)
        steps = step_durations(trace, clock).set_index("step")
        self._step_start = (steps["start_s"] * 1e6).round(3)  # µs, by step
        self._step_end = (steps["end_s"] * 1e6).round(3)

    # ---- time --------------------------------------------------------------------------------------------------
    def _ts_rows(self, t_s: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Timestamps (µs) of events: their own host time, or the end of their step on the simulated clock."""
        if self.clock == "host":
            return np.round(np.asarray(t_s, np.float64) * 1e6, 3)
        end = self._step_end
        first = float(end.iloc[0]) if len(end) else 0.0
        return end.reindex(steps).fillna(first).to_numpy()

    def _starts(self, steps: Any) -> np.ndarray:
        return self._step_start.reindex(np.asarray(steps)).to_numpy()

    def _ends(self, steps: Any) -> np.ndarray:
        return self._step_end.reindex(np.asarray(steps)).to_numpy()

    # ---- events ------------------------------------------------------------------------------------------------
    def events(self) -> Iterator[dict[str, Any]]:
        yield from self._metadata_events()
        yield from self._counters()
        yield from self._step_slices()
        yield from self._driver_slices()
        yield from self._instants()
        yield from self._requests()

    def _metadata_events(self) -> Iterator[dict[str, Any]]:
        def meta(name: str, pid: int, tid: int, value: Any) -> dict[str, Any]:
            key = "sort_index" if name.endswith("sort_index") else "name"
            return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": {key: value}}

        yield meta("process_name", PID_MAIN, 0, f"{self.label}: {self._pool_name()} and engine")
        yield meta("process_sort_index", PID_MAIN, 0, 1)
        yield meta("process_name", PID_REQUESTS, 0, f"{self.label}: requests")
        yield meta("process_sort_index", PID_REQUESTS, 0, 2)
        yield meta("thread_name", PID_MAIN, TID_STEPS, "engine steps")
        yield meta("thread_name", PID_MAIN, TID_DRIVER, "VMM driver calls")
        yield meta("thread_name", PID_MAIN, TID_EVENTS, "events (preemptions, OOM, evictions)")

    def _pool_name(self) -> str:
        """'KV pool 16.0 GiB (1024 blocks of 16 tokens)' and the like, from what the trace declares of its pool."""
        pool = pool_geometry(self.trace)
        name = f"KV pool {format_bytes(pool.capacity_bytes)}" if pool.capacity_bytes else "KV pool"
        if pool.units:
            name += {
                "blocks": f" ({pool.units} blocks of {pool.block_size} tokens)",
                "pages": f" ({pool.units} pages of {format_bytes(pool.page_size)})",
                "rows": f" ({pool.units} token rows)",
            }.get(pool.addressing or "", "")
        return name

    def _sample_rows(self, frame: pd.DataFrame, peak_col: str | None) -> pd.DataFrame:
        if len(frame) <= self.max_counter_points:
            return frame
        keep = np.unique(np.linspace(0, len(frame) - 1, self.max_counter_points - 1).round().astype(int))
        if peak_col is not None and peak_col in frame:
            keep = np.union1d(keep, [int(np.argmax(frame[peak_col].to_numpy()))])
        self.aggregated.append(f"counters sampled: {len(keep)} of {len(frame)} steps")
        return frame.iloc[keep]

    def _counter(self, name: str, ts: np.ndarray, columns: dict[str, Any]) -> Iterator[dict[str, Any]]:
        keys = list(columns)
        values = [np.asarray(columns[k]) for k in keys]
        for i, t in enumerate(ts.tolist()):
            args = {}
            for k, v in zip(keys, values, strict=True):
                x = _clean(v[i])
                if x is not None:
                    args[k] = x
            if args:
                yield {"name": name, "ph": "C", "ts": t, "pid": PID_MAIN, "tid": TID_COUNTERS, "args": args}

    def _counters(self) -> Iterator[dict[str, Any]]:
        mem = self._sample_rows(memory_timeline(self.trace), "reserved")
        if len(mem):
            ts = self._ends(mem["step"])
            bands = ["used", "internal", "reservation", "mapped_idle", "cached_idle", "free"]
            yield from self._counter("KV memory", ts, {b: mem[b].to_numpy() for b in bands})
            yield from self._counter(
                "KV totals", ts, {c: mem[c].to_numpy() for c in ("reserved", "used", "logical", "waste")}
            )
            if mem["nvml_bytes"].notna().any() or mem["torch_bytes"].notna().any():
                yield from self._counter(
                    "device memory", ts, {"nvml": mem["nvml_bytes"].to_numpy(), "torch": mem["torch_bytes"].to_numpy()}
                )
        thr = self._sample_rows(throughput_timeline(self.trace), None)
        if len(thr):
            ts = self._starts(thr["step"])
            yield from self._counter(
                "throughput",
                ts,
                {"tokens_per_s": thr["tokens_per_s"].to_numpy(), "decode_tokens_per_s": thr["decode_tokens_per_s"]},
            )
            yield from self._counter(
                "batch",
                ts,
                {
                    "sequences": thr["batch"].to_numpy(),
                    "prefill_tokens": thr["prefill_tokens"].to_numpy(),
                    "decode_tokens": thr["decode_tokens"].to_numpy(),
                },
            )
            if thr["achieved_tbps"].notna().any():
                yield from self._counter("KV bandwidth", ts, {"achieved_tbps": thr["achieved_tbps"].to_numpy()})
        occ = request_occupancy(self.trace)
        columns = ["waiting", "running", "swapped"] if (occ["swapped"] > 0).any() else ["waiting", "running"]
        occ = self._sample_rows(occ, None)
        if len(occ):
            yield from self._counter("requests", self._starts(occ["step"]), {c: occ[c].to_numpy() for c in columns})

    def _step_slices(self) -> Iterator[dict[str, Any]]:
        thr = throughput_timeline(self.trace)
        if thr.empty:
            return
        if len(thr) > self.max_step_slices:
            self.aggregated.append(f"step slices left out: {len(thr)} steps > {self.max_step_slices}")
            return
        start, end = self._starts(thr["step"]), self._ends(thr["step"])
        for i, row in enumerate(thr.itertuples(index=False)):
            yield {
                "name": f"step {row.step}",
                "cat": "step",
                "ph": "X",
                "ts": float(start[i]),
                "dur": round(max(float(end[i]) - float(start[i]), 0.0), 3),
                "pid": PID_MAIN,
                "tid": TID_STEPS,
                "args": {
                    "batch": int(row.batch),
                    "prefill_tokens": int(row.prefill_tokens),
                    "decode_tokens": int(row.decode_tokens),
                    "preemptions": int(row.preemptions),
                    "kernel_ms": _clean(row.kernel_ms),
                },
            }

    def _driver_slices(self) -> Iterator[dict[str, Any]]:
        calls = driver_calls(self.trace)
        if calls.empty:
            return
        if len(calls) > self.max_driver_slices:
            self.aggregated.append(f"driver calls as per-step counters: {len(calls)} calls > {self.max_driver_slices}")
            per = calls[calls["step"] >= 0].groupby("step").agg(ms=("dur_us", "sum"), calls=("dur_us", "size"))
            ts = self._starts(per.index)
            yield from self._counter("VMM driver", ts, {"ms": per["ms"].to_numpy() / 1e3, "calls": per["calls"]})
            return
        ts_end = self._ts_rows(calls["t_s"].to_numpy(), calls["step"].to_numpy())
        for i, row in enumerate(calls.itertuples(index=False)):
            d = float(row.dur_us)
            yield {
                "name": str(row.call),
                "cat": "driver",
                "ph": "X",
                "ts": round(max(float(ts_end[i]) - (d if self.clock == "host" else 0.0), 0.0), 3),
                "dur": round(d, 3),
                "pid": PID_MAIN,
                "tid": TID_DRIVER,
                "args": {"page": int(row.page), "bytes": int(row.bytes), "step": int(row.step)},
            }

    def _instants(self) -> Iterator[dict[str, Any]]:
        rows = incidents(self.trace)
        if rows.empty:
            return
        evict = rows["kind"] == "block_evict"
        if int(evict.sum()) > self.max_instants // 2:
            self.aggregated.append(f"evictions as a per-step counter: {int(evict.sum())} evictions")
            per = rows[evict & (rows["step"] >= 0)].groupby("step").size()
            yield from self._counter("prefix-cache evictions", self._starts(per.index), {"blocks": per.to_numpy()})
            rows = rows[~evict]
        if len(rows) > self.max_instants:
            self.aggregated.append(f"instants left out: {len(rows) - self.max_instants} past {self.max_instants}")
            rows = rows.iloc[: self.max_instants]
        ts = self._ts_rows(rows["t_s"].to_numpy(), rows["step"].to_numpy())
        for i, row in enumerate(rows.itertuples(index=False)):
            kind = str(row.kind)
            args: dict[str, Any] = {"step": int(row.step)}
            if row.seq >= 0:
                args["seq"] = int(row.seq)
            args.update({k: _clean(getattr(row, k)) for k in _INSTANT_ARGS[kind]})
            yield {
                "name": _INSTANT_NAMES[kind],
                "cat": kind,
                "ph": "i",
                "s": "p",
                "ts": float(ts[i]),
                "pid": PID_MAIN,
                "tid": TID_EVENTS,
                "args": args,
            }

    def _requests(self) -> Iterator[dict[str, Any]]:
        lt = request_lifetimes(self.trace)
        lt = lt[(lt["arrive_step"] >= 0) | (lt["admit_step"] >= 0)]
        if lt.empty:
            return
        if len(lt) > self.max_requests:
            self.aggregated.append(f"request slices: first {self.max_requests} of {len(lt)} sequences")
            lt = lt.sort_values("seq").iloc[: self.max_requests]
        end_ts = round(run_end_s(self.trace, self.clock) * 1e6, 3)
        times = request_timestamps(self.trace, self.clock).set_index("seq").reindex(lt["seq"])
        arrive, admit, end = ((times[c].to_numpy(np.float64) * 1e6).round(3) for c in ("arrive_s", "admit_s", "end_s"))
        start = np.where(np.isnan(arrive), admit, arrive)
        status = lt["status"].to_numpy()
        for i, row in enumerate(lt.itertuples(index=False)):
            s = float(start[i]) if np.isfinite(start[i]) else end_ts
            e = max(float(end[i]) if np.isfinite(end[i]) else end_ts, s)
            a = float(admit[i]) if np.isfinite(admit[i]) else None
            name = str(row.request_id) if row.parent < 0 else f"{row.request_id} sample (seq {row.seq})"
            common = {"name": name, "cat": "request", "id": int(row.seq), "pid": PID_REQUESTS, "tid": 0}
            args = {
                "seq": int(row.seq),
                "parent": int(row.parent),
                "prompt_len": int(row.prompt_len),
                "output_len": int(row.output_len),
                "generated": int(row.generated),
                "arrive_step": int(row.arrive_step),
                "admit_step": int(row.admit_step),
                "finish_step": int(row.finish_step),
                "waited_us": round(a - s, 3) if a is not None else None,
                "preemptions": int(row.preemptions),
                "prefix_hit_tokens": int(row.prefix_hit_tokens),
                "status": "unfinished" if status[i] in ("running", "waiting") else str(status[i]),
            }
            yield {"ph": "b", "ts": s, "args": args, **common}
            yield {"ph": "e", "ts": e, **common}

    def metadata(self, count: int) -> dict[str, Any]:
        meta = self.trace.meta
        return {
            "kvscope_trace": str(self.trace.path) if self.trace.path else None,
            "label": self.label,
            "allocator": meta.get("allocator"),
            "allocator_config": meta.get("allocator_config"),
            "device": meta.get("device"),
            "device_name": meta.get("device_name"),
            "model": meta.get("model"),
            "clock": self.clock,
            "events": count,
            "aggregated": list(self.aggregated),
        }
