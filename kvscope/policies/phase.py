"""Phase predictions (Antoniadis et al., "Paging with Succinct Predictions", ICML'23, their MARK&PREDICT): the
access sequence is cut into phases of `capacity` distinct blocks; with every access comes one bit saying whether
the block will be accessed in the next phase.

What is implemented (a marking algorithm, restated for the lab's chains; see docs/lab.md): a block accessed in the
current phase is marked; at a new phase every block is unmarked, keeping the bit of its latest access. A victim is
a uniformly random unmarked block predicted not to be needed in the next phase; else a uniformly random unmarked
block; else (every evictable block marked, which the phase rule makes rare) the least recently used one. Being a
marking algorithm it never evicts a block of the current phase while an older one is left, so wrong bits cost at
most what random marking costs (robustness, the paper's O(log k) with randomization); right bits make it evict the
blocks the next phase does not need (consistency).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

from kvscope.policies.base import IndexedSet, PolicyContext, PolicyEntry
from kvscope.policies.discard import PhaseClock
from kvscope.policies.registry import register


class MarkAndPredict:
    __slots__ = ("_bits", "_offsets", "_now", "_idle", "_needed", "_marked", "_bit", "_where", "_clock", "_rng")

    def __init__(self, bits, offsets, capacity: int, seed: int = 0) -> None:
        self._bits = bits  # 1: accessed again in the next phase
        self._offsets = offsets
        self._now = 0
        self._idle = IndexedSet()  # unmarked, predicted not needed next phase
        self._needed = IndexedSet()  # unmarked, predicted needed
        self._marked: OrderedDict[int, None] = OrderedDict()  # accessed this phase, LRU first
        self._bit: dict[int, int] = {}
        self._where: dict[int, int] = {}  # 0 idle, 1 needed, 2 marked
        self._clock = PhaseClock(capacity)
        self._rng = random.Random(seed)

    def begin(self, request: int) -> None:
        self._now = request

    def __len__(self) -> int:
        return len(self._where)

    def pin(self, keys: Sequence[int]) -> None:
        where = self._where
        for k in keys:
            w = where.pop(k)
            if w == 0:
                self._idle.discard(k)
            elif w == 1:
                self._needed.discard(k)
            else:
                del self._marked[k]

    def release(self, keys: Sequence[int]) -> None:
        bits, bit, where, marked, clock = self._bits, self._bit, self._where, self._marked, self._clock
        base = self._offsets[self._now] + len(keys) - 1
        seen, limit = clock.seen, clock.capacity
        for k in reversed(keys):  # prompt order, as the oracle cuts phases (PhaseClock.touch, inlined)
            if k not in seen:
                if len(seen) >= limit:
                    seen.clear()
                    self._new_phase()
                seen.add(k)
        for i, k in enumerate(keys):
            bit[k] = bits[base - i]
            marked[k] = None
            where[k] = 2

    def _new_phase(self) -> None:
        idle, needed, bit, where = self._idle, self._needed, self._bit, self._where
        for k in self._marked:
            if bit[k]:
                needed.add(k)
                where[k] = 1
            else:
                idle.add(k)
                where[k] = 0
        self._marked.clear()

    def evict(self, n: int) -> list[int]:
        idle, needed, marked, where, bit, rng = (
            self._idle,
            self._needed,
            self._marked,
            self._where,
            self._bit,
            self._rng,
        )
        out: list[int] = []
        for _ in range(n):
            if idle:
                k = idle.pop_random(rng.random)
            elif needed:
                k = needed.pop_random(rng.random)
            else:
                k = marked.popitem(last=False)[0]
            del where[k]
            del bit[k]
            out.append(k)
        return out


def _build(ctx: PolicyContext) -> MarkAndPredict:
    if ctx.hints is None or ctx.offsets is None:
        raise ValueError("policy phase needs a phase prediction per access; the lab makes them")
    return MarkAndPredict(ctx.hints, ctx.offsets, ctx.capacity, ctx.seed)


ENTRY = register(
    PolicyEntry(
        name="phase",
        description="phase predictions (MARK&PREDICT): random unmarked block predicted unneeded next phase first",
        build=_build,
        needs=frozenset({"predictions"}),
        predictions="phase",
        reference="Antoniadis et al., Paging with Succinct Predictions, ICML'23 (phase setting)",
    )
)
