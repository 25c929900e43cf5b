"""A learned discard predictor that needs no future, driving the discard algorithm (kvscope.policies.discard),
combined with LRU like `discard` (so it is never much worse than LRU).

The predictor learns from reuse-distance history, online, as an engine could: at each access of a block it
predicts "safe to discard" when the block is unlikely to be used again before it would fall out anyway:
- horizon H: how many requests a block stays cached, estimated as capacity / (blocks newly cached per request, an
  exponential moving average of what this policy has inserted);
- a block seen before: safe when its last reuse distance (requests between its last two uses) exceeds H;
- a block seen for the first time: safe when, among first-seen blocks at a similar depth in their prompts (depth
  buckets 0, 1, 2-3, 4-7, ...), fewer than half were used again within H requests so far.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvscope.policies.base import PolicyContext, PolicyEntry
from kvscope.policies.combine import FollowTheBetter
from kvscope.policies.discard import Mark0
from kvscope.policies.lru import LRU
from kvscope.policies.registry import register

_EMA = 0.05  # weight of the newest request in the insertion-rate average


class LearnedDiscard(Mark0):
    __slots__ = ("_capacity", "_bucket", "_last", "_pending", "_first", "_reused", "_rate", "_known")

    def __init__(self, capacity: int, depth, seed: int = 0) -> None:
        super().__init__(None, None, capacity, seed)
        self._capacity = max(1, capacity)
        self._bucket = [d.bit_length() for d in depth]  # depth bucket of every key: 0, 1, 2-3, 4-7, ...
        self._last: dict[int, int] = {}  # key -> request of its latest access
        self._pending: set[int] = set()  # seen once, first reuse not yet seen
        self._first = [0] * 64  # per depth bucket: blocks seen for the first time
        self._reused = [0] * 64  # per depth bucket: of those, reused within the horizon
        self._rate = 1.0  # blocks newly cached per request (EMA)
        self._known: set[int] = set()  # keys this policy holds (pinned or evictable)

    def release(self, keys: Sequence[int]) -> None:
        now = self._now
        horizon = self._capacity / max(self._rate, 1e-9)
        last, pending, bucket_of, first, reused, known = (
            self._last,
            self._pending,
            self._bucket,
            self._first,
            self._reused,
            self._known,
        )
        inserted = 0
        flags: list[int] = []
        for k in keys:
            if k not in known:
                known.add(k)
                inserted += 1
            bucket = bucket_of[k]
            prev = last.get(k)
            if prev is None:
                first[bucket] += 1
                pending.add(k)
                flags.append(2 * reused[bucket] < first[bucket])
            else:
                g = now - prev  # its reuse distance, in requests
                if k in pending:
                    pending.discard(k)
                    if g <= horizon:
                        reused[bucket] += 1
                flags.append(g > horizon)
            last[k] = now
        self._rate += _EMA * (inserted - self._rate)
        self._place(keys, flags)

    def evict(self, n: int) -> list[int]:
        out = super().evict(n)
        self._known.difference_update(out)
        return out


def _build(ctx: PolicyContext) -> FollowTheBetter:
    if ctx.depth is None or ctx.chains is None:
        raise ValueError("policy learned needs each block's depth in its prompt; the lab provides it")
    return FollowTheBetter(LearnedDiscard(ctx.capacity, ctx.depth, ctx.seed), LRU(), ctx.capacity, ctx.chains)


ENTRY = register(
    PolicyEntry(
        name="learned",
        description="discard algorithm fed by a predictor learned online from reuse-distance history (no future)",
        build=_build,
        needs=frozenset({"tree"}),
        reference="kvscope's own predictor; the algorithm is discard's",
    )
)
