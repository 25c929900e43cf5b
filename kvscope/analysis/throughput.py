"""Throughput per step: batch, tokens computed, step and kernel time, achieved KV bandwidth, driver time."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis._events import DRIVER_KINDS, cached, rows, select, step_clock, step_of_rows, values
from kvscope.events import Kind

THROUGHPUT_COLUMNS = [
    "step",
    "t_s",
    "dur_s",
    "batch",
    "prefill_tokens",
    "decode_tokens",
    "tokens",
    "tokens_per_s",
    "decode_tokens_per_s",
    "kernel_ms",
    "kv_bytes_read",
    "achieved_tbps",
    "preemptions",
    "driver_ms",
    "driver_calls",
    "attention_ms",
    "attention_tbps",
    "copy_ceiling_tbps",
]


def throughput_timeline(trace) -> pd.DataFrame:
    """One row per step with a STEP event: step, t_s (end of step, run clock), dur_s (step duration on the run
    clock: simulated on sim runs), batch (sequences in the batch), prefill_tokens / decode_tokens (computed this
    step; recomputation included), tokens (their sum), tokens_per_s (tokens / dur_s), decode_tokens_per_s,
    kernel_ms (GPU time of the forward pass; NaN when not measured), kv_bytes_read (KV bytes attention read; 0
    when not measured), achieved_tbps (kv_bytes_read / kernel time, in TB/s; NaN without kernel time),
    preemptions, driver_ms / driver_calls (timed VMM driver or OS calls recorded in the step), attention_ms (GPU
    time of the attention kernels alone, STEP_ATTENTION; NaN when not timed), attention_tbps (kv_bytes_read /
    attention time: the attention kernels' own bandwidth), copy_ceiling_tbps (the device-to-device copy bandwidth
    the run measured at its start, meta["warmup"]; NaN when not measured), the same on every row."""
    return cached(trace, "throughput_timeline", lambda: _build(trace)).copy()


def _per_step_sum(trace, kind: Kind, col: str, steps: pd.Index) -> np.ndarray:
    rows = select(trace, kind)
    if rows.empty:
        return np.zeros(len(steps), np.int64)
    return rows.groupby("step")[col].sum().reindex(steps).fillna(0).astype("int64").to_numpy()


def _build(trace) -> pd.DataFrame:
    st = select(trace, Kind.STEP)
    st = st[st["step"] >= 0].drop_duplicates("step", keep="last")
    if st.empty:
        frame = pd.DataFrame({c: pd.Series([], dtype="float64") for c in THROUGHPUT_COLUMNS})
        int_cols = ["step", "batch", "prefill_tokens", "decode_tokens", "tokens", "kv_bytes_read", "preemptions"]
        return frame.astype({c: "int64" for c in [*int_cols, "driver_calls"]})
    clock = step_clock(trace).set_index("step")
    steps = pd.Index(st["step"].astype("int64").to_numpy(), name="step")
    frame = pd.DataFrame({"step": steps.to_numpy()})
    frame["t_s"] = clock["t_s"].reindex(steps).to_numpy()
    frame["dur_s"] = clock["dur_s"].reindex(steps).to_numpy()
    frame["batch"] = st["n"].to_numpy(np.int64)
    frame["prefill_tokens"] = _per_step_sum(trace, Kind.STEP_PREFILL, "n", steps)
    frame["decode_tokens"] = _per_step_sum(trace, Kind.STEP_DECODE, "n", steps)
    frame["tokens"] = frame["prefill_tokens"] + frame["decode_tokens"]
    dur = frame["dur_s"].to_numpy(np.float64)
    ok = dur > 0
    safe = np.where(ok, dur, 1.0)
    frame["tokens_per_s"] = np.where(ok, frame["tokens"] / safe, np.nan)
    frame["decode_tokens_per_s"] = np.where(ok, frame["decode_tokens"] / safe, np.nan)

    kern = select(trace, Kind.STEP_KERNEL)
    if kern.empty:
        frame["kernel_ms"] = np.nan
        frame["kv_bytes_read"] = np.zeros(len(frame), np.int64)
    else:
        by = kern.groupby("step").agg(dur=("dur_ns", "sum"), read=("bytes", "sum")).reindex(steps)
        frame["kernel_ms"] = by["dur"].to_numpy(np.float64) / 1e6
        frame["kv_bytes_read"] = by["read"].fillna(0).astype("int64").to_numpy()
    kernel_s = frame["kernel_ms"].to_numpy(np.float64) / 1e3
    has = np.isfinite(kernel_s) & (kernel_s > 0)
    frame["achieved_tbps"] = np.where(has, frame["kv_bytes_read"] / np.where(has, kernel_s, 1.0) / 1e12, np.nan)
    frame["preemptions"] = _count_per_step(trace, Kind.PREEMPT, steps)
    attn = select(trace, Kind.STEP_ATTENTION)
    if attn.empty:
        frame["attention_ms"] = np.nan
    else:
        frame["attention_ms"] = attn.groupby("step")["dur_ns"].sum().reindex(steps).to_numpy(np.float64) / 1e6
    attn_s = frame["attention_ms"].to_numpy(np.float64) / 1e3
    ok_attn = np.isfinite(attn_s) & (attn_s > 0)
    frame["attention_tbps"] = np.where(ok_attn, frame["kv_bytes_read"] / np.where(ok_attn, attn_s, 1.0) / 1e12, np.nan)
    ceiling = (getattr(trace, "meta", None) or {}).get("warmup", {}).get("copy_ceiling_tbps")
    frame["copy_ceiling_tbps"] = float(ceiling) if ceiling else np.nan

    run = step_of_rows(trace, rows(trace, *DRIVER_KINDS))
    dur_ns = values(trace, "dur_ns", *DRIVER_KINDS)
    calls = pd.DataFrame({"step": run, "dur_ns": dur_ns})
    by = calls.groupby("step").agg(ms=("dur_ns", "sum"), calls=("dur_ns", "size")).reindex(steps)
    frame["driver_ms"] = by["ms"].fillna(0).to_numpy(np.float64) / 1e6
    frame["driver_calls"] = by["calls"].fillna(0).astype("int64").to_numpy()
    return frame[THROUGHPUT_COLUMNS]


def _count_per_step(trace, kind: Kind, steps: pd.Index) -> np.ndarray:
    rows = select(trace, kind)
    if rows.empty:
        return np.zeros(len(steps), np.int64)
    return rows.groupby("step").size().reindex(steps).fillna(0).astype("int64").to_numpy()
