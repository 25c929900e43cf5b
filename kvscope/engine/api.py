"""One call to record a run: RunConfig (every `kvscope run` option) + requests -> trace file (or in-memory trace).

    from kvscope.engine import RunConfig, record_run
    result = record_run(requests, RunConfig(allocator="paged", device="sim"), path="out/paged.kvtrace")
    result.stats.finished_requests, result.trace()

The CLI, the demo, the notebook magic and the tests all go through `record_run`, so a trace's metadata is the same
whoever made it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvscope.engine.costmodel import GPUCostModel
from kvscope.engine.engine import Engine, RunStats
from kvscope.engine.executor import ExecutorOptions, check_device, make_executor
from kvscope.engine.scheduler import SchedulerConfig
from kvscope.recorder import NullRecorder, Recorder
from kvscope.spec import KVSpec, get_spec
from kvscope.workload import Request

ALLOCATORS = ("static", "paged", "vmm")
DEVICES = ("sim", "cpu", "cuda")
DEFAULT_MODEL = {"sim": "llama-3-8b", "cpu": "tiny", "cuda": "llama-3-8b"}
DEFAULT_KV_MEMORY = {"sim": 16 << 30, "cpu": 256 << 20, "cuda": 16 << 30}
DEFAULT_SWAP_SPACE = 4 << 30  # vLLM's default swap_space
ATTENTION_MODES = ("triton", "sdpa")  # the cuda executor's attention implementations


@dataclass
class RunConfig:
    allocator: str = "paged"
    device: str = "sim"
    model: str | None = None  # None: llama-3-8b, or tiny on --device cpu
    layers: int | None = None
    kv_memory: int | None = None  # None: 16 GiB, or 256 MiB on --device cpu (real tensors)
    max_len: int = 2048
    max_batch: int = 256
    max_tokens_per_step: int = 8192
    chunked_prefill: bool = False
    preemption: str = "recompute"
    seed: int = 0
    # allocator options (None: the allocator's default; an option given for another allocator is an error)
    block_size: int | None = None
    prefix_caching: bool = False
    swap_space: int | None = None
    page_size: int | None = None
    megacache: bool = False
    eager_pages: int | None = None
    deferred_reclaim: bool = True
    static_variant: str | None = None
    # executor options (ExecutorOptions.extra; the cuda executor reads them, the sim and cpu executors ignore them)
    attention: str = "triton"  # triton | sdpa (torch SDPA on the contiguous K/V of static and vmm)
    background_map: bool = True  # vmm: map the next step's pages on a thread during the forward pass
    # debugging
    shadow: bool = False
    check_invariants: bool = False
    cost_model: GPUCostModel = field(default_factory=GPUCostModel)

    @property
    def kv_bytes(self) -> int:
        return self.kv_memory if self.kv_memory is not None else DEFAULT_KV_MEMORY.get(self.device, 16 << 30)

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL.get(self.device, "llama-3-8b")

    def spec(self) -> KVSpec:
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"--layers: must be a positive integer, got {self.layers}")
        return get_spec(self.model_name, self.layers)

    def validate(self) -> None:
        """One-line ValueError for options that make no sense together."""
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"--allocator {self.allocator}: choose from {', '.join(ALLOCATORS)}")
        if self.kv_bytes <= 0:
            raise ValueError(f"--kv-memory: must be positive, got {self.kv_bytes}")
        only = {
            "paged": [
                ("--block-size", self.block_size is not None),
                ("--prefix-caching", self.prefix_caching),
                ("--preemption swap", self.preemption == "swap"),
                ("--swap-space", self.swap_space is not None),
            ],
            "vmm": [
                ("--page-size", self.page_size is not None),
                ("--megacache", self.megacache),
                ("--eager-pages", self.eager_pages is not None),
                ("--no-deferred-reclaim", not self.deferred_reclaim),
            ],
            "static": [("--static-variant", self.static_variant is not None)],
        }
        for alloc, options in only.items():
            for flag, given in options:
                if given and self.allocator != alloc:
                    raise ValueError(f"{flag} applies to --allocator {alloc}, not {self.allocator}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"--attention {self.attention}: choose from {', '.join(ATTENTION_MODES)}")
        if self.attention == "sdpa" and self.allocator == "paged":
            raise ValueError("--attention sdpa applies to --allocator static or vmm (contiguous K/V), not paged")
        if not self.background_map and self.allocator != "vmm":
            raise ValueError(f"--no-background-map applies to --allocator vmm, not {self.allocator}")
        if self.swap_space is not None and self.preemption != "swap":
            raise ValueError("--swap-space needs --preemption swap")
        SchedulerConfig(self.max_len, self.max_batch, self.max_tokens_per_step, self.chunked_prefill, self.preemption)

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_len=self.max_len,
            max_batch=self.max_batch,
            max_tokens_per_step=self.max_tokens_per_step,
            chunked_prefill=self.chunked_prefill,
            preemption=self.preemption,
        )

    def engine_config(self) -> dict[str, Any]:
        d = {
            "max_len": self.max_len,
            "max_batch": self.max_batch,
            "max_tokens_per_step": self.max_tokens_per_step,
            "chunked_prefill": self.chunked_prefill,
            "preemption": self.preemption,
            "kv_memory": self.kv_bytes,
            "swap_space": self.swap_bytes(),
            "prefix_caching": self.prefix_caching,
            "clock": "simulated" if self.device == "sim" else "measured",
        }
        if self.device == "sim":
            d["cost_model"] = self.cost_model.to_dict()
        elif self.device == "cuda":
            d.update(self.executor_extra())
        return d

    def executor_extra(self) -> dict[str, Any]:
        """ExecutorOptions.extra: the options only the device executors read."""
        return {"attention": self.attention, "background_map": self.background_map and self.allocator == "vmm"}

    def swap_bytes(self) -> int:
        if self.preemption != "swap":
            return 0
        return self.swap_space if self.swap_space is not None else min(DEFAULT_SWAP_SPACE, self.kv_bytes)


@dataclass
class RunResult:
    stats: RunStats
    meta: dict[str, Any]
    path: Path | None
    recorder: Recorder

    def trace(self):
        """The recorded trace: loaded from the file, or built from the in-memory recorder."""
        from kvscope.trace import load_trace, trace_from_recorder

        return load_trace(self.path) if self.path is not None else trace_from_recorder(self.recorder)


def make_backend(device: str) -> Any:
    """Physical memory for the VMM allocator: bookkeeping on sim, real mmap'd pages on cpu, CUDA VMM on cuda."""
    if device == "sim":
        from kvscope.backends.sim import SimMemory

        return SimMemory()
    if device == "cpu":
        from kvscope.backends.host import HostMemory

        return HostMemory()
    from kvscope.backends.cuda_vmm import CudaMemory

    return CudaMemory()


