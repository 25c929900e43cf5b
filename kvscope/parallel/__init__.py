"""Multi-GPU KV: tensor parallelism (KV heads split or replicated over ranks) and decode context parallelism (tokens
split round-robin over the ranks holding copies of a head), one allocator and one trace per rank.

    layout   ParallelConfig, RankLayout, plan_layout: heads per rank, duplication, token shares, capacity (pure)
    files    NAME.rank{r}.kvtrace beside -o NAME.kvtrace; expand a run's prefix into its rank files (light)
    group    GroupAllocator / GroupRecorder / GroupExecutor: one scheduler over the ranks' allocators
    run      record_group: the run itself, on the engine and the allocator registry

Importing this package does not import the engine; `record_group` and `GroupResult` load it when first used.
"""

from __future__ import annotations

from typing import Any

from kvscope.parallel.files import expand, rank_path, rank_paths
from kvscope.parallel.layout import ParallelConfig, RankLayout, capacity_tokens_total, parallel_config, plan_layout


def __getattr__(name: str) -> Any:
    if name in ("record_group", "GroupResult", "check_parallel"):
        from kvscope.parallel import run

        return getattr(run, name)
    raise AttributeError(f"module 'kvscope.parallel' has no attribute {name!r}")


__all__ = [
    "GroupResult",
    "ParallelConfig",
    "RankLayout",
    "capacity_tokens_total",
    "check_parallel",
    "expand",
    "parallel_config",
    "plan_layout",
    "rank_path",
    "rank_paths",
    "record_group",
]
