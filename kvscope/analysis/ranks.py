"""Per-rank KV of a tensor- / context-parallel run: its rank traces -> the group's figures (pure functions).

A parallel run (kvscope.parallel) writes one trace per rank; each carries `rank`, `world_size` and `parallel`
(tp, dcp, the rank's KV heads, kv_duplication, group_id, every rank's token slots and the group's
capacity_tokens_total) in its metadata. A trace without them is a group of one: world_size 1, duplication 1.

Definitions:
- capacity_tokens (a rank): token slots of its KV memory, capacity bytes // bytes per token of its shard (for paged:
  blocks x block size).
- capacity_tokens_total (the group): tokens of context it holds. Under TP every rank holds every token (of its own
  heads): the smallest rank's slots. Under DCP the ranks of a DCP group hold disjoint tokens: the sum over its ranks,
  the smallest such sum over groups (kvscope.parallel.layout.capacity_tokens_total).
- kv_duplication: ranks holding the K/V of one (token, head): (tp / kv_heads) / dcp when TP exceeds the KV heads,
  else 1.
- imbalance: the largest rank's peak used bytes over the ranks' mean, minus 1 (0: balanced; DCP's round-robin puts
  the odd tokens of every sequence on the low DCP ranks).
- the memory stack of each rank is taken at one instant for all ranks: the end of the step at which the ranks'
  used bytes summed are highest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from kvscope.analysis._events import cached, select
from kvscope.analysis.memory import memory_timeline
from kvscope.events import Kind

STACK_FIELDS = ("used", "internal", "reservation", "mapped_idle", "cached_idle", "free")


def parallel_meta(trace) -> dict[str, Any]:
    p = trace.meta.get("parallel")
    return p if isinstance(p, dict) else {}


def world_size(trace) -> int:
    w = trace.meta.get("world_size", 1)
    return w if isinstance(w, int) and not isinstance(w, bool) and w >= 1 else 1


def rank_of(trace) -> int:
    r = trace.meta.get("rank", 0)
    return r if isinstance(r, int) and not isinstance(r, bool) and r >= 0 else 0


def is_rank_trace(trace) -> bool:
    return world_size(trace) > 1


def capacity_tokens(trace) -> int:
    """This trace's token slots: the largest ACCT_CAPACITY sample over its bytes per token (0 without either)."""

    def build() -> int:
        cap = select(trace, Kind.ACCT_CAPACITY)["bytes"]
        bpt = trace.bytes_per_token
        return int(cap.max()) // bpt if len(cap) and bpt > 0 else 0

    return cached(trace, "ranks.capacity_tokens", build)


def parallel_summary(trace) -> dict[str, Any]:
    """The keys kvscope.analysis.summary adds for every trace: world_size, rank, kv_duplication, capacity_tokens,
    capacity_tokens_total (the group's, from the metadata the run wrote; a lone trace's own slots)."""
    p = parallel_meta(trace)
    own = capacity_tokens(trace)
    total = p.get("capacity_tokens_total")
    dup = p.get("kv_duplication", 1)
    return {
        "world_size": world_size(trace),
        "rank": rank_of(trace),
        "kv_duplication": int(dup) if isinstance(dup, int) and not isinstance(dup, bool) else 1,
        "capacity_tokens": own,
        "capacity_tokens_total": int(total) if isinstance(total, int) and not isinstance(total, bool) else own,
    }


def check_group(traces: Sequence) -> list:
    """The traces of one parallel run in rank order, or ValueError (one line) naming what does not match."""
    if not traces:
        raise ValueError("no rank traces given")
    first = traces[0]
    world = world_size(first)
    gid = parallel_meta(first).get("group_id")
    by_rank: dict[int, Any] = {}
    for t in traces:
        if world_size(t) != world or parallel_meta(t).get("group_id") != gid:
            raise ValueError(
                f"{t.name}: not a rank of the same run as {first.name} "
                f"(world size {world_size(t)} vs {world}, group {parallel_meta(t).get('group_id')} vs {gid})"
            )
        r = rank_of(t)
        if r >= world:
            raise ValueError(f"{t.name}: rank {r} outside world size {world}")
        if r in by_rank:
            raise ValueError(f"{t.name}: rank {r} given twice (also {by_rank[r].name})")
        by_rank[r] = t
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        raise ValueError(
            f"{first.name}: run of {world} ranks, rank(s) {', '.join(map(str, missing))} not given "
            "(give every rank, or the run's prefix)"
        )
    return [by_rank[r] for r in range(world)]


