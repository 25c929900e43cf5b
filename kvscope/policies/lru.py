"""LRU in vLLM's order (the reference), and the same LRU fed in prompt order (to show why the order matters).

vLLM's free queue: a released table goes to the queue's tail tail-first, so of one request's blocks the chain head
is the most recently used and the tail the least; a hit takes a block out of the queue (pin) and the release puts it
back at the tail. A parent is therefore always more recent than its children and the cache stays prefix-closed: the
victim is always a leaf. `lru-naive` touches a request's blocks head first (what a block-level LRU that knows
nothing of chains does when it sees them in prompt order): heads become the least recent and are evicted first,
orphaning cached tails that can no longer hit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvscope.policies.base import PolicyEntry
from kvscope.policies.registry import register


class LRU:
    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: OrderedDict[int, None] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._queue)

    def pin(self, keys: Sequence[int]) -> None:
        queue = self._queue
        for k in keys:
            del queue[k]

    def release(self, keys: Sequence[int]) -> None:
        self._queue.update(dict.fromkeys(keys))  # appended in order: the last given is the most recent

    def evict(self, n: int) -> list[int]:
        pop = self._queue.popitem
        return [pop(last=False)[0] for _ in range(n)]

    def order(self) -> list[int]:
        """Evictable keys, next victim first (for tests and the engine's invariants)."""
        return list(self._queue)


class PromptOrderLRU(LRU):
    __slots__ = ()

    def release(self, keys: Sequence[int]) -> None:
        super().release(keys[::-1])


ENTRY = register(
    PolicyEntry(
        name="lru",
        description="least recently used, a request's chain head most recent (vLLM's free queue; the default)",
        build=lambda ctx: LRU(),
        reference="vLLM v1 FreeKVCacheBlockQueue",
    )
)
NAIVE = register(
    PolicyEntry(
        name="lru-naive",
        description="least recently used, blocks touched in prompt order (heads evicted first: orphans tails)",
        build=lambda ctx: PromptOrderLRU(),
        needs=frozenset({"request"}),  # it reorders a request's blocks, which an engine hands over one at a time
        reference="textbook LRU over blocks in prompt order",
    )
)
