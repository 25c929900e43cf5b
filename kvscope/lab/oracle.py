"""Predictions made from the future, with a tunable error: the oracles the learning-augmented policies are fed.

- discard bits (one per access): 1 when the offline optimum's rule (kvscope.policies.belady) at the same capacity
  evicts the block before its next use, or when the block is never used again; 0 when the optimum keeps it;
- phase bits (one per access): the access sequence, requests in arrival order and each chain head first, is cut
  into phases of `capacity` distinct blocks; 1 when the block is accessed in the next phase.
`flip(bits, p, seed)` flips each bit independently with probability p: p = 0 is a perfect oracle, p = 1 one that is
always wrong, p = 0.5 noise.
"""

from __future__ import annotations

import numpy as np

from kvscope.lab.accesses import BlockAccesses
from kvscope.lab.replay import replay
from kvscope.policies.base import PolicyContext
from kvscope.policies.belady import Belady


def discard_bits(acc: BlockAccesses, capacity: int) -> np.ndarray:
    record = np.zeros(acc.num_blocks, dtype=np.int8)
    record_list = record.tolist()  # a list: the policy writes one element per eviction
    ctx = context(acc, capacity, hints=acc.next_use.tolist())
    replay(acc, Belady(ctx.hints, ctx.offsets, ctx.depth, record_list), capacity)
    bits = np.asarray(record_list, dtype=np.int8)
    bits[acc.next_use >= acc.num_requests] = 1
    return bits


def phase_ids(keys: np.ndarray, capacity: int) -> np.ndarray:
    """Phase of every access: a new phase starts at the (capacity + 1)-th distinct key since the last start."""
    out = np.empty(len(keys), dtype=np.int64)
    seen: set[int] = set()
    phase = 0
    for i, k in enumerate(keys.tolist()):
        if k not in seen:
            if len(seen) >= capacity:
                seen.clear()
                phase += 1
            seen.add(k)
        out[i] = phase
    return out


def phase_bits(acc: BlockAccesses, capacity: int) -> np.ndarray:
    keys = acc.keys
    phase = phase_ids(keys, max(1, capacity))
    width = np.int64(acc.num_keys + 1)
    present = np.unique(phase * width + keys)
    wanted = (phase + 1) * width + keys
    i = np.searchsorted(present, wanted)
    i[i >= len(present)] = 0
    return (present[i] == wanted).astype(np.int8)


def flip(bits: np.ndarray, p: float, seed: int = 0) -> np.ndarray:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"--prediction-error: must be a probability in 0..1, got {p}")
    if p == 0.0:
        return bits.copy()
    if p == 1.0:
        return (1 - bits).astype(np.int8)
    rng = np.random.default_rng(seed)
    return (bits ^ (rng.random(len(bits)) < p)).astype(np.int8)


def context(acc: BlockAccesses, capacity: int, *, hints=None, seed: int = 0, options=None) -> PolicyContext:
    """Everything the lab can tell a policy, as the Python lists the policies index one element at a time."""
    return PolicyContext(
        capacity=capacity,
        offsets=acc.offsets.tolist(),
        chains=acc.chains,
        parent=acc.parent.tolist(),
        depth=acc.depth.tolist(),
        arrival_s=acc.arrival_s.tolist(),
        hints=hints,
        seed=seed,
        options=dict(options or {}),
    )
