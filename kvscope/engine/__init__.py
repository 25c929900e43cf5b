"""The engine: continuous-batching scheduler, executors (sim, cpu, cuda) and the Llama-shaped model.

    record_run(requests, RunConfig(...), path=...) -> RunResult    everything `kvscope run` does, from Python
    Engine, Scheduler, SchedulerConfig, SimExecutor, make_executor  the parts, for custom loops and tests

Importing this package does not import torch (only the cpu/cuda executors do).
"""

from __future__ import annotations

from kvscope.engine.api import RunConfig, RunResult, make_allocator, make_backend, record_run, requests_table
from kvscope.engine.costmodel import GPUCostModel, ModelCosts
from kvscope.engine.engine import Engine, RunStats, StallError
from kvscope.engine.executor import EXECUTORS, ExecutorOptions, SimExecutor, make_executor, register_executor
from kvscope.engine.scheduler import Scheduler, SchedulerConfig, Sequence, StepPlan, Work

__all__ = [
    "EXECUTORS",
    "Engine",
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
