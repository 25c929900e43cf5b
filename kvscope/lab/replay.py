"""The cache-only replay (the lab's contract, docs/lab.md) of one policy at one capacity.

For each request, in arrival order:
1. its hits are the longest cached prefix of its chain;
2. its blocks deeper than the capacity are never cached (a request cannot hold more blocks than the cache has);
   the others that are cached are pinned (a hit, or a block cached behind a missing one: a gap);
3. room is made for its missing blocks by evicting the policy's victims (never a pinned block);
4. its kept blocks are released tail first, so that for LRU its head is the most recent and its tail the least.
Capacity counts blocks. Each miss gets a cause: cold (the block's first use), evicted (it was cached and evicted:
`evicted_at` says by which request), gap (cached but behind a missing block: a policy that is not prefix-closed),
capacity (deeper than the whole cache). The classes sum to the misses.

With a CPU tier (`cpu_capacity` > 0, Pensieve's second tier; the engine's `--cpu-cache`), the policy's victims go to
an LRU tier of that many blocks instead of being lost (its least recently used block is dropped when it is full); a
request's hits are then the longest prefix cached in either tier, and its blocks found in the CPU tier move back to
the GPU cache like new ones (they may evict others, which go to the CPU in turn). `cpu_hits` counts them per request;
an `evicted` miss is then a block that left both tiers.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kvscope.lab.accesses import BlockAccesses
from kvscope.policies.base import EvictionPolicy, RequestAware


@dataclass
class Replay:
    capacity: int
    hits: np.ndarray  # int64 [R]: blocks hit per request (its cached prefix)
    gap: np.ndarray  # int64 [R]: missed blocks that were cached behind a missing one
    evicted_by: np.ndarray | None = None  # int64 [N]: for a block missed after an eviction, the evicting request
    evictions: int = 0
    cpu_capacity: int = 0  # blocks of the CPU tier (0: none)
    cpu_hits: np.ndarray | None = None  # int64 [R]: of `hits`, blocks found in the CPU tier (with a tier)
    cpu_drops: int = 0  # blocks the full CPU tier dropped


def replay(
    acc: BlockAccesses, policy: EvictionPolicy, capacity: int, *, explain: bool = False, cpu_capacity: int = 0
) -> Replay:
    """Run `policy` (built for `capacity`) over `acc`, with a CPU tier of `cpu_capacity` blocks when positive. With
    `explain`, keep for every missed block that had been evicted the request whose eviction lost it (else -1)."""
    if capacity < 1:
        raise ValueError(f"capacity: must be at least one block, got {capacity}")
    if cpu_capacity < 0:
        raise ValueError(f"--cpu-cache: must be at least 0 blocks, got {cpu_capacity}")
    if cpu_capacity:
        return _replay_tiered(acc, policy, capacity, cpu_capacity, explain)
    chains = acc.chains
    n_req = len(chains)
    cached = bytearray(acc.num_keys)
    evicted_at = array("q", [-1]) * acc.num_keys if explain else None
    hits = np.zeros(n_req, dtype=np.int64)
    gaps = np.zeros(n_req, dtype=np.int64)
    evicted_by = np.full(acc.num_blocks, -1, dtype=np.int64) if explain else None
    offsets = acc.offsets.tolist()
    begin = policy.begin if isinstance(policy, RequestAware) else None
    pin, release, evict = policy.pin, policy.release, policy.evict
    size = 0
    evictions = 0
    for r in range(n_req):
        chain = chains[r]
        if begin is not None:
            begin(r)
        n = len(chain)
        h = 0
        while h < n and cached[chain[h]]:
            h += 1
        hits[r] = h
        kept = chain if n <= capacity else chain[:capacity]
        if h == n:
            if not n:
                continue
            pin(kept)
            release(kept[::-1])
            continue
        new = [k for k in kept[h:] if not cached[k]]
        gap = len(kept) - h - len(new)
        present = kept[:h]
        if gap:  # cached blocks behind the first miss (only policies that are not prefix-closed leave them)
            gaps[r] = gap
            present += [k for k in kept[h:] if cached[k]]
        if evicted_by is not None and evicted_at is not None:
            base = offsets[r]
            for j in range(h, n):
                k = chain[j]
                if not cached[k]:
                    evicted_by[base + j] = evicted_at[k]
        if present:
            pin(present)
        over = size + len(new) - capacity
        if over > 0:
            victims = evict(over)
            evictions += over
            for v in victims:
                cached[v] = 0
            if evicted_at is not None:
                for v in victims:
                    evicted_at[v] = r
            size -= over
        for k in new:
            cached[k] = 1
        size += len(new)
        release(kept[::-1])
    return Replay(capacity=capacity, hits=hits, gap=gaps, evicted_by=evicted_by, evictions=evictions)


def _replay_tiered(
    acc: BlockAccesses, policy: EvictionPolicy, capacity: int, cpu_capacity: int, explain: bool
) -> Replay:
    """replay() with a CPU tier (the module docstring): kept apart so that the one-tier loop stays as fast."""
    chains = acc.chains
    n_req = len(chains)
    cached = bytearray(acc.num_keys)  # on the GPU
    tier: OrderedDict[int, None] = OrderedDict()  # on the CPU, least recently used first
    evicted_at = array("q", [-1]) * acc.num_keys if explain else None
    hits = np.zeros(n_req, dtype=np.int64)
    cpu_hits = np.zeros(n_req, dtype=np.int64)
    gaps = np.zeros(n_req, dtype=np.int64)
    evicted_by = np.full(acc.num_blocks, -1, dtype=np.int64) if explain else None
    offsets = acc.offsets.tolist()
    begin = policy.begin if isinstance(policy, RequestAware) else None
    pin, release, evict = policy.pin, policy.release, policy.evict
    size = evictions = drops = 0
    for r in range(n_req):
        chain = chains[r]
        if begin is not None:
            begin(r)
        n = len(chain)
        h = 0
        from_cpu = 0
        while h < n and (cached[chain[h]] or chain[h] in tier):
            from_cpu += not cached[chain[h]]
            h += 1
        hits[r] = h
        cpu_hits[r] = from_cpu
        if not n:
            continue
        kept = chain if n <= capacity else chain[:capacity]
        present = [k for k in kept if cached[k]]  # pinned: hits on the GPU, and cached blocks behind a miss
        new = [k for k in kept if not cached[k]]  # computed, or copied back from the CPU
        gap = sum(1 for k in kept[h:] if cached[k] or k in tier)
        if gap:
            gaps[r] = gap
        if evicted_by is not None and evicted_at is not None:
            base = offsets[r]
            for j in range(h, n):
                k = chain[j]
                if not cached[k] and k not in tier:
                    evicted_by[base + j] = evicted_at[k]
        for k in new:
            if k in tier:
                del tier[k]
        if present:
            pin(present)
        over = size + len(new) - capacity
        if over > 0:
            victims = evict(over)
            evictions += over
            for v in victims:
                cached[v] = 0
                tier[v] = None
            while len(tier) > cpu_capacity:
                lost = tier.popitem(last=False)[0]
                drops += 1
                if evicted_at is not None:
                    evicted_at[lost] = r
            size -= over
        for k in new:
            cached[k] = 1
        size += len(new)
        release(kept[::-1])
    return Replay(
        capacity=capacity,
        hits=hits,
        gap=gaps,
        evicted_by=evicted_by,
        evictions=evictions,
        cpu_capacity=cpu_capacity,
        cpu_hits=cpu_hits,
        cpu_drops=drops,
    )
