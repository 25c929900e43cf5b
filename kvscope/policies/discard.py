"""Discard predictions (Antoniadis et al., "Paging with Succinct Predictions", ICML'23, their MARK0 setting): with
every access comes one bit saying whether the block is safe to discard, i.e. whether the offline optimum evicts it
before its next use (or never uses it again).

What is implemented (the rules as we read them, restated for the lab's chains; see docs/lab.md):
- a block carries the bit of its latest access;
- marking phases: the access sequence is cut into phases of `capacity` distinct blocks (as a marking algorithm's
  phases); a block accessed in the current phase is marked;
- a victim is, in this order: the block predicted safe that was released longest ago (MARK0 discards such blocks;
  here lazily, when room is needed, which only keeps more); else a uniformly random unmarked block (the marking
  fallback that bounds the damage of blocks wrongly predicted unsafe); else the least recently used block.
With correct bits the victims are blocks the optimum also gives up, so the hit rate approaches the optimum's
(consistency). Wrong "safe" bits make the rule throw away blocks about to be used (at p = 1 it does worse than
LRU), so the registered policy `discard` runs this rule combined with LRU (kvscope.policies.combine: follow whichever
has missed less so far, lazily): it is within a constant factor of the better of the two on any input (robustness).
The paper builds robustness into its algorithm instead; we did not recover its exact rule (docs/lab.md says what
differs).

The bits come as `hints` (one per flat access position): the lab's oracle (kvscope.lab.oracle), flipped with
probability p, or a learned predictor (kvscope.policies.learned).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence

from kvscope.policies.base import IndexedSet, PolicyContext, PolicyEntry
from kvscope.policies.combine import FollowTheBetter
from kvscope.policies.lru import LRU
from kvscope.policies.registry import register


class PhaseClock:
    """Marking phases over the access sequence: a new phase starts at the access of the (capacity + 1)-th distinct
    block since the current phase began. `touch` returns True when that access starts a new phase."""

    __slots__ = ("capacity", "seen")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.seen: set[int] = set()

    def touch(self, key: int) -> bool:
        seen = self.seen
        if key in seen:
            return False
        if len(seen) >= self.capacity:
            seen.clear()
            seen.add(key)
            return True
        seen.add(key)
        return False


class Mark0:
    __slots__ = ("_bits", "_offsets", "_now", "_safe", "_unmarked", "_marked", "_where", "_clock", "_rng")

    def __init__(self, bits, offsets, capacity: int, seed: int = 0) -> None:
        self._bits = bits
        self._offsets = offsets
        self._now = 0
        self._safe: OrderedDict[int, None] = OrderedDict()  # predicted safe, oldest release first
        self._unmarked = IndexedSet()  # predicted unsafe, not accessed this phase
        self._marked: OrderedDict[int, None] = OrderedDict()  # predicted unsafe, accessed this phase, LRU first
        self._where: dict[int, int] = {}
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
                del self._safe[k]
            elif w == 1:
                self._unmarked.discard(k)
            else:
                del self._marked[k]

    def release(self, keys: Sequence[int]) -> None:
        bits = self._bits
        base = self._offsets[self._now] + len(keys) - 1
        self._place(keys, [bits[base - i] for i in range(len(keys))])

    def _place(self, keys: Sequence[int], safe_bits: Sequence[int]) -> None:
        where, safe, marked, clock = self._where, self._safe, self._marked, self._clock
        # The phase clock sees the request's accesses in prompt order (head first), as the oracle does.
        seen, limit = clock.seen, clock.capacity
        for k in reversed(keys):  # PhaseClock.touch, inlined: this runs for every access
            if k not in seen:
                if len(seen) >= limit:
                    seen.clear()
                    self._new_phase()
                seen.add(k)
        for k, b in zip(keys, safe_bits, strict=True):
            if b:
                safe[k] = None
                where[k] = 0
            else:
                marked[k] = None
                where[k] = 2

    def _new_phase(self) -> None:
        unmarked, where = self._unmarked, self._where
        for k in self._marked:
            unmarked.add(k)
            where[k] = 1
        self._marked.clear()

    def evict(self, n: int) -> list[int]:
        safe, unmarked, marked, where = self._safe, self._unmarked, self._marked, self._where
        out: list[int] = []
        for _ in range(n):
            if safe:
                k = safe.popitem(last=False)[0]
            elif unmarked:
                k = unmarked.pop_random(self._rng.random)
            else:
                k = marked.popitem(last=False)[0]
            del where[k]
            out.append(k)
        return out


def _build(ctx: PolicyContext) -> FollowTheBetter:
    if ctx.hints is None or ctx.offsets is None or ctx.chains is None:
        raise ValueError("policy discard needs a discard prediction per access; the lab makes them")
    return FollowTheBetter(Mark0(ctx.hints, ctx.offsets, ctx.capacity, ctx.seed), LRU(), ctx.capacity, ctx.chains)


ENTRY = register(
    PolicyEntry(
        name="discard",
        description="discard predictions (MARK0-style: blocks predicted safe first, else random unmarked), "
        "combined with LRU for robustness",
        build=_build,
        needs=frozenset({"predictions"}),
        predictions="discard",
        reference="Antoniadis et al., Paging with Succinct Predictions, ICML'23 (discard setting)",
    )
)
