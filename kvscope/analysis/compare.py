"""Several runs side by side: one row per trace (the summary's figures), the verdict (which run is better for memory
and for throughput, with the numbers and the cause), what differs between the runs' setups, and their timelines on
one clock.

compare_runs(traces)        one row per trace: label, name, every summary figure, waste split
comparison_verdict(traces)  Verdict: sentences naming the better run for memory, for throughput and for latency,
                            and warnings when the runs' workloads, budgets, engine limits or models differ
compare_timelines(traces)   long form: one row per run and step (label, step, t_s, reserved, used, batch,
                            tokens_per_s, waiting)

The verdict's rules (every number comes from kvscope.analysis.summary.summarize and the memory timeline):
    memory      the better run wastes the smallest share of what it reserves (mean_waste_fraction, lower is better;
                ties: the larger peak of tokens held); the sentence gives the batch each run reached (max_batch,
                mean_batch) in its KV budget, the waste split of the worse run (internal fragmentation, reservation
                for future tokens, mapped-idle pages: their means over steps that hold tokens, as shares of
                reserved) and what limited each batch (kvscope.analysis.batch)
    throughput  the better run generated more tokens per second of its clock (tokens_per_s); the cause given is
                the batch it ran (mean_batch), its preemptions and recomputed tokens, and VMM driver time
    latency     the lower median time to first token (ttft_p50_s), with queueing delay and time per output token
When more than two runs are compared, the best is named against the runner-up and the list of the others. Runs
closer than EVEN (2%: throughput, median TTFT) or EVEN_WASTE (half a point of waste) are called even.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis._events import config_value
from kvscope.analysis.memory import memory_timeline
from kvscope.analysis.replay import pool_geometry
from kvscope.analysis.requests import request_occupancy
from kvscope.analysis.summary import summarize
from kvscope.analysis.throughput import throughput_timeline
from kvscope.units import format_bytes

# Summary keys that are not single figures (nested dicts) stay out of the table.
_SKIP = {"allocator_config"}
WASTE_PARTS = (("internal", "internal fragmentation"), ("reservation", "reservation"), ("mapped_idle", "mapped-idle"))
# Closer than this, two runs are called even: within 2% on throughput and latency, 0.5 points of waste.
EVEN = 1.02
EVEN_WASTE = 0.005
TIMELINE_COLUMNS = ["label", "step", "t_s", "reserved", "used", "batch", "tokens_per_s", "waiting"]


def _items(traces: Iterable | Mapping) -> list[tuple[str, Any]]:
    """(unique label, trace) in the order given: the mapping's key, else trace.label, with ' (2)', ' (3)' added when
    two runs share a label."""
    items = list(traces.items()) if isinstance(traces, Mapping) else [(None, t) for t in traces]
    out = []
    seen: dict[str, int] = {}
    for label, trace in items:
        base = str(label) if label is not None else str(summarize(trace).get("label") or trace.name)
        seen[base] = seen.get(base, 0) + 1
        out.append((base if seen[base] == 1 else f"{base} ({seen[base]})", trace))
    return out


def waste_split(trace) -> dict[str, float]:
    """Mean share of reserved bytes per waste part (internal, reservation, mapped_idle) over the steps that end
    with tokens held (waste is measured while requests hold memory)."""
    tl = memory_timeline(trace)
    held = tl[(tl["used"] > 0) & (tl["reserved"] > 0)]
    if held.empty:
        return {part: 0.0 for part, _ in WASTE_PARTS}
    reserved = held["reserved"].to_numpy(np.float64)
    return {part: float((held[part].to_numpy(np.float64) / reserved).mean()) for part, _ in WASTE_PARTS}


def compare_runs(traces: Iterable | Mapping) -> pd.DataFrame:
    """One row per trace, in the order given: label (the mapping's key, else trace.label; made unique with a
    ' (2)', ' (3)' suffix when two runs share one), name (file name or allocator), then every summary figure
    (kvscope.analysis.summary.summarize) plus waste_bytes_saved_vs_worst (how much less peak waste than the most
    wasteful run of the set), used_per_reserved (peak used / peak reserved) and waste_internal_fraction,
    waste_reservation_fraction, waste_mapped_idle_fraction (waste_split)."""
    rows = []
    for label, trace in _items(traces):
        s = summarize(trace)
        row = {"label": label, "name": trace.name}
        row.update({k: v for k, v in s.items() if k not in _SKIP and k != "label"})
        row.update({f"waste_{part}_fraction": v for part, v in waste_split(trace).items()})
        row["granularity"] = granularity(trace)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame({"label": pd.Series([], dtype=object), "name": pd.Series([], dtype=object)})
    frame["waste_bytes_saved_vs_worst"] = frame["peak_waste_bytes"].max() - frame["peak_waste_bytes"]
    reserved = frame["peak_reserved_bytes"].where(frame["peak_reserved_bytes"] > 0)
    frame["used_per_reserved"] = (frame["peak_used_bytes"] / reserved).fillna(0.0)
    return frame.reset_index(drop=True)


@dataclass(frozen=True)
class Verdict:
    """The comparison in words: `memory`, `throughput` and `latency` are one or two sentences each ('' when there
    is nothing to compare); `warnings` say what differs between the runs' setups."""

    memory: str = ""
    throughput: str = ""
    latency: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def sentences(self) -> list[str]:
        return [s for s in (self.memory, self.throughput, self.latency) if s]

    def text(self) -> str:
        return "\n".join([*(f"warning: {w}" for w in self.warnings), *self.sentences])


