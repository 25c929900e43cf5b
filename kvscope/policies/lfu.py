"""LFU: evict the cached block used the fewest times since it was cached, the least recently used among equals.

Counts start at 1 when a block is cached and are forgotten when it is evicted (in-cache LFU). A child is never
used without its parent and is released before it, so a parent has at least its child's count and is more recent:
the cache stays prefix-closed. A heap of (count, stamp, key) packed into one int (comparing ints is several times
cheaper than comparing tuples; keys up to 63 bits, stamps up to 2**40), stale entries skipped on pop.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from kvscope.policies.base import PolicyEntry
from kvscope.policies.registry import register

_KEY_BITS = 63
_KEY_MASK = (1 << _KEY_BITS) - 1
_STAMP_BITS = 40
_STAMP_MASK = (1 << _STAMP_BITS) - 1


class LFU:
    __slots__ = ("_count", "_stamp", "_heap", "_clock")

    def __init__(self) -> None:
        self._count: dict[int, int] = {}  # every cached key (pinned or not)
        self._stamp: dict[int, int] = {}  # evictable key -> stamp of its live heap entry
        self._heap: list[int] = []
        self._clock = 0

    def __len__(self) -> int:
        return len(self._stamp)

    def pin(self, keys: Sequence[int]) -> None:
        stamp = self._stamp
        for k in keys:
            del stamp[k]  # its heap entry goes stale

    def release(self, keys: Sequence[int]) -> None:
        count, stamp, heap = self._count, self._stamp, self._heap
        clock = self._clock
        for k in keys:
            c = count.get(k, 0) + 1
            count[k] = c
            clock += 1
            stamp[k] = clock
            heapq.heappush(heap, ((c << _STAMP_BITS) + clock << _KEY_BITS) + k)
        self._clock = clock
        if len(heap) > 4 * len(count) + 64:  # stale entries pile up under hits: rebuild now and then
            self._heap = [((count[k] << _STAMP_BITS) + s << _KEY_BITS) + k for k, s in stamp.items()]
            heapq.heapify(self._heap)

    def evict(self, n: int) -> list[int]:
        heap, stamp, count = self._heap, self._stamp, self._count
        out: list[int] = []
        while len(out) < n:
            e = heapq.heappop(heap)
            k = e & _KEY_MASK
            if stamp.get(k) == (e >> _KEY_BITS) & _STAMP_MASK:
                del stamp[k]
                del count[k]
                out.append(k)
        return out


ENTRY = register(
    PolicyEntry(
        name="lfu",
        description="least frequently used since cached, least recently used among equal counts",
        build=lambda ctx: LFU(),
        reference="textbook in-cache LFU",
    )
)
