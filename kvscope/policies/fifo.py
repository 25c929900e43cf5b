"""FIFO: evict the block cached longest ago; a hit does not move a block.

Blocks enter in release order (a new chain's tail first, so its tail leaves first and the cache stays prefix-closed
among the blocks of one insertion). A pinned block keeps its place; when it reaches the head while pinned it is
skipped (it stays at the head, the next one goes).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence

from kvscope.policies.base import PolicyEntry
from kvscope.policies.registry import register


class FIFO:
    __slots__ = ("_queue", "_pinned", "_parked", "_free_parked", "_seq")

    def __init__(self) -> None:
        self._queue: OrderedDict[int, None] = OrderedDict()  # oldest insertion first, pinned blocks included
        self._pinned: set[int] = set()
        # Blocks an eviction met at the head while pinned: they keep their place (older than every queued block),
        # in `_parked` with their order; the evictable ones (released since) in a heap by that order. So an
        # eviction never scans the same pinned blocks again (the engine evicts one block at a time).
        self._parked: dict[int, int] = {}
        self._free_parked: list[tuple[int, int]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._queue) + len(self._parked) - len(self._pinned)

    def pin(self, keys: Sequence[int]) -> None:
        self._pinned.update(keys)

    def release(self, keys: Sequence[int]) -> None:
        pinned = self._pinned
        queue = self._queue
        parked = self._parked
        for k in keys:
            if k in pinned:
                pinned.discard(k)
                if k in parked:
                    heapq.heappush(self._free_parked, (parked[k], k))
            else:
                queue[k] = None

    def evict(self, n: int) -> list[int]:
        queue, pinned, parked, free = self._queue, self._pinned, self._parked, self._free_parked
        out: list[int] = []
        while len(out) < n:
            if free:
                seq, k = heapq.heappop(free)
                if parked.get(k) == seq and k not in pinned:  # else stale: pinned again, or gone
                    del parked[k]
                    out.append(k)
                continue
            k = queue.popitem(last=False)[0]
            if k in pinned:
                parked[k] = self._seq
                self._seq += 1
            else:
                out.append(k)
        return out


ENTRY = register(
    PolicyEntry(
        name="fifo",
        description="first in, first out: the block cached longest ago; hits do not refresh",
        build=lambda ctx: FIFO(),
        reference="textbook FIFO",
    )
)
