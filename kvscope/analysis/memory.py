"""Memory timeline: the allocator's own books (ACCT_* samples) at the end of every step, the in-step peaks beside
them (ACCT_PEAK_* samples), and the waste breakdown.

The engine emits one ACCT_* sample per Usage field at the end of every step, after the step's releases, and one
ACCT_PEAK_* sample per quantity with the most it reached at any instant of the step (after any allocator operation):
a request that finishes in a step holds its memory during that step, so it counts in that step's peak. This pivots
both into one row per step. Identities that hold on every row's end-of-step values (kvscope.alloc.base.Usage):
capacity = reserved + cached_idle + free; reserved = used + internal + reservation + mapped_idle; waste = reserved -
used; logical >= used. Peak columns are maxima of each quantity on its own (they need not occur at one instant), and
peak waste counts only instants when some sequence holds tokens (retention after the last request is not waste).

Traces written before in-step peaks existed (format version 1) have no ACCT_PEAK_* samples: their peak columns fall
back to the end-of-step values, and `has_in_step_peaks` says so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached, count, select, step_clock
from kvscope.events import ACCT_FIELDS, PEAK_FIELDS, Kind

FIELDS: list[str] = list(ACCT_FIELDS.values())
PEAK_COLUMNS: list[str] = [f"peak_{name}" for name in PEAK_FIELDS.values()]
TIMELINE_COLUMNS: list[str] = [
    "step",
    "t_s",
    *FIELDS,
    "waste",
    "waste_frac",
    "block_usage_frac",
    "token_usage_frac",
    "sharing_saved",
    "nvml_bytes",
    "torch_bytes",
    *PEAK_COLUMNS,
]


def memory_timeline(trace) -> pd.DataFrame:
    """One row per step with ACCT samples: step, t_s, capacity, reserved, used, logical, internal, reservation,
    mapped_idle, cached_idle, free (bytes, int64), waste (= reserved - used), waste_frac (waste / reserved, 0 when
    nothing is reserved), block_usage_frac (reserved / capacity: vLLM's kv_cache_usage figure, which counts blocks
    and treats cached-idle blocks as free), token_usage_frac (used / capacity), sharing_saved (logical - used),
    nvml_bytes / torch_bytes (the last MEM_NVML / MEM_TORCH sample at or before the step's end; NaN if none),
    peak_reserved, peak_used, peak_logical, peak_waste, peak_internal, peak_reservation, peak_mapped_idle,
    peak_cached_idle (the most each reached during the step; see the module docstring).

    A field never sampled in a step carries the previous step's value (a sample lost to a cut-off trace)."""
    return cached(trace, "memory_timeline", lambda: _build(trace)).copy()


def _build(trace) -> pd.DataFrame:
    acct = select(trace, *ACCT_FIELDS, columns=["step", "bytes"])  # (only these: 9 samples a step)
    acct = acct[acct["step"] >= 0]
    if acct.empty:
        ints = ["step", *FIELDS, "waste", "sharing_saved", *PEAK_COLUMNS]
        frame = pd.DataFrame({c: pd.Series([], dtype="int64") for c in ints})
        for c in ["t_s", "waste_frac", "block_usage_frac", "token_usage_frac", "nvml_bytes", "torch_bytes"]:
            frame[c] = pd.Series([], dtype="float64")
        return frame[TIMELINE_COLUMNS]
    steps, wide = _last_per_step(acct)
    frame = pd.DataFrame({"step": steps, **dict(zip(FIELDS, wide, strict=True))})
    clock = step_clock(trace)[["step", "t_s", "wall_s"]]
    frame = frame.merge(clock, on="step", how="left")
    frame["waste"] = frame["reserved"] - frame["used"]
    reserved = frame["reserved"].to_numpy(dtype=np.float64)
    capacity = frame["capacity"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["waste_frac"] = np.where(reserved > 0, frame["waste"] / np.where(reserved > 0, reserved, 1), 0.0)
        frame["block_usage_frac"] = np.where(capacity > 0, reserved / np.where(capacity > 0, capacity, 1), 0.0)
        frame["token_usage_frac"] = np.where(capacity > 0, frame["used"] / np.where(capacity > 0, capacity, 1), 0.0)
    frame["sharing_saved"] = frame["logical"] - frame["used"]
    for kind, col in ((Kind.MEM_NVML, "nvml_bytes"), (Kind.MEM_TORCH, "torch_bytes")):
        frame[col] = _sample_at_step_end(trace, kind, frame)
    _add_peaks(trace, frame)
    return frame[TIMELINE_COLUMNS]


def has_in_step_peaks(trace) -> bool:
    """Whether the trace carries in-step peak samples (else peaks are the end-of-step values)."""
    return count(trace, Kind.ACCT_PEAK_USED) > 0


def _add_peaks(trace, frame: pd.DataFrame) -> None:
    """peak_* columns: the step's ACCT_PEAK_* samples, never below the step's own end-of-step value (a step
    without a peak sample, from an older or cut-off trace, takes its end-of-step value)."""
    live = frame["used"] > 0
    end_values = {name: frame[name] for name in ("reserved", "used", "logical", "cached_idle")}
    for name in ("waste", "internal", "reservation", "mapped_idle"):
        end_values[name] = frame[name].where(live, 0)  # waste counts while some sequence holds tokens
    samples = select(trace, *PEAK_FIELDS, columns=["step", "bytes"])
    samples = samples[samples["step"] >= 0]
    most = _max_per_step(samples, frame["step"].to_numpy(np.int64))
    for i, name in enumerate(PEAK_FIELDS.values()):
        end = end_values[name].to_numpy(dtype=np.int64)
        got = most[i]
        frame[f"peak_{name}"] = np.where(np.isnan(got), end, np.maximum(np.nan_to_num(got), end)).astype(np.int64)


def _field_of(codes: np.ndarray, fields: dict) -> np.ndarray:
    """Each sample's place in `fields` (a Kind -> name dict, in its order)."""
    table = np.full(int(max(int(k) for k in fields)) + 1, -1, np.int64)
    table[[int(k) for k in fields]] = np.arange(len(fields))
    return table[codes.astype(np.int64)]


def _last_per_step(acct: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the steps with samples, ascending; per field of ACCT_FIELDS, its last sample in each step, a field not
    sampled in a step carrying its previous value, 0 before its first sample): what a pivot table of the samples
    (last per step and field) forward-filled gives, in int64 throughout."""
    step = acct["step"].to_numpy(np.int64)
    steps, row = np.unique(step, return_inverse=True)
    nf = len(ACCT_FIELDS)
    key = row * nf + _field_of(acct["code"].to_numpy(), ACCT_FIELDS)
    order = np.argsort(key, kind="stable")  # row order within one (step, field): the last is the latest
    sorted_key = key[order]
    last = np.r_[sorted_key[1:] != sorted_key[:-1], True] if len(key) else np.zeros(0, bool)
    values = np.zeros(len(steps) * nf, np.int64)
    present = np.zeros(len(steps) * nf, bool)
    values[sorted_key[last]] = acct["bytes"].to_numpy(np.int64)[order[last]]
    present[sorted_key[last]] = True
    table, sampled = values.reshape(-1, nf), present.reshape(-1, nf)
    at = np.arange(len(steps))
    out = []
    for f in range(nf):
        src = np.maximum.accumulate(np.where(sampled[:, f], at, -1)) if len(at) else at  # the last sampled step
        out.append(np.where(src >= 0, table[np.maximum(src, 0), f], 0))
    return steps, out


def _max_per_step(samples: pd.DataFrame, steps: np.ndarray) -> list[np.ndarray]:
    """Per field of PEAK_FIELDS: the largest sample in each of `steps` (ascending, distinct), as float64, NaN where
    the step has none (a pivot table of the samples, max per step and field, on those steps)."""
    nf = len(PEAK_FIELDS)
    if samples.empty:
        return [np.full(len(steps), np.nan) for _ in range(nf)]
    step = samples["step"].to_numpy(np.int64)
    row = np.searchsorted(steps, step)
    ok = (row < len(steps)) & (steps[np.minimum(row, max(len(steps) - 1, 0))] == step) if len(steps) else row < 0
    key = (row * nf + _field_of(samples["code"].to_numpy(), PEAK_FIELDS))[ok]
    most = np.full(len(steps) * nf, np.iinfo(np.int64).min, np.int64)
    np.maximum.at(most, key, samples["bytes"].to_numpy(np.int64)[ok])
    present = np.zeros(len(steps) * nf, bool)
    present[key] = True
    got = np.where(present, most.astype(np.float64), np.nan).reshape(-1, nf)
    return [got[:, f] for f in range(nf)]


def _sample_at_step_end(trace, kind: Kind, frame: pd.DataFrame) -> np.ndarray:
    """The last sample of `kind` taken at or before each step's end (host time; samples come from a thread)."""
    samples = select(trace, kind)
    out = np.full(len(frame), np.nan)
    if samples.empty:
        return out
    t = samples["t_ns"].to_numpy() / 1e9
    order = np.argsort(t, kind="stable")
    t, values = t[order], samples["bytes"].to_numpy(dtype=np.float64)[order]
    pos = np.searchsorted(t, frame["wall_s"].to_numpy(), side="right") - 1
    ok = pos >= 0
    out[ok] = values[pos[ok]]
    return out


def waste_breakdown(trace) -> pd.DataFrame:
    """Long form of the waste split per step, for stacked-area figures: step, t_s, category, bytes, with categories
    used, internal, reservation, mapped_idle, cached_idle, free (their sum is the capacity)."""
    tl = memory_timeline(trace)
    cats = ["used", "internal", "reservation", "mapped_idle", "cached_idle", "free"]
    long = tl.melt(id_vars=["step", "t_s"], value_vars=cats, var_name="category", value_name="bytes")
    long["category"] = pd.Categorical(long["category"], categories=cats)
    return long.sort_values(["step", "category"], kind="stable").reset_index(drop=True)


def step_range(trace) -> tuple[int, int]:
    """(first, last) step with a memory sample; (0, 0) for a trace without any (the step sliders' bounds)."""
    steps = memory_timeline(trace)["step"]
    if steps.empty:
        return 0, 0
    return int(steps.min()), int(steps.max())


def peak_step(trace, column: str = "reserved") -> int | None:
    """The first step where memory_timeline's `column` is largest (the snapshot step of the report, dashboard and
    widget); None when the trace has no samples, no such column, or the column is never above zero."""
    tl = memory_timeline(trace)
    if tl.empty or column not in tl.columns or not (tl[column] > 0).any():
        return None
    return int(tl.loc[tl[column].idxmax(), "step"])


def memory_at(trace, step: int) -> dict | None:
    """memory_timeline's row for `step` as a dict (the allocator's books at the end of that step); None when the
    step has no sample."""
    tl = memory_timeline(trace)
    row = tl[tl["step"] == step]
    return None if row.empty else row.iloc[0].to_dict()
