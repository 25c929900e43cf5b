"""Export a trace as Chrome trace-event JSON, which ui.perfetto.dev (and chrome://tracing) open.

Layout (pids and tids are fixed so that two exports line up):
    pid 1  "<label>: KV pool <size> (<blocks/pages/rows>) and engine"  process-level counter tracks:
             KV memory        args used / internal / reservation / mapped_idle / cached_idle / free (bytes; they add
                              up to the capacity, so chrome://tracing's stacked view is the memory stack)
             KV totals        args reserved / used / logical / waste (bytes)
             device memory    args nvml / torch (bytes; only when sampled)
             throughput       args tokens_per_s / decode_tokens_per_s
             batch            args sequences / prefill_tokens / decode_tokens
             requests         args waiting (arrived, never admitted yet) / running (admitted, not finished;
                              preempted ones included)
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
simulated time instead (simulated runs only). Counters carry one sample per step; a run with more steps than
`max_counter_points` is sampled evenly (the step of the peak reserved bytes always kept). Step slices, driver calls,
request slices and evictions have caps as well, past which they are aggregated into counters or left out (the
file's otherData.aggregated says which). The file is written as a stream, never held in memory as one string.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvscope.events import Kind

PID_MAIN, PID_REQUESTS = 1, 2
TID_COUNTERS, TID_STEPS, TID_DRIVER, TID_EVENTS = 0, 1, 2, 3

MAX_COUNTER_POINTS = 200_000
MAX_STEP_SLICES = 200_000
MAX_DRIVER_SLICES = 100_000
MAX_REQUESTS = 50_000
MAX_INSTANTS = 50_000

_INSTANT_KINDS = {
    Kind.PREEMPT: "preempt",
    Kind.SWAP_OUT: "swap out",
    Kind.SWAP_IN: "swap in",
    Kind.OOM: "OOM",
    Kind.REJECT: "reject",
    Kind.BLOCK_EVICT: "evict",
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
        trace, clock, max_counter_points, max_step_slices, max_driver_slices, max_requests, max_instants
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
    """The trace-event dicts export_perfetto writes (for tests and notebooks; small traces)."""
    exporter = _Exporter(
        trace,
        options.get("clock", "host"),
        options.get("max_counter_points", MAX_COUNTER_POINTS),
        options.get("max_step_slices", MAX_STEP_SLICES),
        options.get("max_driver_slices", MAX_DRIVER_SLICES),
        options.get("max_requests", MAX_REQUESTS),
        options.get("max_instants", MAX_INSTANTS),
    )
    return list(exporter.events())


def _us(ns: float) -> float:
    return round(float(ns) / 1e3, 3)


def _clean(value: Any) -> Any:
    """JSON-safe scalars: numpy to Python, NaN to None."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    return value


