"""Record a tensor- (and decode-context-) parallel run: one allocator, one recorder and one trace per rank, one
scheduler for the group (kvscope.parallel.group), on the unchanged Engine.

    from kvscope.engine import RunConfig
    from kvscope.parallel import ParallelConfig, record_group
    result = record_group(requests, RunConfig(allocator="paged"), ParallelConfig(tp=8), path="out/tp8.kvtrace")
    result.paths  # out/tp8.rank0.kvtrace .. out/tp8.rank7.kvtrace

Every rank gets the run's own `--kv-memory` (it is per GPU, as vLLM's gpu_memory_utilization is) and the allocator
the run's options name, built by its registry entry for the rank's shard of the model (its KV heads; under DCP its
share of --max-len, the longest share a sequence puts on one rank). Each rank's metadata is what record_run writes
(engine_config, workload, requests, versions, the allocator's config) plus `rank`, `world_size` and `parallel`
(kvscope.parallel.layout.RankLayout.rank_meta, and the group's capacity in tokens).

The simulated clock advances by one rank's roofline step time: its shard of the weights (query heads, MLP and
vocabulary split over the TP ranks) and, under DCP, its share of every sequence's K/V. Communication (all-reduce,
all-gather of DCP's partial attention) is not modeled. Only `--device sim` runs this way: `--device cpu` would need
one attention shard per rank and `cuda` one process per GPU (README, "Tensor and context parallelism").
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvscope import runmeta
from kvscope.alloc import registry
from kvscope.alloc.base import Closable, KVAllocator
from kvscope.engine.api import RunConfig, make_allocator, make_backend, requests_table
from kvscope.engine.base import Executor
from kvscope.engine.engine import Engine, RunStats
from kvscope.engine.executor import check_device, make_executor
from kvscope.errors import UserError
from kvscope.parallel.files import rank_paths
from kvscope.parallel.group import GroupExecutor, GroupRecorder, local_request, make_group
from kvscope.parallel.layout import ParallelConfig, RankLayout, capacity_tokens_total, plan_layout
from kvscope.recorder import NullRecorder, Recorder
from kvscope.trace import Trace, load_trace, trace_from_recorder
from kvscope.workload import Request

DEVICES = ("sim",)


@dataclass
class GroupResult:
    stats: RunStats  # the group's: steps, requests, tokens; peaks are the ranks' books summed at step ends
    layout: RankLayout
    metas: list[dict[str, Any]]
    paths: list[Path] | None
    recorders: list[Recorder]
    peak_reserved: list[int] = field(default_factory=list)  # per rank, at any instant
    peak_used: list[int] = field(default_factory=list)
    capacity_tokens: list[int] = field(default_factory=list)  # per rank: token slots of its KV memory
    capacity_tokens_total: int = 0

    def traces(self) -> list[Trace]:
        if self.paths is not None:
            return [load_trace(p) for p in self.paths]
        return [trace_from_recorder(rec) for rec in self.recorders]


def check_parallel(cfg: RunConfig, par: ParallelConfig) -> RankLayout:
    """The layout, or one line saying why this run cannot be split so."""
    if cfg.device not in DEVICES:
        raise UserError(
            f"--tp/--dcp run on --device sim (got --device {cfg.device}): one process per GPU is not built yet; "
            "see the README's 'Tensor and context parallelism'"
        )
    layout = plan_layout(cfg.spec(), par)
    if par.dcp > 1 and cfg.prefix_caching:
        raise UserError(
            "--prefix-caching with --dcp: not supported (a hit would have to cover the same positions on every rank)"
        )
    return layout


def _rank_config(cfg: RunConfig, layout: RankLayout) -> RunConfig:
    """What each rank's allocator is built from: the run's options, under DCP with its share of --max-len."""
    if layout.dcp == 1:
        return cfg
    return replace(cfg, max_len=-(-cfg.max_len // layout.dcp))


def record_group(
    requests: SequenceABC[Request],
    cfg: RunConfig,
    par: ParallelConfig,
    *,
    path: str | os.PathLike | None = None,
    workload: dict[str, Any] | None = None,
    progress: bool = False,
    command: str | None = None,
) -> GroupResult:
    """Run `requests` on the ranks of `par`, recording one trace per rank (files beside `path`, or in memory)."""
    cfg.validate()
    check_device(cfg.device)
    layout = check_parallel(cfg, par)
    if not requests:
        raise ValueError("the workload has no requests")
    model = cfg.spec()
    spec = layout.rank_spec()
    rank_cfg = _rank_config(cfg, layout)
    world = layout.world_size
    group_id = uuid.uuid4().hex[:12]
    base = {
        "allocator": cfg.allocator,
        "device": cfg.device,
        "model": model.name,
        "spec": spec.to_dict(),
        "seed": cfg.seed,
        "start_time": runmeta.start_time(),
        "command": command if command is not None else runmeta.command_line(),
        "world_size": world,
    }
    recorders = [Recorder(None, base | {"rank": r}) for r in range(world)]
    needs_backend = registry.get(cfg.allocator).needs_backend
    backends: list[Any] = []
    allocators: list[KVAllocator] = []
    executors: list[Executor] = []
    paths = rank_paths(path, world) if path is not None else None
    try:
        for r in range(world):
            backend = make_backend(cfg.device) if needs_backend else None
            if backend is not None:
                backends.append(backend)
            allocators.append(make_allocator(rank_cfg, spec, recorders[r], backend))
            executors.append(make_executor(cfg.device, spec, allocators[r], rank_cfg.executor_options(allocators[r])))
        capacity = [a.usage().capacity // spec.bytes_per_token for a in allocators]
        total = capacity_tokens_total(capacity, layout.dcp)
        options = cfg.executor_options(allocators[0])
        for r, rec in enumerate(recorders):
            meta = {
                "allocator_config": allocators[r].config(),
                "device_name": runmeta.device_name("sim", cfg.cost_model.name),
                "versions": runmeta.versions(cfg.device),
                "engine_config": cfg.engine_config(options),
                "workload": workload or {"name": "requests", "source": "python", "requests": len(requests)},
                "requests": _rank_requests(requests_table(requests), layout.dcp_rank(r), layout.dcp),
                "parallel": layout.rank_meta(r)
                | {"group_id": group_id, "capacity_tokens": capacity, "capacity_tokens_total": total},
            }
            if paths is not None:
                rec.open(paths[r], meta)
            else:
                rec.update_meta(meta)
        group_rec = GroupRecorder(recorders, allocators, [layout.dcp_rank(r) for r in range(world)], layout.dcp)
        group = make_group(allocators, layout, group_rec)
        engine = Engine(
            requests,
            group,
            GroupExecutor(executors),
            group_rec,  # type: ignore[arg-type]  # the Recorder interface the engine and scheduler use
            spec,
            cfg.scheduler_config(),
            cost_model=cfg.cost_model,
            check_invariants=cfg.check_invariants,
        )
        if layout.dcp > 1:  # a rank reads and writes its share of every sequence's K/V
            engine.costs = replace(engine.costs, kv_bytes_per_token=spec.bytes_per_token // layout.dcp)
        stats = engine.run(progress=progress)
    except BaseException:
        for rec in recorders:
            rec.abort()
        raise
    finally:
        _tear_down(executors, allocators, backends)
    return GroupResult(
        stats=stats,
        layout=layout,
        metas=[dict(rec.meta) for rec in recorders],
        paths=paths,
        recorders=recorders,
        peak_reserved=group_rec.peak_reserved,
        peak_used=group_rec.peak_used,
        capacity_tokens=capacity,
        capacity_tokens_total=total,
    )


def _rank_requests(table: dict[str, list], d: int, dcp: int) -> dict[str, list]:
    """meta['requests'] of DCP rank d: every request as that rank holds it (its share of prompt and final length);
    the whole requests under TP alone."""
    if dcp == 1:
        return table
    local = [local_request(p, o, d, dcp) for p, o in zip(table["prompt_len"], table["output_len"], strict=True)]
    return table | {"prompt_len": [p for p, _ in local], "output_len": [o for _, o in local]}


def _tear_down(executors: list[Executor], allocators: list[KVAllocator], backends: list[Any]) -> None:
    """As kvscope.engine.api's: executors, then allocators, then backends, each even if an earlier one raised."""
    with contextlib.ExitStack() as stack:
        for backend in backends:
            stack.callback(backend.close)
        for alloc in allocators:
            alloc.recorder = NullRecorder()  # teardown is not part of the run
            if isinstance(alloc, Closable):
                stack.callback(alloc.close)
        for ex in executors:
            stack.callback(ex.close)


__all__ = ["DEVICES", "GroupResult", "check_parallel", "record_group"]
