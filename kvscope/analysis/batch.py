"""Batch size and what limited it, step by step.

batch_limits(trace) -> one row per step with a STEP event:
    step, batch (sequences in the step's batch: STEP n), waiting (sequences waiting for admission during the step:
    kvscope.analysis.requests.request_occupancy), head_tokens (prompt tokens the next request to be admitted had
    to hold: the ADMIT n that ended the waiting phase that ended first; its prompt length when it was never
    admitted), tokens (prefill + decode tokens the step computed), limit (below)

The rule, from the trace's events and its engine_config (max_batch, max_tokens_per_step, chunked_prefill), the
same order in which kvscope's scheduler (kvscope.engine.scheduler) refuses an admission:
    arrivals    nobody was waiting: the batch held every request that had arrived
    max-batch   someone waited and the batch was full: batch + 1 > max_batch
    token budget  someone waited, the batch had room, and the head of the queue's prompt did not fit what the step
                had left of its token budget (tokens + head_tokens > max_tokens_per_step; never with chunked
                prefill, nor for a prompt longer than the whole budget in a step that computed no prefill: the
                scheduler admits that one anyway)
    memory      someone waited although the batch and the token budget had room, or the step preempted a sequence
                (a step with a preemption admits nobody): the allocator could not fit the next request
A trace without engine_config (older traces) has no max_batch or budget to compare with: its steps with waiting
requests count as memory only when they preempted, else as "unknown".

batch_summary(trace) -> max_batch, mean_batch (over steps with a non-empty batch), batch_limited_by (what kept
the batch from growing when requests were waiting: the limit of the most steps among the steps in which someone
waited; "arrivals" when nobody ever waited), batch_limited_share (the share of those waiting steps it limited),
batch_waiting_share (steps in which someone waited / steps with a non-empty batch), batch_limit_steps_<limit>
(steps per limit, over steps with a non-empty batch), engine_max_batch and engine_max_tokens_per_step (the caps
the run had; None when the trace does not say). Steps in which nobody waited are left out of batch_limited_by on
purpose: once the queue has drained, every run's tail is "limited by arrivals", which says nothing about the
allocator.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached, select
from kvscope.analysis.requests import request_lifetimes, request_occupancy, request_phases
from kvscope.analysis.throughput import throughput_timeline
from kvscope.events import Kind

LIMITS = ("arrivals", "max-batch", "token budget", "memory", "unknown")
BATCH_COLUMNS = ["step", "batch", "waiting", "head_tokens", "tokens", "limit"]


def engine_limits(trace) -> dict[str, Any]:
    """max_batch, max_tokens_per_step, chunked_prefill from the trace's engine_config (None when absent)."""
    cfg = trace.meta.get("engine_config") or {}
    cfg = cfg if isinstance(cfg, dict) else {}

    def whole(key: str) -> int | None:
        value = cfg.get(key)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None

    return {
        "max_batch": whole("max_batch"),
        "max_tokens_per_step": whole("max_tokens_per_step"),
        "chunked_prefill": bool(cfg.get("chunked_prefill", False)),
    }


def batch_limits(trace) -> pd.DataFrame:
    """One row per step: see the module docstring."""
    return cached(trace, "batch_limits", lambda: _build(trace)).copy()


def batch_summary(trace) -> dict[str, Any]:
    """The batch figures of summarize(): see the module docstring."""

    def build() -> dict[str, Any]:
        frame = batch_limits(trace)
        limits = engine_limits(trace)
        running = frame[frame["batch"] > 0]
        counts = running["limit"].value_counts()
        waited = counts.drop("arrivals", errors="ignore")
        out: dict[str, Any] = {
            "max_batch": int(frame["batch"].max()) if len(frame) else 0,
            "mean_batch": float(running["batch"].mean()) if len(running) else 0.0,
            "batch_limited_by": "arrivals",
            "batch_limited_share": 1.0 if len(running) else 0.0,
            "batch_waiting_share": float(waited.sum() / len(running)) if len(running) else 0.0,
        }
        if waited.sum() > 0:
            # Ties go to the scheduler's order of checks (LIMITS), so the answer does not depend on dict order.
            top = max(LIMITS[1:], key=lambda name: (int(waited.get(name, 0)), -LIMITS.index(name)))
            out["batch_limited_by"] = top
            out["batch_limited_share"] = float(waited[top] / waited.sum())
        for name in LIMITS:
            out[f"batch_limit_steps_{name.replace(' ', '_').replace('-', '_')}"] = int(counts.get(name, 0))
        out["engine_max_batch"] = limits["max_batch"]
        out["engine_max_tokens_per_step"] = limits["max_tokens_per_step"]
        return out

    return dict(cached(trace, "batch_summary", build))


