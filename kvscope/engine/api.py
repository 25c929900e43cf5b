"""One call to record a run: RunConfig (every `kvscope run` option) + requests -> trace file (or in-memory trace).

    from kvscope.engine import RunConfig, record_run
    result = record_run(requests, RunConfig(allocator="paged", device="sim"), path="out/paged.kvtrace")
    result.stats.finished_requests, result.trace()

The CLI, the demo, the notebook magic and the tests all go through `record_run`, so a trace's metadata is the same
whoever made it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kvscope import runmeta
from kvscope.alloc import registry
from kvscope.alloc.base import Closable, KVAllocator, MapsAhead
from kvscope.alloc.registry import BuildContext
from kvscope.backends.cuda_vmm import CudaMemory
from kvscope.backends.host import HostMemory
from kvscope.backends.sim import SimMemory
from kvscope.engine.base import ExecResult, Executor, ExecutorOptions
from kvscope.engine.costmodel import GPUCostModel, pcie_time_ns
from kvscope.engine.cuda_options import CudaOptions
from kvscope.engine.engine import Engine, RunStats
from kvscope.engine.executor import check_device, make_executor
from kvscope.engine.scheduler import SchedulerConfig
from kvscope.engine.step import StepPlan
from kvscope.recorder import NullRecorder, Recorder
from kvscope.spec import KVSpec, get_spec
from kvscope.trace import Trace, load_trace, trace_from_recorder
from kvscope.workload import Request

ALLOCATORS = registry.names()  # the built-in ones; registry.names() also lists allocators registered later
DEVICES = ("sim", "cpu", "cuda")
DEFAULT_MODEL = {"sim": "llama-3-8b", "cpu": "tiny", "cuda": "llama-3-8b"}
DEFAULT_KV_MEMORY = {"sim": 16 << 30, "cpu": 256 << 20, "cuda": 16 << 30}
DEFAULT_SWAP_SPACE = 4 << 30  # vLLM's default swap_space


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
    page_sharing: bool = True  # vmm: forks map the parent's full pages (False: copy rows)
    static_variant: str | None = None
    eviction: str | None = None  # paged: prefix-cache eviction policy (kvscope.policies; None: vLLM's LRU)
    cpu_cache: int | None = None  # paged: bytes of the prefix cache's CPU tier (None: no tier)
    # cuda executor options (kvscope.engine.cuda_options.CudaOptions; the sim and cpu executors have none)
    attention: str = "triton"  # triton | sdpa (torch SDPA on the contiguous K/V of row-addressed allocators)
    background_map: bool = True  # allocators that map memory (vmm): map the next step's pages during the forward pass
    cuda_graphs: bool = True  # decode-only steps replay CUDA graphs (paged, static); False: --eager
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
        entry = registry.get(self.allocator)
        if self.kv_bytes <= 0:
            raise ValueError(f"--kv-memory: must be positive, got {self.kv_bytes}")
        registry.check_options(self.allocator, self)
        CudaOptions(attention=self.attention)  # a known attention implementation
        if self.attention == "sdpa" and entry.addressing == "blocks":
            contiguous = [e.name for e in registry.entries().values() if e.addressing != "blocks"]
            raise ValueError(
                f"--attention sdpa applies to --allocator {' or '.join(contiguous)} (contiguous K/V), "
                f"not {self.allocator}"
            )
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

    def executor_options(self, allocator: KVAllocator) -> ExecutorOptions:
        """What the executor is built from; background mapping only where the allocator can map ahead."""
        cuda = CudaOptions(
            attention=self.attention,
            background_map=self.background_map and isinstance(allocator, MapsAhead),
            cuda_graphs=self.cuda_graphs,
            max_len=self.max_len,
            max_batch=self.max_batch,
        )
        return ExecutorOptions(seed=self.seed, shadow=self.shadow, cuda=cuda)

    def engine_config(self, options: ExecutorOptions) -> dict[str, Any]:
        """meta['engine_config']: the scheduler's settings, the KV and swap memory, the clock, and the cost model
        (sim) or the cuda executor's options (cuda)."""
        d: dict[str, Any] = {
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
        if self.cpu_cache:
            d["cpu_cache"] = self.cpu_cache
        if self.device == "sim":
            d["cost_model"] = self.cost_model.to_dict()
        elif self.device == "cuda":
            d.update(options.cuda.to_dict())
            d["cuda_graphs"] = options.cuda.cuda_graphs  # decode steps from CUDA graphs (False: --eager)
        return d

    def swap_bytes(self) -> int:
        """The CPU swap pool: --swap-space, else vLLM's 4 GiB default capped at the KV memory; 0 unless preempting by
        swap."""
        if self.preemption != "swap":
            return 0
        return self.swap_space if self.swap_space is not None else min(DEFAULT_SWAP_SPACE, self.kv_bytes)


@dataclass
class RunResult:
    stats: RunStats
    meta: dict[str, Any]
    path: Path | None
    recorder: Recorder

    def trace(self) -> Trace:
        """The recorded trace: loaded from the file, or built from the in-memory recorder."""
        return load_trace(self.path) if self.path is not None else trace_from_recorder(self.recorder)


def make_backend(device: str) -> Any:
    """Physical memory for allocators that map it: bookkeeping on sim, real mmap'd pages on cpu, CUDA VMM on cuda."""
    if device == "sim":
        return SimMemory()
    if device == "cpu":
        return HostMemory()
    return CudaMemory()


def make_allocator(cfg: RunConfig, spec: KVSpec, recorder: Recorder, backend: Any = None) -> KVAllocator:
    """The allocator `cfg` names, built by its registry entry from its own options (kvscope.alloc.registry)."""
    context = BuildContext(
        spec=spec,
        capacity_bytes=cfg.kv_bytes,
        recorder=recorder,
        max_len=cfg.max_len,
        max_batch=cfg.max_batch,
        backend=backend,
    )
    return registry.get(cfg.allocator).make(context, cfg)


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
    backend = make_backend(cfg.device) if registry.get(cfg.allocator).needs_backend else None
    allocator: KVAllocator | None = None
    executor: Executor | None = None
    try:
        allocator = make_allocator(cfg, spec, recorder, backend)
        options = cfg.executor_options(allocator)
        executor = make_executor(cfg.device, spec, allocator, options)
        meta = {
            "allocator_config": allocator.config(),
            "device_name": (
                runmeta.device_name("sim", cfg.cost_model.name) if cfg.device == "sim" else executor.device_name()
            ),
            "versions": runmeta.versions(cfg.device),
            "engine_config": cfg.engine_config(options),
            "workload": workload or {"name": "requests", "source": "python", "requests": len(requests)},
            "requests": requests_table(requests),
        }
        warmup = getattr(executor, "warmup_info", None)
        if warmup:  # the cuda executor's warm-up before the first step: copy ceiling, compiles, graph capture
            meta["warmup"] = warmup
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
        if cfg.device == "sim" and isinstance(allocator, TierTraffic) and allocator.num_tier_blocks:
            engine.executor = PCIeClock(engine, allocator, cfg.cost_model)
        if setup is not None:
            setup(engine)
        stats = engine.run(progress=progress)
    except BaseException:
        recorder.abort()
        raise
    finally:
        _tear_down(executor, allocator, backend)
    if path is not None and cfg.device != "cuda":  # the GPU path imports no plotting code: the digest's does
        _write_digest(Path(path))
    return RunResult(
        stats=stats, meta=dict(recorder.meta), path=Path(path) if path is not None else None, recorder=recorder
    )


def _write_digest(path: Path) -> None:
    """The run's whole-run results into its trace (kvscope.digest), where they pay: a big trace's surfaces then
    read them instead of every event. A failure leaves the trace as recorded (without a digest) and says so."""
    from kvscope import digest

    try:
        if path.stat().st_size >= digest.DIGEST_MIN_BYTES:
            from kvscope import digest_write  # (the analysis and the views' catalog: only for traces that get one)

            digest_write.write_digest(path)
    except Exception as e:  # noqa: BLE001 (the run is recorded; its digest is an extra)
        warnings.warn(f"{path}: no digest written ({type(e).__name__}: {e})", RuntimeWarning, stacklevel=3)


@runtime_checkable
class TierTraffic(Protocol):
    """An allocator that may copy blocks between the GPU and a CPU tier (paged with --cpu-cache): its size in blocks
    and the running totals of bytes copied each way."""

    num_tier_blocks: int
    tier_in_bytes: int
    tier_out_bytes: int


class PCIeClock:
    """--device sim with a CPU tier: the simulated clock also pays, each step, for the copies between the GPU and
    the CPU tier that the step queued (GPUCostModel's pcie_* fields, costmodel.pcie_time_ns), on top of the roofline
    time the engine adds. Wraps the sim executor; everything else is the executor's."""

    measured = False

    def __init__(self, engine: Engine, allocator: TierTraffic, model: GPUCostModel) -> None:
        self.inner, self.engine, self.allocator, self.model = engine.executor, engine, allocator, model
        self.device = self.inner.device
        self._seen = (allocator.tier_in_bytes, allocator.tier_out_bytes)
        self.pcie_ns = 0  # charged so far

    def execute(self, plan: StepPlan) -> ExecResult:
        now = (self.allocator.tier_in_bytes, self.allocator.tier_out_bytes)
        ns = pcie_time_ns(self.model, now[0] - self._seen[0], now[1] - self._seen[1])
        self._seen = now
        self.engine.clock_ns += ns
        self.pcie_ns += ns
        return self.inner.execute(plan)

    def after_step(self, forked: list[tuple[int, int]], released: list[int]) -> None:
        self.inner.after_step(forked, released)

    def device_name(self) -> str:
        return self.inner.device_name()

    def close(self) -> None:
        self.inner.close()


def _tear_down(executor: Any, allocator: Any, backend: Any) -> None:
    """Close the executor, then the allocator, then the backend, each even if an earlier one raised (a failed
    unmap must not leave the backend's reservations behind); an error is raised once all three have run."""
    with contextlib.ExitStack() as stack:
        if backend is not None:
            stack.callback(backend.close)
        if allocator is not None:
            allocator.recorder = NullRecorder()  # teardown (unmapping, releasing) is not part of the run
        if isinstance(allocator, Closable):
            stack.callback(allocator.close)
        if executor is not None:
            stack.callback(executor.close)


__all__ = ["RunConfig", "RunResult", "make_allocator", "make_backend", "record_run", "requests_table"]
