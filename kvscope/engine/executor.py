"""Executors run a step's forward pass; one per device, found by name in a registry.

The engine calls, per step: `execute(plan)` (drain the allocator's pending copies, then compute the batch), then
`after_step(forked, released)` (bookkeeping only). An executor reads where K/V live from the allocator
(`block_table(seq)` for paged, `token_base(seq)` for static and vmm) and never changes allocator state.

    sim   SimExecutor: no tensors; the engine's cost model supplies the step time.
    cpu   TorchExecutor (kvscope.engine.torch_executor) on CPU tensors: a Llama-shaped model with random weights.
    cuda  CudaExecutor (kvscope.engine.cuda_executor): the same model, attention through the Triton kernels.

A new device plugs in with `register_executor(name, factory)`; the factory gets (spec, allocator, options) and
returns an Executor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvscope.alloc.base import KVAllocator
from kvscope.engine.scheduler import Sequence, StepPlan
from kvscope.spec import KVSpec


@dataclass
class ExecResult:
    kernel_ns: int = 0  # device time of the forward pass (CUDA events); 0 when not timed on a device
    kv_bytes_read: int = 0  # K/V bytes attention read


@dataclass
class ExecutorOptions:
    seed: int = 0
    shadow: bool = False  # keep a contiguous copy of every sequence's K/V and check attention against it
    shadow_tolerance: float = 1e-4
    extra: dict[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    device: str  # sim | cpu | cuda
    measured: bool  # True: the engine's clock advances by measured step time; False: by the cost model

    def execute(self, plan: StepPlan) -> ExecResult: ...
    def after_step(self, forked: list[tuple[int, int]], released: list[int]) -> None: ...
    def device_name(self) -> str: ...
    def close(self) -> None: ...


class SimExecutor:
    """No tensors: only the allocator's queued copies are dropped (there is no data to move)."""

    device = "sim"
    measured = False

    def __init__(self, spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions | None = None) -> None:
        self.allocator = allocator
        self.bytes_per_token = spec.bytes_per_token

    def execute(self, plan: StepPlan) -> ExecResult:
        copies = self.allocator.pending_copies
        if copies:
            copies.clear()
        return ExecResult(kv_bytes_read=plan.kv_tokens_read * self.bytes_per_token)

    def after_step(self, forked: list[tuple[int, int]], released: list[int]) -> None:
        pass

    def device_name(self) -> str:
        return "simulated GPU, roofline model"

    def close(self) -> None:
        pass


ExecutorFactory = Callable[[KVSpec, KVAllocator, ExecutorOptions], Executor]


def _make_sim(spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions) -> Executor:
    return SimExecutor(spec, allocator, options)


def _make_cpu(spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions) -> Executor:
    from kvscope.engine.torch_executor import TorchExecutor

    return TorchExecutor(spec, allocator, options, device="cpu")


def _make_cuda(spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions) -> Executor:
    from kvscope.engine.cuda_executor import make_cuda_executor

    return make_cuda_executor(spec, allocator, options)


EXECUTORS: dict[str, ExecutorFactory] = {"sim": _make_sim, "cpu": _make_cpu, "cuda": _make_cuda}


def register_executor(device: str, factory: ExecutorFactory) -> None:
    EXECUTORS[device] = factory


def check_device(device: str) -> None:
    """Raise UserError (one line) when `device` is unknown or cannot run on this machine."""
    from kvscope.cli import UserError

    if device not in EXECUTORS:
        raise UserError(f"--device {device}: unknown device (choose from {', '.join(EXECUTORS)})")
    if device == "cuda":
        from kvscope.cudainfo import probe

        info = probe()
        if not info.available:
            raise UserError(f"--device cuda: {info.reason}")


def make_executor(
    device: str, spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions | None = None
) -> Executor:
    check_device(device)
    return EXECUTORS[device](spec, allocator, options or ExecutorOptions())


__all__ = [
    "EXECUTORS",
    "ExecResult",
    "Executor",
    "ExecutorOptions",
    "Sequence",
    "SimExecutor",
    "check_device",
    "make_executor",
    "register_executor",
]