def comparison_verdict(traces: Iterable | Mapping) -> Verdict:
    """The verdict over the runs (see the module docstring for the rules); an empty Verdict for fewer than two."""
    items = _items(traces)
    if len(items) < 2:
        return Verdict()
    frame = compare_runs(dict(items))
    warnings = setup_differences(dict(items))
    # Runs without the figures a sentence needs (an imported vLLM stream knows no KV budget, waste or clock) are
    # left out of that sentence, and a warning says so, rather than compared as zeros.
    memory = _comparable(frame, ("capacity_bytes", "mean_waste_fraction", "max_batch"), "memory", warnings)
    rate = _comparable(frame, ("tokens_per_s", "mean_batch", "preemptions"), "throughput", warnings)
    return Verdict(
        _memory(memory) if len(memory) > 1 else "",
        _throughput(rate) if len(rate) > 1 else "",
        _latency(frame),
        warnings,
    )


def _comparable(frame: pd.DataFrame, needs: Sequence[str], what: str, warnings: list[str]) -> pd.DataFrame:
    """The rows that have every figure in `needs`; a warning names the others."""
    if any(col not in frame.columns for col in needs):
        warnings.append(f"no {what} verdict: these runs have no {', '.join(c for c in needs if c not in frame)}")
        return frame.iloc[:0]
    values = frame[list(needs)].apply(pd.to_numeric, errors="coerce")
    known = values.notna().all(axis=1)
    missing = frame.loc[~known, "label"].astype(str).tolist()
    if missing:
        warnings.append(f"left out of the {what} verdict (no {', '.join(needs)}): {', '.join(missing)}")
    return frame[known]


