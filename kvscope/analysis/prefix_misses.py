"""Why each prompt block of an engine run missed the prefix cache, and what the CPU tier served (pure functions,
Trace -> DataFrame / dict).

A request's prompt at its first admission splits into: hits on the GPU, hits in the CPU tier (BLOCK_RELOAD, with
--cpu-cache), the block-size floor (the tokens after the last full block the lookup may cover: the partial last
block, and the last prompt token, which is always computed), and missed full blocks, each with one cause:

- cold: its content (hash) was never cached before in the run: no policy could have hit it;
- evicted: it was cached and then left every tier (BLOCK_EVICT, or BLOCK_TIER_DROP when it had gone to the CPU);
  `evicted_step` / `evicted_s_before` name that eviction and how long before the admission it was;
- gap: it was cached at that moment, but the lookup had stopped at an earlier missing block (or a twin was being
  computed at the same time).

The classes sum exactly to the prompt: hit_gpu + hit_cpu + cold + evicted + gap + floor = prompt tokens (counted at
the first admission; `pending` holds blocks a cut-off trace never computed). Tokens computed again after a
recompute preemption are `preempted` (apart: they are not prompt misses). The missed blocks are those the request
cached in its prefill (BLOCK_CACHE rows of its seq after its ADMIT), in order, so it needs a prefix-caching paged
trace; other traces give empty frames.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached, select
from kvscope.events import Kind

CAUSES = ("cold", "evicted", "gap")
_KINDS = (
    Kind.ADMIT,
    Kind.BLOCK_CACHE,
    Kind.BLOCK_EVICT,
    Kind.BLOCK_OFFLOAD,
    Kind.BLOCK_RELOAD,
    Kind.BLOCK_TIER_DROP,
    Kind.PREEMPT,
)
_REQUEST_COLUMNS = (
    "seq",
    "prompt_tokens",
    "hit_gpu",
    "hit_cpu",
    "cold",
    "evicted",
    "gap",
    "floor",
    "pending",
    "preempted",
)


def _block_size(trace) -> int | None:
    config = trace.meta.get("allocator_config") or {}
    if config.get("addressing") != "blocks" or not config.get("prefix_caching"):
        return None
    bs = config.get("block_size")
    return int(bs) if isinstance(bs, int) and bs > 0 else None


def has_prompt_misses(trace) -> bool:
    """Whether the trace can say why prompts missed: a block-addressed run with prefix caching."""
    return _block_size(trace) is not None


def _pass(trace) -> tuple[pd.DataFrame, pd.DataFrame]:
    def build() -> tuple[pd.DataFrame, pd.DataFrame]:
        bs = _block_size(trace)
        blocks: list[tuple[int, int, int, str, int, float]] = []  # seq, position, hash, cause, evicted step, t_ns
        if bs is None:
            return pd.DataFrame(columns=list(_REQUEST_COLUMNS)), _blocks_frame(blocks)
        rows = select(trace, *_KINDS)
        code = rows["code"].to_numpy().tolist()
        seqs = rows["seq"].to_numpy().tolist()
        ns = rows["n"].to_numpy().tolist()
        aux = rows["aux"].to_numpy().tolist()
        steps = rows["step"].to_numpy().tolist()
        t_ns = rows["t_ns"].to_numpy().tolist()
        ever: set[int] = set()  # hashes cached at some point
        lost: dict[int, tuple[int, int]] = {}  # hash -> (step, t_ns) of the eviction that took it out of every tier
        reloads: dict[int, int] = {}  # seq -> CPU-tier hits of its admission in progress
        todo: dict[int, list[int]] = {}  # seq -> [missed blocks still to come, next position]
        req: dict[int, list[int]] = {}  # seq -> its row (the _REQUEST_COLUMNS after seq), in admission order
        admit_t: dict[int, int] = {}
        preempted: set[int] = set()  # seqs preempted since their last admission
        admit, cache, evict, offload, reload_, drop, preempt = (int(k) for k in _KINDS)
        for i, c in enumerate(code):
            if c == cache:
                h, s = aux[i], seqs[i]
                left = todo.get(s)
                if left is not None and left[0] > 0:
                    if h in lost:
                        cause, (e_step, e_t) = "evicted", lost[h]
                    else:
                        cause, e_step, e_t = ("gap" if h in ever else "cold"), -1, -1
                    blocks.append((s, left[1], h, cause, e_step, (admit_t[s] - e_t) / 1e9 if e_t >= 0 else np.nan))
                    req[s][1 + CAUSES.index(cause) + 2] += bs
                    left[0] -= 1
                    left[1] += 1
                ever.add(h)
                lost.pop(h, None)
            elif c == admit:
                s, n, hit = seqs[i], ns[i], max(aux[i], 0)
                cpu = reloads.pop(s, 0)
                if s in preempted:  # a re-admission after a preemption: everything beyond the hit is computed again
                    preempted.discard(s)
                    if s in req:  # (a forked sample's first ADMIT is such a re-admission: it has no prompt row)
                        req[s][-1] += max(n - hit, 0)
                    continue
                # (an admission the scheduler undid before computing anything is replaced by the next one)
                full = max(n - 1, 0) // bs
                hit_blocks = min(hit // bs, full)
                req[s] = [n, (hit_blocks - cpu) * bs, cpu * bs, 0, 0, 0, n - full * bs, 0, 0]
                todo[s] = [full - hit_blocks, hit_blocks]
                admit_t[s] = t_ns[i]
            elif c in (evict, drop):
                lost[aux[i]] = (steps[i], t_ns[i])
            elif c == offload:
                lost.pop(aux[i], None)  # still cached, on the CPU
            elif c == reload_:
                reloads[seqs[i]] = reloads.get(seqs[i], 0) + 1
            elif c == preempt:
                preempted.add(seqs[i])
        for s, left in todo.items():
            r = req[s]
            r[7] = left[0] * bs  # pending: never computed (a cut-off trace)
        frame = pd.DataFrame([[s, *r] for s, r in req.items()], columns=list(_REQUEST_COLUMNS), dtype="int64")
        return frame, _blocks_frame(blocks)

    return cached(trace, "prefix_misses", build)


def _blocks_frame(blocks: list) -> pd.DataFrame:
    return pd.DataFrame(blocks, columns=["seq", "position", "hash", "cause", "evicted_step", "evicted_s_before"])


def request_misses(trace) -> pd.DataFrame:
    """One row per admitted sequence, in admission order: seq, prompt_tokens, hit_gpu, hit_cpu, cold, evicted, gap,
    floor, pending (tokens; they sum to prompt_tokens) and preempted (tokens computed again after preemptions)."""
    return _pass(trace)[0].copy()


def missed_blocks(trace) -> pd.DataFrame:
    """One row per missed full prompt block: seq, position in its prompt, hash (int64 prefix), cause, and for an
    evicted one the step of the eviction and how many seconds of host time (t_ns) before the admission it was."""
    return _pass(trace)[1].copy()


def prefix_miss_summary(trace) -> dict[str, Any]:
    """The summary's keys: prompt tokens by outcome at first admissions (miss_*_tokens, cpu_tier_hit_tokens) and
    the CPU tier's traffic (blocks offloaded, reloaded, dropped; bytes over PCIe). Zeros without a tier or misses."""
    frame = _pass(trace)[0]
    tier = select(trace, Kind.BLOCK_OFFLOAD, Kind.BLOCK_RELOAD, Kind.BLOCK_TIER_DROP)
    codes = tier["code"].to_numpy()
    moved = tier["bytes"].to_numpy()[codes != int(Kind.BLOCK_TIER_DROP)]

    def total(col: str) -> int:
        return int(frame[col].sum()) if len(frame) else 0

    return {
        "cpu_tier_hit_tokens": total("hit_cpu"),
        "cpu_tier_hit_blocks": int((codes == int(Kind.BLOCK_RELOAD)).sum()),
        "cpu_tier_offloaded_blocks": int((codes == int(Kind.BLOCK_OFFLOAD)).sum()),
        "cpu_tier_dropped_blocks": int((codes == int(Kind.BLOCK_TIER_DROP)).sum()),
        "pcie_bytes": int(moved.sum()),
        "miss_cold_tokens": total("cold"),
        "miss_evicted_tokens": total("evicted"),
        "miss_gap_tokens": total("gap"),
        "miss_floor_tokens": total("floor"),
    }
