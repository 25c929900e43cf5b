"""NVTX ranges (torch.cuda.nvtx), so that an Nsight Systems timeline lines up with the kvscope trace: "step N",
"prefill" / "decode" / "mixed" around the forward pass, "attention" around each layer's attention kernels (eager
steps; a graph replay is one "decode (graph)" range), "vmm map" around page mapping. A no-op off CUDA or when
disabled, so the CPU and sim paths pay one attribute check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_enabled = False


def enable(on: bool) -> None:
    """Turn the ranges on (a cuda run with nvtx on) or off; process-wide, like the profiler that reads them."""
    global _enabled
    if on:
        import torch

        on = torch.cuda.is_available()
    _enabled = on


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    if not _enabled:
        yield
        return
    import torch

    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def enabled() -> bool:
    return _enabled
