"""The engine: continuous-batching scheduler, executors (sim, cpu, cuda) and the Llama-shaped model.

    record_run(requests, RunConfig(...), path=...) -> RunResult    everything `kvscope run` does, from Python
    Engine, Scheduler, SchedulerConfig, SimExecutor, make_executor  the parts, for custom loops and tests

Modules, bottom up: step (Sequence, Work, StepPlan), scheduler, base (the executor protocol), cuda_options, model,
layout (K/V tensors per allocator capability), map_ahead, torch_executor / cuda_executor, executor (the executors by
device), costmodel, engine (the loop), api (RunConfig, record_run). Allocators are built through their registry
entries (kvscope.alloc.registry) and asked what they can do through kvscope.alloc.base's capability protocols.

Importing this package does not import torch (only the cpu/cuda executors do).
"""

from __future__ import annotations

from kvscope.engine.api import RunConfig, RunResult, make_allocator, make_backend, record_run, requests_table
from kvscope.engine.base import ExecResult, Executor, ExecutorOptions
from kvscope.engine.costmodel import GPUCostModel, ModelCosts
from kvscope.engine.cuda_options import CudaOptions
from kvscope.engine.engine import Engine, RunStats, StallError
from kvscope.engine.executor import EXECUTORS, SimExecutor, make_executor, register_executor
from kvscope.engine.scheduler import Scheduler, SchedulerConfig
from kvscope.engine.step import Sequence, StepPlan, Work

__all__ = [
    "EXECUTORS",
    "CudaOptions",
    "Engine",
    "ExecResult",
    "Executor",
    "ExecutorOptions",
    "GPUCostModel",
    "ModelCosts",
    "RunConfig",
    "RunResult",
    "RunStats",
    "Scheduler",
    "SchedulerConfig",
    "Sequence",
    "SimExecutor",
    "StallError",
    "StepPlan",
    "Work",
    "make_allocator",
    "make_backend",
    "make_executor",
    "record_run",
    "register_executor",
    "requests_table",
]