def _num(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and np.isfinite(a / b) else "-"


def _others(frame: pd.DataFrame, best: int, runner: int) -> str:
    rest = [str(frame.at[i, "label"]) for i in frame.index if i not in (best, runner)]
    return f" (also compared: {', '.join(rest)})" if rest else ""


def _limit(row: Mapping[str, Any]) -> str:
    limit = str(row.get("batch_limited_by") or "unknown")
    if limit == "arrivals":
        return "arrivals (no request ever waited)"
    if limit == "max-batch" and row.get("engine_max_batch"):
        return f"the max-batch cap of {int(_num(row.get('engine_max_batch'))):,}"
    return limit


def _unit(row: Mapping[str, Any]) -> str:
    return f"; {row['granularity']}" if row.get("granularity") else ""


def _memory(frame: pd.DataFrame) -> str:
    waste = frame["mean_waste_fraction"].astype(float)
    order = sorted(frame.index, key=lambda i: (waste[i], -_num(frame.at[i, "peak_used_bytes"])))
    best, runner = order[0], order[1]
    b, r = frame.loc[best], frame.loc[runner]
    parts = sorted(WASTE_PARTS, key=lambda p: -_num(r[f"waste_{p[0]}_fraction"]))
    split = ", ".join(f"{name} {100 * _num(r[f'waste_{part}_fraction']):.1f}%" for part, name in parts)
    capacity = format_bytes(int(_num(b["capacity_bytes"])))
    same_capacity = _num(b["capacity_bytes"]) == _num(r["capacity_bytes"])
    budget = f"in the same {capacity} of KV memory" if same_capacity else "(their KV budgets differ: see the warning)"
    batch = (
        f"it reached a batch of {int(_num(b['max_batch'])):,} sequences (mean {_num(b['mean_batch']):,.1f}) "
        f"against {int(_num(r['max_batch'])):,} (mean {_num(r['mean_batch']):,.1f}) {budget}, "
        f"{_ratio(_num(b['max_batch']), _num(r['max_batch']))} the batch"
    )
    even = waste[runner] - waste[best] < EVEN_WASTE
    lead = f"{b['label']} and {r['label']} are even" if even else f"{b['label']} is better"
    return (
        f"Memory: {lead}: {b['label'] if even else 'it'} wasted {100 * waste[best]:.1f}% of the memory it reserved "
        "on average, "
        f"{r['label']} {100 * waste[runner]:.1f}% ({split} of reserved{_unit(r)}); {batch}. "
        f"What limited the batch: {_limit(b)} for {b['label']}, {_limit(r)} for {r['label']}."
        + _others(frame, best, runner)
    )


def _throughput(frame: pd.DataFrame) -> str:
    rate = frame["tokens_per_s"].astype(float)
    order = sorted(frame.index, key=lambda i: -rate[i])
    best, runner = order[0], order[1]
    b, r = frame.loc[best], frame.loc[runner]
    clock = " (simulated clock)" if b.get("clock") == "sim" else ""
    causes = [f"a mean batch of {_num(b['mean_batch']):,.1f} against {_num(r['mean_batch']):,.1f}"]
    causes.append(f"{int(_num(b['preemptions'])):,} preemptions against {int(_num(r['preemptions'])):,}")
    if _num(b["recomputed_tokens"]) or _num(r["recomputed_tokens"]):
        causes.append(
            f"{int(_num(b['recomputed_tokens'])):,} recomputed tokens against {int(_num(r['recomputed_tokens'])):,}"
        )
    if _num(b["driver_ms"]) or _num(r["driver_ms"]):
        causes.append(f"{_num(b['driver_ms']):,.1f} ms of VMM driver calls against {_num(r['driver_ms']):,.1f} ms")
    lead = f"{b['label']} is faster" if rate[best] > EVEN * rate[runner] else f"{b['label']} and {r['label']} are even"
    return (
        f"Throughput: {lead}: {rate[best]:,.0f} generated tokens/s{clock} against "
        f"{rate[runner]:,.0f} for {r['label']} ({_ratio(rate[best], rate[runner])}), with "
        + "; ".join(causes)
        + "."
        + _others(frame, best, runner)
    )


def _latency(frame: pd.DataFrame) -> str:
    if "ttft_p50_s" not in frame.columns:
        return ""
    ttft = pd.to_numeric(frame["ttft_p50_s"], errors="coerce")
    if ttft.isna().any():
        return ""
    order = sorted(frame.index, key=lambda i: ttft[i])
    best, runner = order[0], order[1]
    b, r = frame.loc[best], frame.loc[runner]

    def secs(v: Any) -> str:
        x = _num(v)
        return "-" if not np.isfinite(x) else (f"{1e3 * x:.1f} ms" if x < 1 else f"{x:,.2f} s")

    even = _num(r["ttft_p50_s"]) <= EVEN * _num(b["ttft_p50_s"])
    lead = f"{b['label']} and {r['label']} are even" if even else f"{b['label']} answers first"
    return (
        f"Latency: {lead}: median time to first token {secs(b['ttft_p50_s'])} against "
        f"{secs(r['ttft_p50_s'])} (p99 {secs(b['ttft_p99_s'])} against {secs(r['ttft_p99_s'])}), of which queueing "
        f"{secs(b['queue_p50_s'])} against {secs(r['queue_p50_s'])}; median time per output token "
        f"{secs(b['tpot_p50_s'])} against {secs(r['tpot_p50_s'])}."
    )


# ---- what differs between the runs' setups ----------------------------------------------------------------------
def _setup(trace) -> dict[str, Any]:
    """The parts of a run's setup that make two runs comparable, each as a short text."""
    meta = trace.meta
    s = summarize(trace)
    wl = meta.get("workload") if isinstance(meta.get("workload"), dict) else {}
    eng = meta.get("engine_config") if isinstance(meta.get("engine_config"), dict) else {}
    workload = None
    if wl:
        workload = (
            f"{wl.get('name', '?')}, {int(_num(wl.get('requests', s.get('requests', 0)))):,} requests"
            + (f", {int(_num(wl['prompt_tokens'])):,} prompt tokens" if "prompt_tokens" in wl else "")
            + (f", {int(_num(wl['output_tokens'])):,} output tokens" if "output_tokens" in wl else "")
            + (f", seed {meta['seed']}" if meta.get("seed") is not None else "")
        )
    engine = ", ".join(
        f"{k.replace('_', '-')} {_setting(eng[k])}"
        for k in ("max_batch", "max_tokens_per_step", "max_len", "chunked_prefill", "preemption")
        if k in eng
    )
    return {
        "workloads": workload,
        # Imported traces (vLLM KV events) may know no KV budget, model or clock: those rows say unknown.
        "KV budgets": format_bytes(int(s["capacity_bytes"])) if s.get("capacity_bytes") else None,
        "engine limits": engine or None,
        "models": f"{s.get('model', 'unknown model')} ({format_bytes(s['bytes_per_token'])} per token)"
        if s.get("bytes_per_token")
        else s.get("model"),
        "clocks": "simulated" if s.get("clock") == "sim" else "measured host time",
    }


def _setting(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:,}" if isinstance(value, int) else str(value)


def granularity(trace) -> str:
    """What one unit of allocation holds, for the memory sentence: 'a block holds 16 tokens', 'a 2 MiB page holds
    1,024 tokens of one buffer'; '' for row-addressed (static) pools and traces that cannot be replayed."""
    geo = pool_geometry(trace)
    if geo.addressing == "blocks" and geo.block_size:
        return f"a block holds {geo.block_size:,} tokens"
    row = config_value(trace, "buffer_row_bytes", 0) or 0
    if geo.addressing == "pages" and geo.page_size and row:
        return f"a {format_bytes(geo.page_size)} page holds {geo.page_size // int(row):,} tokens of one buffer"
    return ""


def setup_differences(traces: Iterable | Mapping) -> list[str]:
    """One sentence per part of the setup (workload, KV budget, engine limits, model, clock) that differs between
    the runs, naming each run's value; empty when the runs are comparable."""
    items = _items(traces)
    setups = [(label, _setup(trace)) for label, trace in items]
    out = []
    for part in ("workloads", "KV budgets", "engine limits", "models", "clocks"):
        values = [(label, setup[part]) for label, setup in setups]
        if len({v for _, v in values}) > 1:
            each = "; ".join(f"{label}: {v if v is not None else 'not recorded'}" for label, v in values)
            out.append(f"the runs have different {part} ({each}), so their figures do not compare like for like.")
    return out


def compare_timelines(traces: Iterable | Mapping) -> pd.DataFrame:
    """One row per run and recorded step, the runs one after another: label (as compare_runs), step, t_s (end of
    the step on the run's clock), reserved and used (bytes at the end of the step), batch (sequences in the step),
    tokens_per_s (generated tokens per second in the step), waiting (sequences waiting for admission)."""
    frames = []
    for label, trace in _items(traces):
        tl = memory_timeline(trace)[["step", "t_s", "reserved", "used"]]
        tp = throughput_timeline(trace)[["step", "batch", "tokens_per_s"]]
        occ = request_occupancy(trace)[["step", "waiting"]]
        frame = tl.merge(tp, on="step", how="left").merge(occ, on="step", how="left")
        frame["batch"] = frame["batch"].fillna(0).astype("int64")
        frame["waiting"] = frame["waiting"].fillna(0).astype("int64")
        frame["tokens_per_s"] = frame["tokens_per_s"].astype("float64")
        frame.insert(0, "label", label)
        frames.append(frame)
    if not frames:
        return pd.DataFrame({c: pd.Series([], dtype="float64") for c in TIMELINE_COLUMNS}).astype({"label": object})
    return pd.concat(frames, ignore_index=True)[TIMELINE_COLUMNS]


def labels(traces: Sequence) -> list[str]:
    """The unique labels compare_runs gives these traces, in order."""
    return [label for label, _ in _items(traces)]
