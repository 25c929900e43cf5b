"""The offline optimum's rule (Belady's MIN), restricted so that the cache stays prefix-closed: evict the block
whose next use is farthest in the future (never used again: farthest of all); among blocks next used by the same
request, the deepest in its chain first. A block's next use is never after its children's (a request using a child
uses its parent), so with that tie rule a parent outlives its children and no hit is lost to a missing parent.

What it is: MIN applied at request granularity under the lab's contract (every missing block is inserted; a request's
own blocks are never victims). It is the classical optimum for single-block requests; for chains it is a strong
bound that the tests check against every other policy, not a proof of optimality (a cache allowed to skip
inserting a block could do better). It needs the future: the lab gives each access's next use as `hints`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from kvscope.policies.base import PolicyContext, PolicyEntry
from kvscope.policies.registry import register


class Belady:
    """hints[p] = index of the next request using the block accessed at flat position p (len(offsets) - 1 when
    none); `evicted_before_use`, when given, gets a 1 at the latest access position of every victim (the discard
    oracle's bits).

    Heap entries are single ints (next use, depth and key packed, so that the smallest is the farthest next use,
    then the deepest block): comparing ints is several times cheaper than comparing tuples, and this heap sees
    every access."""

    __slots__ = (
        "_next",
        "_offsets",
        "_depth",
        "_heap",
        "_live",
        "_last_pos",
        "_now",
        "_record",
        "_keys",
        "_depths",
        "_horizon",
    )

    def __init__(self, next_use, offsets, depth, record=None) -> None:
        self._next = next_use
        self._offsets = offsets
        self._depth = depth
        self._keys = max(1, len(depth))
        self._depths = max(depth, default=0) + 1
        self._horizon = len(offsets)  # next uses are < len(offsets)
        self._heap: list[int] = []
        self._live: dict[int, int] = {}  # evictable key -> next use of its live heap entry
        self._last_pos: dict[int, int] = {}
        self._now = 0
        self._record = record

    def _entry(self, u: int, k: int) -> int:
        return ((self._horizon - u) * self._depths + self._depths - 1 - self._depth[k]) * self._keys + k

    def begin(self, request: int) -> None:
        self._now = request

    def __len__(self) -> int:
        return len(self._live)

    def pin(self, keys: Sequence[int]) -> None:
        live = self._live
        for k in keys:
            del live[k]

    def release(self, keys: Sequence[int]) -> None:
        # keys come tail first: keys[i] is the chain's block len(keys) - 1 - i (the lab releases whole kept prefixes)
        nxt, depth, live, last_pos, heap = self._next, self._depth, self._live, self._last_pos, self._heap
        nkeys, depths, horizon = self._keys, self._depths, self._horizon
        base = self._offsets[self._now] + len(keys) - 1
        push = heapq.heappush
        for i, k in enumerate(keys):
            pos = base - i
            u = nxt[pos]
            live[k] = u
            last_pos[k] = pos
            push(heap, ((horizon - u) * depths + depths - 1 - depth[k]) * nkeys + k)
        if len(heap) > 4 * len(live) + 64:
            self._heap = [self._entry(u, k) for k, u in live.items()]
            heapq.heapify(self._heap)

    def evict(self, n: int) -> list[int]:
        heap, live = self._heap, self._live
        nkeys, depths, horizon = self._keys, self._depths, self._horizon
        pop = heapq.heappop
        out: list[int] = []
        while len(out) < n:
            e = pop(heap)
            k = e % nkeys
            if live.get(k) == horizon - e // nkeys // depths:
                del live[k]
                out.append(k)
        if self._record is not None:
            for k in out:
                self._record[self._last_pos[k]] = 1
        return out


def _build(ctx: PolicyContext) -> Belady:
    if ctx.hints is None or ctx.offsets is None or ctx.depth is None:
        raise ValueError("policy belady needs the future (each access's next use); only the lab can give it")
    return Belady(ctx.hints, ctx.offsets, ctx.depth, ctx.options.get("record"))


ENTRY = register(
    PolicyEntry(
        name="belady",
        description="offline optimum's rule: farthest next use first, deepest first among equals (needs the future)",
        build=_build,
        needs=frozenset({"future", "tree"}),
        reference="Belady, A study of replacement algorithms for a virtual-storage computer, 1966",
    )
)
