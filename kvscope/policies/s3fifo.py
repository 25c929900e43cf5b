"""S3-FIFO (Yang et al., SOSP'23): a small FIFO S (10% of the cache) that new blocks enter, a main FIFO M, and a
ghost FIFO G of keys recently dropped from S; each cached block counts its hits up to 3.

Evicting from S (while S holds at least 10% of the cache): its oldest block moves to M if it was hit more than once
since it entered, else it leaves (its key to G). Evicting from M: its oldest block is reinserted at M's head with
its count decreased while the count is positive, else it leaves. A new block whose key is in G enters M. A pinned
block met at a queue's head is passed over as if it had been hit (reinserted, count kept): a request's own blocks
are never victims.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvscope.policies.base import PolicyContext, PolicyEntry
from kvscope.policies.registry import register

SMALL_FRACTION = 0.1
MAX_FREQ = 3
_PINNED = -1  # _evict_s/_evict_m: passed over a pinned block (keys are >= 0)


class S3FIFO:
    __slots__ = ("capacity", "small_target", "s", "m", "g", "freq", "_pinned")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.small_target = max(1, int(SMALL_FRACTION * self.capacity))
        self.s: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.m: OrderedDict[int, None] = OrderedDict()
        self.g: OrderedDict[int, None] = OrderedDict()
        self.freq: dict[int, int] = {}
        self._pinned: set[int] = set()

    def __len__(self) -> int:
        return len(self.s) + len(self.m) - len(self._pinned)

    def pin(self, keys: Sequence[int]) -> None:
        self._pinned.update(keys)

    def release(self, keys: Sequence[int]) -> None:
        pinned, freq = self._pinned, self.freq
        for k in keys:
            if k in pinned:
                pinned.discard(k)
                f = freq[k]
                if f < MAX_FREQ:
                    freq[k] = f + 1
            else:
                freq[k] = 0
                if k in self.g:
                    del self.g[k]
                    self.m[k] = None
                else:
                    self.s[k] = None

    def evict(self, n: int) -> list[int]:
        out: list[int] = []
        stuck_s = stuck_m = 0  # pinned blocks passed over in a row: a queue holding only pinned blocks is skipped
        while len(out) < n:
            s_ok = bool(self.s) and stuck_s <= len(self.s)
            m_ok = bool(self.m) and stuck_m <= len(self.m)
            use_s = s_ok and (len(self.s) >= self.small_target or not m_ok)
            k = self._evict_s() if use_s else self._evict_m()
            if k == _PINNED:
                if use_s:
                    stuck_s += 1
                else:
                    stuck_m += 1
                continue
            stuck_s = stuck_m = 0  # progress: a block moved, a count went down, or a victim
            if k is not None:
                out.append(k)
        return out

    def _evict_s(self) -> int | None:
        s, freq, pinned = self.s, self.freq, self._pinned
        k = s.popitem(last=False)[0]
        if k in pinned:
            s[k] = None
            return _PINNED
        if freq[k] > 1:
            freq[k] = 0
            self.m[k] = None
            return None
        del freq[k]
        g = self.g
        g[k] = None
        if len(g) > self.capacity - self.small_target:  # G remembers as many keys as M holds
            g.popitem(last=False)
        return k

    def _evict_m(self) -> int | None:
        m, freq, pinned = self.m, self.freq, self._pinned
        k = m.popitem(last=False)[0]
        if k in pinned:
            m[k] = None
            return _PINNED
        f = freq[k]
        if f > 0:
            freq[k] = f - 1
            m[k] = None
            return None
        del freq[k]
        return k


def _build(ctx: PolicyContext) -> S3FIFO:
    return S3FIFO(ctx.capacity)


ENTRY = register(
    PolicyEntry(
        name="s3fifo",
        description="S3-FIFO: small probationary FIFO, main FIFO with reinsertion, ghost FIFO",
        build=_build,
        reference="Yang et al., FIFO queues are all you need for cache eviction, SOSP'23",
    )
)
