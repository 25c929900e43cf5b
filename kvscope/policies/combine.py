"""Robustness by combination: follow whichever of two policies has missed less so far (the standard way to make a
prediction-following policy robust: Fiat et al.'s "follow the better", as used for learning-augmented paging by
Antoniadis et al., "Online metric algorithms with untrusted predictions", ICML'20).

Both candidates run in shadow on the same requests under the lab's contract (ShadowCache). The real cache follows
the leader lazily: when it needs room it evicts blocks the leader does not hold, in the order the leader dropped
them, so it converges on the leader's cache without extra misses for blocks both hold. The leader changes only
when it has missed a quarter of the capacity more than the other (hysteresis: no switching back and forth on
noise). So the leader is never more than that margin behind the better candidate, and each switch costs the real
cache at most one refill (`capacity` misses) while it converges; the tests check misses <= the better candidate's +
2 x capacity on the shared traces. This is a bound up to additive refills, not the paper's multiplicative one.
It needs each request's chain up front (the lab's `chains`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvscope.policies.base import EvictionPolicy, RequestAware


class ShadowCache:
    """One policy replaying the lab's contract on its own (kvscope.lab.replay, per request): its cached set and
    misses, and what the last request made it drop and add."""

    __slots__ = ("policy", "capacity", "cached", "size", "misses", "dropped", "added", "_begin")

    def __init__(self, policy: EvictionPolicy, capacity: int) -> None:
        self.policy = policy
        self.capacity = capacity
        self.cached: set[int] = set()
        self.size = 0
        self.misses = 0
        self.dropped: list[int] = []
        self.added: list[int] = []
        # Checked once: a runtime Protocol isinstance costs microseconds, too much per request.
        self._begin = policy.begin if isinstance(policy, RequestAware) else None

    def step(self, request: int, chain: Sequence[int]) -> None:
        cached, policy = self.cached, self.policy
        if self._begin is not None:
            self._begin(request)
        n = len(chain)
        h = 0
        while h < n and chain[h] in cached:
            h += 1
        self.misses += n - h
        kept = chain if n <= self.capacity else chain[: self.capacity]
        rest = kept[h:]
        new = [k for k in rest if k not in cached]
        present = list(kept[:h])
        if len(new) < len(rest):  # cached blocks behind the first miss
            present += [k for k in rest if k in cached]
        if present:
            policy.pin(present)
        over = self.size + len(new) - self.capacity
        self.dropped = policy.evict(over) if over > 0 else []
        cached.difference_update(self.dropped)
        cached.update(new)
        self.size += len(new) - len(self.dropped)
        self.added = new
        if kept:
            policy.release(kept[::-1])


class FollowTheBetter:
    __slots__ = ("shadows", "leader", "switches", "_chains", "_evictable", "_lazy", "_margin")

    def __init__(self, first: EvictionPolicy, second: EvictionPolicy, capacity: int, chains) -> None:
        self.shadows = (ShadowCache(first, capacity), ShadowCache(second, capacity))
        self.leader = 0
        self.switches = 0
        self._margin = max(1, capacity // 4)
        self._chains = chains
        self._evictable: OrderedDict[int, None] = OrderedDict()  # the real cache's evictable blocks, LRU first
        self._lazy: OrderedDict[int, None] = OrderedDict()  # evictable blocks the leader has dropped, oldest first

    def __len__(self) -> int:
        return len(self._evictable)

    def begin(self, request: int) -> None:
        chain = self._chains[request]
        for shadow in self.shadows:
            shadow.step(request, chain)
        lead = self.shadows[self.leader]
        other = self.shadows[1 - self.leader]
        if lead.misses - other.misses > self._margin:
            self.leader = 1 - self.leader
            self.switches += 1
            lead = other
            self._lazy = OrderedDict((k, None) for k in self._evictable if k not in lead.cached)
            return
        lazy, evictable = self._lazy, self._evictable
        for k in lead.dropped:
            if k in evictable:
                lazy[k] = None
        for k in lead.added:
            lazy.pop(k, None)

    def pin(self, keys: Sequence[int]) -> None:
        evictable, lazy = self._evictable, self._lazy
        for k in keys:
            del evictable[k]
            lazy.pop(k, None)

    def release(self, keys: Sequence[int]) -> None:
        # The leader has replayed this request already (begin), so it holds every kept block of it: none is lazy.
        self._evictable.update(dict.fromkeys(keys))

    def evict(self, n: int) -> list[int]:
        evictable, lazy = self._evictable, self._lazy
        out: list[int] = []
        while len(out) < n and lazy:
            k = lazy.popitem(last=False)[0]
            del evictable[k]
            out.append(k)
        while len(out) < n:  # the leader holds all of them: fall back to least recently used
            k = evictable.popitem(last=False)[0]
            out.append(k)
        return out
