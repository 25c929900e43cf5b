"""The CUDA executor's own options, typed and checked in one place (kvscope.engine.cuda_executor reads them).

They live apart from the executor so that the run's API (RunConfig) and the executor protocol can name them without
importing torch. `to_dict()` is what a cuda run records in its trace's engine_config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTENTION_MODES = ("triton", "sdpa")  # triton: kvscope's kernels; sdpa: torch SDPA on contiguous K/V
KERNEL_IMPLS = ("triton", "reference")  # reference: kvscope.kernels.reference, the same signatures in plain torch


@dataclass(frozen=True)
class CudaOptions:
    attention: str = "triton"
    background_map: bool = True  # map the next step's pages on a thread during the forward pass (allocators that map)
    kernels: str = "triton"
    check: bool | None = None  # compare every attention call with a reference on the same K/V; None: as shadow
    nvml: bool = True  # sample device memory through NVML during the run (on a GPU)
    nvml_interval_s: float = 0.05
    # issue 14: GPU runs that mean what they show
    cuda_graphs: bool = True  # decode-only steps replay CUDA graphs captured per batch bucket (--eager: off)
    warmup: bool = True  # compile the kernels, measure the copy ceiling and capture graphs before the first step
    attention_timing: bool = True  # CUDA events around each layer's attention: STEP_ATTENTION per step
    nvtx: bool = True  # NVTX ranges for Nsight Systems (kvscope.engine.nvtx)
    max_len: int = 2048  # the engine's limits: size the graphs' inputs and their split-K grid
    max_batch: int = 256

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"--attention {self.attention}: choose from {', '.join(ATTENTION_MODES)}")
        if self.kernels not in KERNEL_IMPLS:
            raise ValueError(f"kernels {self.kernels!r}: choose {' or '.join(KERNEL_IMPLS)}")
        if not self.nvml_interval_s > 0:
            raise ValueError(f"nvml_interval_s: must be positive, got {self.nvml_interval_s}")

    def to_dict(self) -> dict[str, Any]:
        """The options a run's engine_config records (the others are for tests and benchmarks)."""
        return {"attention": self.attention, "background_map": self.background_map}
