"""Executors run a step's forward pass; one per device, found by name in a registry.

    sim   SimExecutor: no tensors; the engine's cost model supplies the step time.
    cpu   TorchExecutor (kvscope.engine.torch_executor) on CPU tensors: a Llama-shaped model with random weights.
    cuda  CudaExecutor (kvscope.engine.cuda_executor): the same model, attention through the Triton kernels.

The protocol they serve (Executor, ExecutorOptions, ExecResult) is kvscope.engine.base's. A new device plugs in with
`register_executor(name, factory)`; the factory gets (spec, allocator, options) and returns an Executor. The torch
executors are imported only when their device is asked for (torch is a heavy import).
"""

from __future__ import annotations

from kvscope import cudainfo
from kvscope.alloc.base import KVAllocator
from kvscope.engine.base import ExecResult, Executor, ExecutorFactory, ExecutorOptions
from kvscope.engine.step import StepPlan
from kvscope.errors import UserError
from kvscope.spec import KVSpec


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


def _make_sim(spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions) -> Executor:
    return SimExecutor(spec, allocator, options)


def _make_cpu(spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions) -> Executor:
    from kvscope.engine.torch_executor import TorchExecutor  # torch

    return TorchExecutor(spec, allocator, options, device="cpu")


def _make_cuda(spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions) -> Executor:
    from kvscope.engine.cuda_executor import CudaExecutor  # torch (and triton when the kernels run)

    return CudaExecutor(spec, allocator, options, device="cuda")


EXECUTORS: dict[str, ExecutorFactory] = {"sim": _make_sim, "cpu": _make_cpu, "cuda": _make_cuda}


def register_executor(device: str, factory: ExecutorFactory) -> None:
    EXECUTORS[device] = factory


def check_device(device: str) -> None:
    """Raise UserError (one line) when `device` is unknown or cannot run on this machine."""
    if device not in EXECUTORS:
        raise UserError(f"--device {device}: unknown device (choose from {', '.join(EXECUTORS)})")
    if device == "cuda":
        info = cudainfo.probe()  # through the module: tests stand in for the probe
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
    "SimExecutor",
    "check_device",
    "make_executor",
    "register_executor",
]
