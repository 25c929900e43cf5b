"""Many policies x capacities x prediction errors over one workload -> one row per run (a DataFrame).

Oracles are computed once per capacity and shared: the optimum's run at a capacity is also the discard oracle's
(its evictions are the discard bits), the phase bits depend on the capacity only, and each prediction error p flips
them with its own seeded draw. Capacities run in parallel processes with `jobs` > 1 (fork: the accesses are shared,
not copied).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from kvscope.lab import oracle
from kvscope.lab.accesses import BlockAccesses
from kvscope.lab.replay import Replay, replay
from kvscope.policies import registry
from kvscope.policies.belady import Belady

COLUMNS = (
    "policy",
    "capacity_blocks",
    "prediction_error",
    "hit_blocks",
    "total_blocks",
    "hit_rate",
    "hit_tokens",
    "prompt_tokens",
    "token_hit_rate",
    "miss_cold",
    "miss_evicted",
    "miss_gap",
    "miss_capacity",
    "floor_tokens",
    "evictions",
    "cpu_cache_blocks",
    "cpu_hit_blocks",
    "seconds",
)


@dataclass
class LabRow:
    policy: str
    capacity_blocks: int
    prediction_error: float | None  # None: the policy takes no predictions
    hit_blocks: int
    total_blocks: int
    hit_rate: float  # hit_blocks / total_blocks
    hit_tokens: int
    prompt_tokens: int
    token_hit_rate: float
    miss_cold: int  # first use of the block: no policy could hit it
    miss_evicted: int  # cached before, evicted since
    miss_gap: int  # cached, but behind a missing block of the chain
    miss_capacity: int  # deeper in its prompt than the whole cache
    floor_tokens: int  # prompt tokens in partial blocks, never cached (kvscope workloads only)
    evictions: int
    cpu_cache_blocks: int  # the CPU tier's capacity (0: none)
    cpu_hit_blocks: int  # of hit_blocks, those found in the CPU tier
    seconds: float  # wall time of this replay alone


def summarize(acc: BlockAccesses, rep: Replay, policy: str, p: float | None, seconds: float) -> LabRow:
    off = acc.offsets
    hits = rep.hits
    hit_blocks = int(hits.sum())
    cum = acc.cum_fill
    hit_tokens = int((cum[off[:-1] + hits] - cum[off[:-1]]).sum())
    total = acc.num_blocks
    cold = int(acc.first_use.sum())
    deep = (acc.depth[acc.keys] >= rep.capacity) & ~acc.first_use
    capacity = int(deep.sum())
    gap = int(rep.gap.sum())
    misses = total - hit_blocks
    prompt = int(acc.prompt_tokens.sum())
    return LabRow(
        policy=policy,
        capacity_blocks=rep.capacity,
        prediction_error=p,
        hit_blocks=hit_blocks,
        total_blocks=total,
        hit_rate=hit_blocks / total if total else 0.0,
        hit_tokens=hit_tokens,
        prompt_tokens=prompt,
        token_hit_rate=hit_tokens / prompt if prompt else 0.0,
        miss_cold=cold,
        miss_evicted=misses - cold - gap - capacity,
        miss_gap=gap,
        miss_capacity=capacity,
        floor_tokens=prompt - int(acc.fill.sum()),
        evictions=rep.evictions,
        cpu_cache_blocks=rep.cpu_capacity,
        cpu_hit_blocks=int(rep.cpu_hits.sum()) if rep.cpu_hits is not None else 0,
        seconds=round(seconds, 4),
    )


def run_one(
    acc: BlockAccesses,
    policy: str,
    capacity: int,
    p: float | None = None,
    *,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    explain: bool = False,
    cpu_cache: int = 0,
) -> tuple[LabRow, Replay]:
    """One policy at one capacity (and prediction error, for the policies that take predictions), with a CPU tier
    of `cpu_cache` blocks when positive."""
    entry = registry.get(policy)
    hints = _hints(acc, entry.name, entry.predictions, capacity, p, seed, {})
    return _run(acc, entry.name, capacity, p, hints, seed, options, explain, cpu_cache)


def _run(acc, name, capacity, p, hints, seed, options, explain=False, cpu_cache=0) -> tuple[LabRow, Replay]:
    entry = registry.get(name)
    opts = {"block_tokens": acc.block_size, **(options or {})}
    pol = entry.build(oracle.context(acc, capacity, hints=hints, seed=seed, options=opts))
    t0 = time.perf_counter()
    rep = replay(acc, pol, capacity, explain=explain, cpu_capacity=cpu_cache)
    return summarize(acc, rep, name, p if entry.predictions else None, time.perf_counter() - t0), rep


def _hints(acc, name, predictions, capacity, p, seed, cache: dict) -> list | None:
    if name == "belady":
        return _next_use(acc, cache)
    if predictions is None:
        return None
    if predictions == "discard":
        bits = cache.get(("discard", capacity))
        if bits is None:
            bits = oracle.discard_bits(acc, capacity)
    else:
        bits = cache.get(("phase", capacity))
        if bits is None:
            bits = oracle.phase_bits(acc, capacity)
            cache[("phase", capacity)] = bits
    return oracle.flip(bits, 0.0 if p is None else p, seed).tolist()


def _next_use(acc: BlockAccesses, cache: dict) -> list:
    nu = cache.get("next_use")
    if nu is None:
        nu = cache["next_use"] = acc.next_use.tolist()
    return nu


def _capacity_rows(
    acc: BlockAccesses,
    capacity: int,
    policies: Sequence[str],
    errors: Sequence[float],
    seed: int,
    options: dict,
    cpu_cache: int = 0,
) -> list[LabRow]:
    rows: list[LabRow] = []
    cache: dict[Any, Any] = {}
    entries = registry.entries()
    wants_discard = any(entries[n].predictions == "discard" for n in policies)
    if "belady" in policies or wants_discard:
        # The optimum's own run records its evictions: its row and the discard oracle's bits from one replay.
        record = [0] * acc.num_blocks
        next_use = _next_use(acc, cache)
        ctx = oracle.context(acc, capacity, hints=next_use)
        t0 = time.perf_counter()
        rep = replay(acc, Belady(next_use, ctx.offsets, ctx.depth, record), capacity, cpu_capacity=cpu_cache)
        seconds = time.perf_counter() - t0
        if "belady" in policies:
            rows.append(summarize(acc, rep, "belady", None, seconds))
        bits = np.asarray(record, dtype=np.int8)
        bits[acc.next_use >= acc.num_requests] = 1
        cache[("discard", capacity)] = bits
    for name in policies:
        if name == "belady":
            continue
        entry = entries[name]
        for p in errors if entry.predictions else (None,):
            hints = _hints(acc, name, entry.predictions, capacity, p, seed, cache)
            rows.append(_run(acc, name, capacity, p, hints, seed, options, cpu_cache=cpu_cache)[0])
    return rows


_SHARED: dict[str, Any] = {}


def _worker(args: tuple) -> list[LabRow]:
    return _capacity_rows(_SHARED["acc"], *args)


def run_lab(
    acc: BlockAccesses,
    policies: Sequence[str],
    capacities: Sequence[int],
    errors: Sequence[float] = (0.0,),
    *,
    seed: int = 0,
    jobs: int = 1,
    options: dict[str, Any] | None = None,
    progress=None,
    cpu_cache: int = 0,
) -> pd.DataFrame:
    """Every policy at every capacity (each prediction-taking policy at every error in `errors`), each with a CPU
    tier of `cpu_cache` blocks when positive: a DataFrame with COLUMNS, ordered by policy (as given), capacity and
    error. `progress(done, total)` is called after each capacity."""
    for name in policies:
        registry.get(name)
    for c in capacities:
        if c < 1:
            raise ValueError(f"--capacity: must be at least one block, got {c}")
    for p in errors:
        oracle.flip(np.zeros(1, dtype=np.int8), p)  # a bad p is one line before any work
    options = dict(options or {})
    if cpu_cache < 0:
        raise ValueError(f"--cpu-cache: must be at least 0 blocks, got {cpu_cache}")
    tasks = [(int(c), list(policies), list(errors), seed, options, int(cpu_cache)) for c in capacities]
    rows: list[LabRow] = []
    if jobs > 1 and len(tasks) > 1:
        acc.chains, acc.first_use, acc.next_use, acc.cum_fill  # noqa: B018  (computed once, before the fork)
        _SHARED["acc"] = acc
        try:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx) as pool:
                for i, part in enumerate(pool.map(_worker, tasks)):
                    rows.extend(part)
                    if progress is not None:
                        progress(i + 1, len(tasks))
        finally:
            _SHARED.clear()
    else:
        for i, task in enumerate(tasks):
            rows.extend(_capacity_rows(acc, *task))
            if progress is not None:
                progress(i + 1, len(tasks))
    frame = pd.DataFrame([asdict(r) for r in rows], columns=list(COLUMNS))
    rank = {n: i for i, n in enumerate(policies)}
    frame["_rank"] = frame["policy"].map(rank)
    frame = frame.sort_values(["_rank", "capacity_blocks", "prediction_error"], kind="stable", na_position="first")
    return frame.drop(columns="_rank").reset_index(drop=True)