class _Exporter:
    def __init__(
        self,
        trace,
        clock: str,
        max_counter_points: int,
        max_step_slices: int,
        max_driver_slices: int,
        max_requests: int,
        max_instants: int,
    ) -> None:
        from kvscope.analysis._events import is_simulated_clock

        if clock not in ("host", "sim"):
            raise ValueError(f"perfetto export: clock must be 'host' or 'sim', got {clock!r}")
        if clock == "sim" and not is_simulated_clock(trace):
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
        self._step_ts = self._step_times()

    # ---- time --------------------------------------------------------------------------------------------------
    def _step_times(self) -> pd.Series:
        """Timestamp (µs) of the end of every recorded step."""
        from kvscope.analysis._events import column, step_clock, step_cuts

        steps, cut = step_cuts(self.trace)
        if self.clock == "sim":
            clk = step_clock(self.trace).set_index("step")["t_s"]
            return (clk.reindex(steps) * 1e6).round(3).ffill().fillna(0.0)
        t_ns = column(self.trace, "t_ns")
        ts = t_ns[np.maximum(cut - 1, 0)] / 1e3 if len(cut) else np.zeros(0)
        return pd.Series(np.round(ts, 3), index=steps)

    def _ts_rows(self, t_ns: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Timestamps (µs) of event rows: their own host time, or their step's simulated time."""
        if self.clock == "host":
            return np.round(t_ns / 1e3, 3)
        st = self._step_ts
        first = float(st.iloc[0]) if len(st) else 0.0
        return st.reindex(steps).fillna(first).to_numpy()

    def _end_ts(self) -> float:
        from kvscope.analysis._events import column

        if self.clock == "sim":
            return float(self._step_ts.max()) if len(self._step_ts) else 0.0
        t = column(self.trace, "t_ns")
        return _us(t.max()) if len(t) else 0.0

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
        """'KV pool 16.0 GiB (1024 blocks of 16 tokens)' and the like, from the allocator's config."""
        from kvscope.analysis._events import acct_last, config_value
        from kvscope.units import format_bytes

        def cfg(key: str):
            return config_value(self.trace, key)

        capacity = acct_last(self.trace, Kind.ACCT_CAPACITY)
        name = f"KV pool {format_bytes(capacity)}" if capacity else "KV pool"
        alloc = self.trace.meta.get("allocator")
        if alloc == "paged" and cfg("num_blocks"):
            name += f" ({cfg('num_blocks')} blocks of {cfg('block_size')} tokens)"
        elif alloc == "vmm" and cfg("pages"):
            name += f" ({cfg('pages')} pages of {format_bytes(cfg('page_size'))})"
        elif alloc == "static" and cfg("rows"):
            name += f" ({cfg('rows')} token rows)"
        return name

    def _sample_rows(self, frame: pd.DataFrame, peak_col: str | None) -> pd.DataFrame:
        if len(frame) <= self.max_counter_points:
            return frame
        keep = np.unique(np.linspace(0, len(frame) - 1, self.max_counter_points - 1).round().astype(int))
        if peak_col is not None and peak_col in frame:
            keep = np.union1d(keep, [int(np.argmax(frame[peak_col].to_numpy()))])
        self.aggregated.append(f"counters sampled: {len(keep)} of {len(frame)} steps")
        return frame.iloc[keep]

    def _counter(self, name: str, ts: np.ndarray, columns: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
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
        from kvscope.analysis.memory import memory_timeline
        from kvscope.analysis.throughput import throughput_timeline

        mem = self._sample_rows(memory_timeline(self.trace), "reserved")
        if len(mem):
            ts = self._step_ts.reindex(mem["step"].to_numpy()).to_numpy()
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
            ts = self._step_ts.reindex(thr["step"].to_numpy()).to_numpy()
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
        occ = self._sample_rows(self._occupancy(), None)
        if len(occ):
            ts = self._step_ts.reindex(occ["step"].to_numpy()).to_numpy()
            yield from self._counter("requests", ts, {"waiting": occ["waiting"], "running": occ["running"]})

    def _occupancy(self) -> pd.DataFrame:
        """Sequences waiting (arrived, not admitted) and running (admitted, not finished) at the end of each step."""
        from kvscope.analysis.requests import request_lifetimes

        steps = self._step_ts.index.to_numpy()
        steps = steps[steps >= 0]
        lt = request_lifetimes(self.trace)
        if not len(steps) or lt.empty:
            return pd.DataFrame({"step": [], "waiting": [], "running": []})

        def count_by(step_col: np.ndarray) -> np.ndarray:
            s = step_col[step_col >= 0]
            return np.searchsorted(np.sort(s), steps, side="right")

        arrived = count_by(lt["arrive_step"].to_numpy())
        admitted = count_by(lt["admit_step"].to_numpy())
        ended = lt["finish_step"].to_numpy()
        done = count_by(ended)
        forks = lt["parent"].to_numpy() >= 0
        forked = count_by(np.where(forks, lt["admit_step"].to_numpy(), -1))
        return pd.DataFrame(
            {"step": steps, "waiting": np.maximum(arrived + forked - admitted, 0), "running": admitted - done}
        )

    def _step_slices(self) -> Iterator[dict[str, Any]]:
        from kvscope.analysis.throughput import throughput_timeline

        thr = throughput_timeline(self.trace)
        if thr.empty:
            return
        if len(thr) > self.max_step_slices:
            self.aggregated.append(f"step slices left out: {len(thr)} steps > {self.max_step_slices}")
            return
        end = self._step_ts.reindex(thr["step"].to_numpy()).to_numpy()
        if self.clock == "sim":
            dur = thr["dur_s"].to_numpy() * 1e6
        else:
            from kvscope.analysis._events import select

            st = select(self.trace, Kind.STEP).drop_duplicates("step", keep="last").set_index("step")
            dur = st["dur_ns"].reindex(thr["step"].to_numpy()).fillna(0).to_numpy() / 1e3
        for i, row in enumerate(thr.itertuples(index=False)):
            d = max(float(dur[i]), 0.0)
            yield {
                "name": f"step {row.step}",
                "cat": "step",
                "ph": "X",
                "ts": round(max(float(end[i]) - d, 0.0), 3),  # a clock skew must not put a slice before 0
                "dur": round(d, 3),
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
        from kvscope.analysis.driver import driver_calls

        calls = driver_calls(self.trace)
        if calls.empty:
            return
        if len(calls) > self.max_driver_slices:
            self.aggregated.append(f"driver calls as per-step counters: {len(calls)} calls > {self.max_driver_slices}")
            per = calls[calls["step"] >= 0].groupby("step").agg(ms=("dur_us", "sum"), calls=("dur_us", "size"))
            ts = self._step_ts.reindex(per.index.to_numpy()).to_numpy()
            yield from self._counter("VMM driver", ts, {"ms": per["ms"].to_numpy() / 1e3, "calls": per["calls"]})
            return
        ts_end = self._ts_rows(calls["t_s"].to_numpy() * 1e9, calls["step"].to_numpy())
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
        from kvscope.analysis._events import select

        rows = select(self.trace, *_INSTANT_KINDS)
        if rows.empty:
            return
        evict = rows["code"] == int(Kind.BLOCK_EVICT)
        if int(evict.sum()) > self.max_instants // 2:
            self.aggregated.append(f"evictions as a per-step counter: {int(evict.sum())} evictions")
            per = rows[evict & (rows["step"] >= 0)].groupby("step").size()
            ts = self._step_ts.reindex(per.index.to_numpy()).to_numpy()
            yield from self._counter("prefix-cache evictions", ts, {"blocks": per.to_numpy()})
            rows = rows[~evict]
        if len(rows) > self.max_instants:
            self.aggregated.append(f"instants left out: {len(rows) - self.max_instants} past {self.max_instants}")
            rows = rows.iloc[: self.max_instants]
        ts = self._ts_rows(rows["t_ns"].to_numpy(), rows["step"].to_numpy())
        for i, row in enumerate(rows.itertuples(index=False)):
            kind = Kind(int(row.code))
            args: dict[str, Any] = {"step": int(row.step)}
            if row.seq >= 0:
                args["seq"] = int(row.seq)
            if kind == Kind.PREEMPT:
                args["tokens"] = int(row.n)
                args["mode"] = "swap" if row.aux == 1 else "recompute"
            elif kind in (Kind.SWAP_OUT, Kind.SWAP_IN):
                args["blocks"] = int(row.n)
                args["bytes"] = int(row.bytes)
            elif kind in (Kind.OOM, Kind.REJECT):
                args["tokens"] = int(row.n)
                if kind == Kind.OOM:
                    args["bytes"] = int(row.bytes)
            elif kind == Kind.BLOCK_EVICT:
                args["block"] = int(row.block)
            yield {
                "name": _INSTANT_KINDS[kind],
                "cat": kind.name.lower(),
                "ph": "i",
                "s": "p",
                "ts": float(ts[i]),
                "pid": PID_MAIN,
                "tid": TID_EVENTS,
                "args": args,
            }

    def _requests(self) -> Iterator[dict[str, Any]]:
        from kvscope.analysis._events import select
        from kvscope.analysis.requests import request_lifetimes

        lt = request_lifetimes(self.trace)
        lt = lt[(lt["arrive_step"] >= 0) | (lt["admit_step"] >= 0)]
        if lt.empty:
            return
        if len(lt) > self.max_requests:
            self.aggregated.append(f"request slices: first {self.max_requests} of {len(lt)} sequences")
            lt = lt.sort_values("seq").iloc[: self.max_requests]
        end_ts = self._end_ts()
        if self.clock == "host":
            life = select(self.trace, Kind.ARRIVE, Kind.ADMIT, Kind.FORK, Kind.FINISH, Kind.REJECT)
            first = life.drop_duplicates(["code", "seq"], keep="first").set_index(["code", "seq"])["t_ns"] / 1e3

            def when(kind: Kind, seqs: np.ndarray) -> np.ndarray:
                idx = pd.MultiIndex.from_arrays([np.full(len(seqs), int(kind)), seqs])
                return first.reindex(idx).round(3).to_numpy()
        else:
            step_ts = self._step_ts

            def when(kind: Kind, seqs: np.ndarray) -> np.ndarray:
                col = {
                    Kind.ARRIVE: "arrive_step",
                    Kind.ADMIT: "admit_step",
                    Kind.FORK: "admit_step",
                    Kind.FINISH: "finish_step",
                    Kind.REJECT: "finish_step",
                }[kind]
                steps = lt[col].to_numpy()
                return np.where(steps >= 0, step_ts.reindex(steps).to_numpy(), np.nan)

        seqs = lt["seq"].to_numpy()
        arrive = when(Kind.ARRIVE, seqs)
        admit = when(Kind.ADMIT, seqs)
        fork = when(Kind.FORK, seqs)
        admit = np.where(np.isnan(admit), fork, admit)
        start = np.where(np.isnan(arrive), admit, arrive)
        finish = when(Kind.FINISH, seqs)
        reject = when(Kind.REJECT, seqs)
        end = np.where(np.isnan(finish), reject, finish)
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