def make_allocator(cfg: RunConfig, spec: KVSpec, recorder: Any, backend: Any = None) -> Any:
    if cfg.allocator == "paged":
        from kvscope.alloc.paged import PagedAllocator

        return PagedAllocator(
            spec,
            cfg.kv_bytes,
            recorder,
            block_size=cfg.block_size or 16,
            enable_prefix_caching=cfg.prefix_caching,
            cpu_swap_bytes=cfg.swap_bytes(),
        )
    if cfg.allocator == "static":
        from kvscope.alloc.static import StaticAllocator

        return StaticAllocator(spec, cfg.kv_bytes, recorder, max_len=cfg.max_len, variant=cfg.static_variant or "max")
    from kvscope.alloc.vmm import DEFAULT_PAGE_SIZE, VMMAllocator

    return VMMAllocator(
        spec,
        cfg.kv_bytes,
        recorder,
        backend=backend,
        max_batch=cfg.max_batch,
        max_len=cfg.max_len,
        page_size=cfg.page_size or DEFAULT_PAGE_SIZE,
        megacache=cfg.megacache,
        eager_pages=cfg.eager_pages or 0,
        deferred_reclaim=cfg.deferred_reclaim,
    )


def requests_table(requests: SequenceABC[Request]) -> dict[str, list]:
    """meta['requests']: column lists; request i runs as sequence i."""
    return {
        "seq": list(range(len(requests))),
        "id": [r.id for r in requests],
        "arrival": [r.arrival for r in requests],
        "prompt_len": [r.prompt_len for r in requests],
        "output_len": [r.output_len for r in requests],
        "n": [r.n for r in requests],
    }


def record_run(
    requests: SequenceABC[Request],
    cfg: RunConfig | None = None,
    *,
    path: str | os.PathLike | None = None,
    workload: dict[str, Any] | None = None,
    progress: bool = False,
    command: str | None = None,
    setup: Any = None,
) -> RunResult:
    """Run `requests` through the configured allocator and device, recording every event.

    path=None keeps the trace in memory (RunResult.trace()). `setup(engine)`, if given, is called after the engine
    is built and before the first step (tests use it to reach the executor or the allocator).
    Raises ValueError / UserError (one line) for bad options, KeyboardInterrupt through (the trace is then cut off
    but readable)."""
    from kvscope import runmeta

    cfg = cfg or RunConfig()
    cfg.validate()
    check_device(cfg.device)
    spec = cfg.spec()
    if not requests:
        raise ValueError("the workload has no requests")
    recorder = Recorder(
        None,
        {
            "allocator": cfg.allocator,
            "device": cfg.device,
            "model": spec.name,
            "spec": spec.to_dict(),
            "seed": cfg.seed,
            "start_time": runmeta.start_time(),
            "command": command if command is not None else runmeta.command_line(),
        },
    )
    backend = make_backend(cfg.device) if cfg.allocator == "vmm" else None
    allocator = executor = None
    try:
        allocator = make_allocator(cfg, spec, recorder, backend)
        executor = make_executor(
            cfg.device, spec, allocator, ExecutorOptions(seed=cfg.seed, shadow=cfg.shadow, extra=cfg.executor_extra())
        )
        meta = {
            "allocator_config": allocator.config(),
            "device_name": (
                runmeta.device_name("sim", cfg.cost_model.name) if cfg.device == "sim" else executor.device_name()
            ),
            "versions": runmeta.versions(cfg.device),
            "engine_config": cfg.engine_config(),
            "workload": workload or {"name": "requests", "source": "python", "requests": len(requests)},
            "requests": requests_table(requests),
        }
        if path is not None:
            recorder.open(path, meta)
        else:
            recorder.update_meta(meta)
        engine = Engine(
            requests,
            allocator,
            executor,
            recorder,
            spec,
            cfg.scheduler_config(),
            cost_model=cfg.cost_model,
            check_invariants=cfg.check_invariants,
        )
        if setup is not None:
            setup(engine)
        stats = engine.run(progress=progress)
    except BaseException:
        recorder.abort()
        raise
    finally:
        if executor is not None:
            executor.close()
        if allocator is not None and hasattr(allocator, "close"):
            allocator.recorder = NullRecorder()  # teardown (unmapping, releasing) is not part of the run
            allocator.close()
        if backend is not None:
            backend.close()
    return RunResult(
        stats=stats, meta=dict(recorder.meta), path=Path(path) if path is not None else None, recorder=recorder
    )


__all__ = ["RunConfig", "RunResult", "make_allocator", "make_backend", "record_run", "requests_table"]
