"""The one protocol every eviction policy implements, and what it may be built from.

A policy keeps the cached blocks that may be evicted, keyed by an int (a block's content key: a dense id in the lab,
a hash in the paged allocator), and picks victims among them. Its caller (kvscope.lab.replay, or the paged
allocator's free queue through kvscope.policies.engine) owns which blocks are cached and tells the policy three
things, which is vLLM's lifecycle of a cached block:

- `pin(keys)`: cached blocks a request now uses (its hits): not evictable until released;
- `release(keys)`: blocks a request lets go, in the order given: a table's tail first, as vLLM frees it. A key the
  policy was not holding is new (just computed and cached); a pinned one was a hit;
- `evict(n)`: choose n evictable blocks, forget them and return their keys (the caller checks n <= len()).

`len(policy)` is the number of evictable blocks. A policy never returns a pinned key. Policies that need more than
the access order (the future, predictions, the prefix tree, arrival times) say so in their registry entry and get
it through `PolicyContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class EvictionPolicy(Protocol):
    def pin(self, keys: Sequence[int]) -> None: ...

    def release(self, keys: Sequence[int]) -> None: ...

    def evict(self, n: int) -> list[int]: ...

    def __len__(self) -> int: ...


@runtime_checkable
class RequestAware(Protocol):
    """A policy that wants to know which request (index in arrival order) the next pin/release belong to."""

    def begin(self, request: int) -> None: ...


@dataclass
class PolicyContext:
    """What a policy may be built from. The lab fills every field; the paged allocator only `capacity`.

    `offsets[r]:offsets[r + 1]` are request r's positions in the flat access arrays (its chain, head first);
    `chains[r]` is request r's chain of keys, head first; `parent[k]` / `depth[k]` describe key k in the prefix
    tree (-1: a root);
    `arrival_s[r]` is request r's arrival; `hints[p]` is per-access side information made by the lab for the
    policies that need it (the next use for the optimum, a predicted bit for the learning-augmented ones)."""

    capacity: int
    offsets: Any = None
    chains: Any = None
    parent: Any = None
    depth: Any = None
    arrival_s: Any = None
    hints: Any = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyEntry:
    """One policy, described once: the CLI's choices, the lab's sweep and the engine adapter all read this."""

    name: str
    description: str  # one line, for --help and the docs
    build: Callable[[PolicyContext], EvictionPolicy]
    # of "tree", "future", "predictions", "time", "request" (a request's blocks handed over together): what it needs
    needs: frozenset[str] = frozenset()
    # "discard" / "phase": which oracle bits the lab feeds it as hints (with their flip probability p)
    predictions: str | None = None
    reference: str = ""  # where the rule comes from

    @property
    def engine_ready(self) -> bool:
        """Usable in the paged allocator: needs nothing beyond the order of pins and releases."""
        return not self.needs


class IndexedSet:
    """A set of ints with O(1) add, remove and uniformly random choice (list + position map): the randomized
    marking policies pick a random unmarked block this way."""

    __slots__ = ("_items", "_pos")

    def __init__(self) -> None:
        self._items: list[int] = []
        self._pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: int) -> bool:
        return key in self._pos

    def add(self, key: int) -> None:
        if key not in self._pos:
            self._pos[key] = len(self._items)
            self._items.append(key)

    def discard(self, key: int) -> bool:
        i = self._pos.pop(key, None)
        if i is None:
            return False
        last = self._items.pop()
        if last != key:
            self._items[i] = last
            self._pos[last] = i
        return True

    def pop_random(self, random: Callable[[], float]) -> int:
        """Remove and return a uniformly random element (`random()` in [0, 1), e.g. random.Random(seed).random)."""
        items, pos = self._items, self._pos
        i = int(random() * len(items))
        key = items[i]
        last = items.pop()
        if last != key:
            items[i] = last
            pos[last] = i
        del pos[key]
        return key

    def drain(self) -> list[int]:
        items = self._items
        self._items = []
        self._pos = {}
        return items
