"""Priority with retention, in TensorRT-LLM's manner (its KvCacheRetentionConfig): every block has a priority from
0 to 100 (35 by default) that may last only a given duration; eviction takes the lowest priority first and the least
recently used within a priority, and a block whose retention has expired competes at the default priority.

Traces carry no priorities, so the lab assigns them by rule (options `retain_tokens`, `priority`,
`duration_s`): a block lying within a prompt's first `retain_tokens` tokens (default: the first block, where
Mooncake's traces put the shared system prompt) gets `priority` (default 80) for `duration_s` seconds after each
use (default: no expiry); every other block gets 35. The rule is ours; the mechanism is TensorRT-LLM's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from kvscope.policies.base import PolicyContext, PolicyEntry
from kvscope.policies.registry import register

DEFAULT_PRIORITY = 35


class RetentionPriority:
    __slots__ = (
        "_high",
        "_low",
        "_expired",
        "_where",
        "_stamp",
        "_clock",
        "_depth",
        "_retain",
        "_arrival",
        "_duration",
        "_now",
        "_until",
    )

    def __init__(self, depth, retain_blocks: int, arrival_s=None, duration_s: float | None = None) -> None:
        # Two priority levels are all the rule makes; within each, least recently used first.
        self._high: OrderedDict[int, None] = OrderedDict()
        self._low: OrderedDict[int, None] = OrderedDict()
        self._expired: OrderedDict[int, None] = OrderedDict()  # high blocks past their retention, oldest first
        self._where: dict[int, OrderedDict[int, None]] = {}
        self._stamp: dict[int, int] = {}
        self._until: dict[int, float] = {}
        self._clock = 0
        self._depth = depth
        self._retain = retain_blocks
        self._arrival = arrival_s
        self._duration = duration_s
        self._now = 0.0

    def begin(self, request: int) -> None:
        if self._arrival is not None:
            self._now = float(self._arrival[request])

    def __len__(self) -> int:
        return len(self._where)

    def pin(self, keys: Sequence[int]) -> None:
        where = self._where
        for k in keys:
            del where.pop(k)[k]

    def release(self, keys: Sequence[int]) -> None:
        depth, retain, where, stamp = self._depth, self._retain, self._where, self._stamp
        high, low = self._high, self._low
        clock = self._clock
        for k in keys:
            clock += 1
            stamp[k] = clock
            level = high if depth[k] < retain else low
            level[k] = None
            where[k] = level
            if level is high and self._duration is not None:
                self._until[k] = self._now + self._duration
        self._clock = clock

    def _expire(self) -> None:
        if self._duration is None:
            return
        high, until, where, expired = self._high, self._until, self._where, self._expired
        while high:
            k = next(iter(high))
            if until[k] > self._now:
                break
            del high[k]
            expired[k] = None
            where[k] = expired

    def evict(self, n: int) -> list[int]:
        self._expire()
        low, expired, high, stamp, where = self._low, self._expired, self._high, self._stamp, self._where
        out: list[int] = []
        for _ in range(n):
            if low and (not expired or stamp[next(iter(low))] < stamp[next(iter(expired))]):
                level = low
            elif expired:
                level = expired
            else:
                level = high
            k = level.popitem(last=False)[0]
            del where[k]
            out.append(k)
        return out


def _build(ctx: PolicyContext) -> RetentionPriority:
    if ctx.depth is None:
        raise ValueError("policy trtllm needs each block's position in its prompt; the lab provides it")
    opts = ctx.options
    block_tokens = int(opts.get("block_tokens", 512))
    retain_tokens = int(opts.get("retain_tokens", block_tokens))
    retain_blocks = max(0, -(-retain_tokens // block_tokens))
    duration = opts.get("duration_s")
    return RetentionPriority(ctx.depth, retain_blocks, ctx.arrival_s, None if duration is None else float(duration))


ENTRY = register(
    PolicyEntry(
        name="trtllm",
        description="TensorRT-LLM-style priorities: a prompt's first block retained at priority 80, others 35, LRU "
        "within a priority",
        build=_build,
        needs=frozenset({"tree", "time"}),
        reference="TensorRT-LLM KvCacheRetentionConfig (priority 0-100, default 35, optional duration)",
    )
)
