"""ARC (Megiddo & Modha, FAST'03): two LRU lists, T1 (seen once recently) and T2 (seen at least twice), with ghost
lists B1 and B2 of keys recently evicted from each, and a target size p for T1 that grows on a B1 ghost hit and
shrinks on a B2 one.

Adapted to the lab's lifecycle: a hit (pin then release) moves a block to T2's MRU end; a new block found in a ghost
list adapts p and enters T2, otherwise it enters T1; `evict` is ARC's REPLACE (T1's LRU end while |T1| exceeds p,
else T2's). Pinned blocks sit outside both lists until released, so |T1| + |T2| counts only evictable blocks. Ghost
lists are trimmed so that |T1| + |B1| <= c and the four lists hold at most 2c keys, as in the paper.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvscope.policies.base import PolicyContext, PolicyEntry
from kvscope.policies.registry import register


class ARC:
    __slots__ = ("c", "p", "t1", "t2", "b1", "b2", "_pinned", "_last_ghost_b2")

    def __init__(self, capacity: int) -> None:
        self.c = max(1, capacity)
        self.p = 0.0
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()
        self._pinned: set[int] = set()
        self._last_ghost_b2 = False

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)

    def pin(self, keys: Sequence[int]) -> None:
        t1, t2, pinned = self.t1, self.t2, self._pinned
        for k in keys:
            if k in t1:
                del t1[k]
            else:
                del t2[k]
            pinned.add(k)

    def release(self, keys: Sequence[int]) -> None:
        pinned, t1, t2, b1, b2 = self._pinned, self.t1, self.t2, self.b1, self.b2
        for k in keys:
            if k in pinned:  # a hit: seen again
                pinned.discard(k)
                t2[k] = None
            elif k in b1:  # recency was too short: favour T1
                self.p = min(float(self.c), self.p + max(1.0, len(b2) / max(1, len(b1))))
                del b1[k]
                self._last_ghost_b2 = False
                t2[k] = None
            elif k in b2:  # frequency list was too short: favour T2
                self.p = max(0.0, self.p - max(1.0, len(b1) / max(1, len(b2))))
                del b2[k]
                self._last_ghost_b2 = True
                t2[k] = None
            else:
                self._last_ghost_b2 = False
                t1[k] = None
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        c, b1, b2 = self.c, self.b1, self.b2
        while b1 and len(self.t1) + len(b1) > c:
            b1.popitem(last=False)
        while b2 and len(self.t1) + len(self.t2) + len(b1) + len(b2) > 2 * c:
            b2.popitem(last=False)

    def evict(self, n: int) -> list[int]:
        out: list[int] = []
        t1, t2 = self.t1, self.t2
        for _ in range(n):
            if t1 and (not t2 or len(t1) > self.p or (self._last_ghost_b2 and len(t1) >= self.p)):
                k = t1.popitem(last=False)[0]
                self.b1[k] = None
            else:
                k = t2.popitem(last=False)[0]
                self.b2[k] = None
            out.append(k)
        self._trim_ghosts()
        return out


def _build(ctx: PolicyContext) -> ARC:
    return ARC(ctx.capacity)


ENTRY = register(
    PolicyEntry(
        name="arc",
        description="adaptive replacement cache: recency and frequency lists with ghosts and an adaptive split",
        build=_build,
        reference="Megiddo & Modha, ARC, FAST'03",
    )
)
