"""An eviction policy as the paged allocator's queue of cached-idle blocks.

kvscope.alloc.paged keeps its cached-idle blocks in `_idle`, an OrderedDict in LRU order (vLLM's free queue): a
release appends a block (`idle[block] = None`, a table's tail first), a prefix hit revives one (`del idle[block]`)
and an allocation that finds no free block evicts `idle.popitem(last=False)`. `IdleQueue` answers the same calls
from a policy: a release is `policy.release`, a revival `policy.pin`, the eviction `policy.evict(1)`, so the
allocator's rules (and its events) are unchanged and only the victim differs. Without an eviction policy the
allocator keeps its OrderedDict: default runs are vLLM's, block for block.

Keys are the blocks' content hashes (63 bits of them), so a policy's history (ARC's and S3-FIFO's ghosts, LFU's
counts) follows content, not block ids that get reused. Two idle blocks with one hash (the same prompt run twice at
once) are rare; the second is kept aside and evicted first (dropping it loses nothing: its twin stays cached).
Only policies that need nothing but the order of releases and hits (registry entries with no `needs`) plug in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from kvscope.policies import registry
from kvscope.policies.base import EvictionPolicy, PolicyContext, PolicyEntry

_KEY_MASK = (1 << 63) - 1


def engine_policies() -> tuple[str, ...]:
    return tuple(name for name, e in registry.entries().items() if e.engine_ready)


class IdleQueue:
    """The subset of OrderedDict[int, None] the paged allocator uses on `_idle`, backed by a policy."""

    def __init__(self, policy: EvictionPolicy, hash_of: Callable[[int], bytes | None]) -> None:
        self.policy = policy
        self._hash_of = hash_of
        self._block_of: dict[int, int] = {}  # key -> block the policy holds
        self._key_of: dict[int, int] = {}  # idle block -> its key
        self._twins: OrderedDict[int, None] = OrderedDict()  # idle blocks whose key another idle block holds

    def _key(self, block: int) -> int:
        h = self._hash_of(block)
        if h is None:
            raise ValueError(f"eviction policy: block {block} went idle without a hash")
        return int.from_bytes(h[:8], "little") & _KEY_MASK

    def __len__(self) -> int:
        return len(self._key_of)

    def __contains__(self, block: object) -> bool:
        return block in self._key_of

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._key_of))

    def __setitem__(self, block: int, _value: None) -> None:
        key = self._key(block)
        self._key_of[block] = key
        if key in self._block_of:
            self._twins[block] = None
            return
        self._block_of[key] = block
        self.policy.release([key])

    def __delitem__(self, block: int) -> None:
        key = self._key_of.pop(block)
        if block in self._twins:
            del self._twins[block]
            return
        del self._block_of[key]
        self.policy.pin([key])
        # Pinned and never released again (the block leaves the idle queue for good, or returns under a new call):
        # the policy's next release of this key counts as a hit, which is what a revival is.

    def popitem(self, last: bool = True) -> tuple[int, None]:
        if last:
            raise ValueError("eviction policy: only the oldest-first eviction is supported")
        if self._twins:
            block = self._twins.popitem(last=False)[0]
            del self._key_of[block]
            return block, None
        key = self.policy.evict(1)[0]
        block = self._block_of.pop(key)
        del self._key_of[block]
        return block, None


def check_engine_policy(name: str) -> PolicyEntry:
    """The entry of a policy the paged allocator can run; a one-line ValueError for an unknown one or one that needs
    what only the lab has (the future, predictions, the prefix tree)."""
    entry = registry.get(name)
    if not entry.engine_ready:
        raise ValueError(
            f"--eviction {name}: needs {', '.join(sorted(entry.needs))}, which only the lab has "
            f"(engine runs take {', '.join(engine_policies())})"
        )
    return entry


def make_idle_queue(name: str, capacity: int, hash_of: Callable[[int], bytes | None]) -> IdleQueue:
    entry = check_engine_policy(name)
    return IdleQueue(entry.build(PolicyContext(capacity=capacity)), hash_of)
