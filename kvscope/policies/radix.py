"""SGLang-style leaf LRU on a radix tree (its RadixCache with page-sized nodes): only a leaf of the tree of cached
blocks can be evicted, the one whose last access is oldest; evicting it may make its parent a leaf.

Each block is a node (the lab gives every key's parent); a request's match and insert stamp every node on its path
with the request's time, as SGLang's last_access_time. A heap of stamp x keys + key (one int: cheaper to compare
than a tuple) over evictable leaves, stale entries
skipped on pop. Pinned nodes (the request's path, SGLang's lock_ref > 0) are never victims. Under the lab's
contract this evicts exactly what vLLM's LRU does (a parent is never older than its children, and vLLM's tail-first
release makes the leaf the least recent of its chain): the lab tests that they agree, block for block.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from kvscope.policies.base import PolicyContext, PolicyEntry
from kvscope.policies.registry import register


class RadixLeafLRU:
    __slots__ = ("_parent", "_children", "_stamp", "_pinned", "_heap", "_now", "_evictable", "_keys")

    def __init__(self, parent) -> None:
        self._parent = parent  # key -> parent key, -1 for a root's child
        self._children: dict[int, int] = {}  # cached key -> number of cached children
        self._stamp: dict[int, int] = {}  # cached key -> last access (request index)
        self._pinned: set[int] = set()
        self._heap: list[int] = []
        self._keys = max(1, len(parent))
        self._now = 0
        self._evictable = 0

    def begin(self, request: int) -> None:
        self._now = request

    def __len__(self) -> int:
        return self._evictable

    def pin(self, keys: Sequence[int]) -> None:
        self._pinned.update(keys)
        self._evictable -= len(keys)

    def release(self, keys: Sequence[int]) -> None:
        pinned, children, stamp, parent = self._pinned, self._children, self._stamp, self._parent
        now = self._now
        for k in keys:  # tail first: a node's child is already in the tree when the node is released
            if k in pinned:
                pinned.discard(k)
            else:
                children[k] = children.get(k, 0)
                p = parent[k]
                if p >= 0:
                    children[p] = children.get(p, 0) + 1
            stamp[k] = now
            self._evictable += 1
            if not children[k]:
                heapq.heappush(self._heap, now * self._keys + k)

    def evict(self, n: int) -> list[int]:
        heap, children, stamp, pinned, parent = self._heap, self._children, self._stamp, self._pinned, self._parent
        out: list[int] = []
        while len(out) < n:
            s, k = divmod(heapq.heappop(heap), self._keys)
            if stamp.get(k) != s or children[k] or k in pinned:
                continue  # stale: touched again, evicted, has children now, or in use
            del stamp[k]
            del children[k]
            out.append(k)
            p = parent[k]
            if p >= 0:
                left = children[p] - 1
                children[p] = left
                if not left and p not in pinned:
                    heapq.heappush(heap, stamp[p] * self._keys + p)
        self._evictable -= len(out)
        return out


def _build(ctx: PolicyContext) -> RadixLeafLRU:
    if ctx.parent is None:
        raise ValueError("policy sglang needs the prefix tree (each block's parent); the lab provides it")
    return RadixLeafLRU(ctx.parent)


ENTRY = register(
    PolicyEntry(
        name="sglang",
        description="SGLang-style leaf LRU on a radix tree: the leaf with the oldest last access",
        build=_build,
        needs=frozenset({"tree"}),
        reference="SGLang RadixCache.evict",
    )
)