def split_groups(traces: Sequence) -> tuple[list[list], list]:
    """(groups, others): the rank traces of each parallel run among `traces` (checked, in rank order; runs in the
    order their first rank appears), and the traces that are not rank traces."""
    groups: dict[Any, list] = {}
    others = []
    for t in traces:
        if is_rank_trace(t):
            groups.setdefault(parallel_meta(t).get("group_id"), []).append(t)
        else:
            others.append(t)
    runs = list(groups.values())
    if len(runs) > 1 and any(len(g) < world_size(g[0]) for g in runs):  # ranks of different runs mixed up
        a, b = runs[0][0], runs[1][0]
        raise ValueError(
            f"rank files of different runs: {b.name} is not a rank of the same run as {a.name} "
            f"(runs {parallel_meta(a).get('group_id')} and {parallel_meta(b).get('group_id')}); "
            "give every rank of a run, or its prefix"
        )
    return [check_group(g) for g in runs], others


def _stack_step(timelines: list[pd.DataFrame]) -> int | None:
    """The step at whose end the ranks' used bytes summed are highest (the first such), or None."""
    frames = [tl[["step", "used"]] for tl in timelines if len(tl)]
    if not frames:
        return None
    total = pd.concat(frames).groupby("step")["used"].sum()
    return int(total.idxmax())


def rank_table(traces: Sequence) -> pd.DataFrame:
    """One row per rank (a checked group, or any list of traces taken as ranks in order): rank, dcp_rank,
    kv_heads (str), bytes_per_token, capacity_bytes, capacity_tokens, peak_used, peak_reserved, peak_waste,
    peak_cached_idle (in-step peaks, bytes), tokens_held_peak (peak used // bytes per token), stack_step and the
    memory stack at it (used, internal, reservation, mapped_idle, cached_idle, free: bytes at that step's end)."""
    timelines = [memory_timeline(t) for t in traces]
    at = _stack_step(timelines)
    rows = []
    for i, (t, tl) in enumerate(zip(traces, timelines, strict=True)):
        p = parallel_meta(t)
        bpt = t.bytes_per_token
        heads = p.get("kv_heads")
        row: dict[str, Any] = {
            "rank": rank_of(t) if is_rank_trace(t) else i,
            "dcp_rank": int(p.get("dcp_rank", 0)),
            "kv_heads": ",".join(map(str, heads)) if isinstance(heads, list) else "all",
            "bytes_per_token": bpt,
            "capacity_bytes": int(tl["capacity"].max()) if len(tl) else 0,
            "capacity_tokens": capacity_tokens(t),
            "peak_used": int(tl["peak_used"].max()) if len(tl) else 0,
            "peak_reserved": int(tl["peak_reserved"].max()) if len(tl) else 0,
            "peak_waste": int(tl["peak_waste"].max()) if len(tl) else 0,
            "peak_cached_idle": int(tl["peak_cached_idle"].max()) if len(tl) else 0,
            "stack_step": -1 if at is None else at,
        }
        row["tokens_held_peak"] = row["peak_used"] // bpt if bpt > 0 else 0
        sample = tl[tl["step"] == at] if at is not None else tl.iloc[0:0]
        for f in STACK_FIELDS:
            row[f] = int(sample[f].iloc[-1]) if len(sample) else 0
        rows.append(row)
    return pd.DataFrame(rows)


def group_summary(traces: Sequence) -> dict[str, Any]:
    """The group's figures from its rank traces: world_size, tp, dcp, kv_heads_total, kv_heads_per_rank,
    kv_duplication, capacity_tokens (per rank), capacity_tokens_total (recomputed from the traces),
    capacity_tokens_total_recorded (what the run wrote), peak_used_bytes_total (sum of the ranks' peaks),
    peak_used_bytes_max / _mean, imbalance."""
    from kvscope.parallel.layout import capacity_tokens_total

    table = rank_table(traces)
    p = parallel_meta(traces[0])
    dcp = int(p.get("dcp", 1))
    caps = [int(c) for c in table["capacity_tokens"]]
    peaks = table["peak_used"].astype("float64")
    mean = float(peaks.mean()) if len(peaks) else 0.0
    return {
        "world_size": world_size(traces[0]),
        "tp": int(p.get("tp", 1)),
        "dcp": dcp,
        "kv_heads_total": int(p.get("kv_heads_total", (traces[0].meta.get("spec") or {}).get("num_kv_heads", 0))),
        "kv_heads_per_rank": int(p.get("kv_heads_per_rank", (traces[0].meta.get("spec") or {}).get("num_kv_heads", 0))),
        "kv_duplication": parallel_summary(traces[0])["kv_duplication"],
        "capacity_tokens": caps,
        "capacity_tokens_total": capacity_tokens_total(caps, dcp),
        "capacity_tokens_total_recorded": p.get("capacity_tokens_total"),
        "peak_used_bytes_total": int(peaks.sum()),
        "peak_used_bytes_max": int(peaks.max()) if len(peaks) else 0,
        "peak_used_bytes_mean": mean,
        "imbalance": float(peaks.max() / mean - 1.0) if mean > 0 else 0.0,
    }


__all__ = [
    "STACK_FIELDS",
    "capacity_tokens",
    "check_group",
    "group_summary",
    "is_rank_trace",
    "parallel_meta",
    "parallel_summary",
    "rank_of",
    "rank_table",
    "split_groups",
    "world_size",
]