def _build(trace) -> pd.DataFrame:
    tp = throughput_timeline(trace)
    if tp.empty:
        return pd.DataFrame({c: pd.Series([], dtype="int64") for c in BATCH_COLUMNS}).astype({"limit": object})
    steps = tp["step"].to_numpy(np.int64)
    occupancy = request_occupancy(trace).set_index("step")["waiting"]
    waiting = occupancy.reindex(steps).fillna(0).to_numpy(np.int64)
    batch = tp["batch"].to_numpy(np.int64)
    prefill = tp["prefill_tokens"].to_numpy(np.int64)
    tokens = prefill + tp["decode_tokens"].to_numpy(np.int64)
    head = _head_tokens(trace, steps)
    preempted = np.isin(steps, select(trace, Kind.PREEMPT)["step"].to_numpy(np.int64))

    limits = engine_limits(trace)
    cap, budget = limits["max_batch"], limits["max_tokens_per_step"]
    known = cap is not None and budget is not None
    full = (batch + 1 > cap) if cap is not None else np.zeros(len(steps), bool)
    over_budget = np.zeros(len(steps), bool)
    if budget is not None and not limits["chunked_prefill"]:
        # The scheduler's one exception: a prompt longer than the whole budget is admitted as a step's first prefill.
        over_budget = (head >= 0) & (tokens + head > budget) & ~((prefill == 0) & (head > budget))
    limit = np.select(
        [waiting <= 0, preempted, full, over_budget, np.full(len(steps), known)],
        ["arrivals", "memory", "max-batch", "token budget", "memory"],
        "unknown",
    )
    frame = pd.DataFrame(
        {"step": steps, "batch": batch, "waiting": waiting, "head_tokens": head, "tokens": tokens, "limit": limit}
    )
    return frame[BATCH_COLUMNS]


def _head_tokens(trace, steps: np.ndarray) -> np.ndarray:
    """Per step, the tokens the head of the waiting queue needed (-1 when nobody waited). The scheduler admits
    first come first served and never lets a request overtake the head, so the head during step s is the waiting
    sequence that was admitted next: among the waiting phases covering s, the one that ended first."""
    phases = request_phases(trace)
    phases = phases[phases["phase"] == "waiting"]
    out = np.full(len(steps), -1, np.int64)
    if phases.empty or not len(steps):
        return out
    admits = select(trace, Kind.ADMIT)[["step", "seq", "n"]].drop_duplicates(["seq", "step"], keep="first")
    need_at = {(int(q), int(s)): int(n) for s, q, n in admits.itertuples(index=False)}
    lifetimes = request_lifetimes(trace)
    # a dict, not the Series: this loop runs once per waiting phase (tens of thousands on a big trace)
    prompt = dict(zip(lifetimes["seq"].tolist(), lifetimes["prompt_len"].tolist(), strict=True))
    order = phases.sort_values(["end_step", "start_step"], kind="stable")
    lo = np.searchsorted(steps, order["start_step"].to_numpy(np.int64), side="left")
    hi = np.searchsorted(steps, order["end_step"].to_numpy(np.int64), side="left")
    # Each step takes the first phase (in end order) that covers it: `nxt` jumps over steps already taken, so the
    # whole pass is about linear in steps + phases.
    nxt = list(range(len(steps) + 1))  # Python ints: the loop below reads and writes one entry at a time
    head = out.tolist()

    def find(i: int) -> int:
        root = i
        while nxt[root] != root:
            root = nxt[root]
        while nxt[i] != root:
            nxt[i], i = root, nxt[i]
        return root

    for (seq, end, is_open), a, b in zip(
        order[["seq", "end_step", "open"]].itertuples(index=False), lo.tolist(), hi.tolist(), strict=True
    ):
        first_need = int(prompt.get(int(seq), -1))
        need = first_need if is_open else need_at.get((int(seq), int(end)), first_need)
        i = find(a)
        while i < b:
            head[i] = need
            nxt[i] = i + 1
            i = find(i + 1)
    return np.array(head, np.int64)
