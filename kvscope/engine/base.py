"""The executor protocol: what the engine asks of an executor each step, and what an executor is built from.

Per step the engine calls `execute(plan)` (drain the allocator's pending copies, then compute the batch) and then
`after_step(forked, released)` (bookkeeping only). An executor reads where K/V live from the allocator through the
capability protocols of kvscope.alloc.base (block tables, base rows, virtual buffers) and never changes allocator
state. This module imports no executor: the executors import it, and kvscope.engine.executor finds them by device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kvscope.alloc.base import KVAllocator
from kvscope.engine.cuda_options import CudaOptions
from kvscope.engine.step import StepPlan
from kvscope.spec import KVSpec


@dataclass
class ExecResult:
    kernel_ns: int = 0  # device time of the forward pass (CUDA events); 0 when not timed on a device
    kv_bytes_read: int = 0  # K/V bytes attention read
    attention_ns: int = 0  # device time of the attention kernels alone (CUDA events per layer); 0 when not timed
    attention_layers: int = 0  # layers whose attention was timed
    graph: bool = False  # the step replayed a captured CUDA graph


@dataclass(frozen=True)
class ExecutorOptions:
    seed: int = 0  # of the model's random weights
    shadow: bool = False  # keep a contiguous copy of every sequence's K/V and check attention against it
    shadow_tolerance: float = 1e-4
    cuda: CudaOptions = field(default_factory=CudaOptions)  # read by the cuda executor only


class Executor(Protocol):
    device: str  # sim | cpu | cuda
    measured: bool  # True: the engine's clock advances by measured step time; False: by the cost model

    def execute(self, plan: StepPlan) -> ExecResult: ...
    def after_step(self, forked: list[tuple[int, int]], released: list[int]) -> None: ...
    def device_name(self) -> str: ...
    def close(self) -> None: ...


ExecutorFactory = Callable[[KVSpec, KVAllocator, ExecutorOptions], Executor]
