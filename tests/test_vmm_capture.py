"""The vmm layout lends a scratch page at each buffer's base while CUDA graphs are captured (Triton refuses unmapped
pointers at launch), and leaves the backend exactly as it found it: checked on the host backend's real mmap'd pages;
the capture itself runs in the GPU tests (tests/test_gpu_runs.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvscope.alloc.vmm import VMMAllocator
from kvscope.backends.base import BackendError
from kvscope.backends.host import HostMemory
from kvscope.engine.layout import VmmLayout
from kvscope.recorder import Recorder
from kvscope.spec import get_spec

SPEC = get_spec("tiny")


@pytest.mark.parametrize("admitted", [False, True])
@pytest.mark.parametrize("megacache", [False, True])
def test_capture_pages_are_lent_and_given_back(megacache: bool, admitted: bool) -> None:
    backend = HostMemory()
    page = backend.granularity
    alloc = VMMAllocator(
        SPEC, 64 * page, Recorder(None), backend=backend, max_batch=4, max_len=256, page_size=page, megacache=megacache
    )
    layout = VmmLayout(SPEC, alloc, torch.device("cpu"))
    if admitted:  # slot 0's first pages are the allocator's own: they must stay, and nothing is lent over them
        alloc.admit(0, np.arange(5), 20)
        alloc.append(0, np.arange(5))
    before = backend.live()
    own = {va: backend.mapped_handle(va) for va in alloc.buffer_addresses() if _mapped(backend, va)}
    with layout.mapped_for_capture():
        for va in alloc.buffer_addresses():
            assert _mapped(backend, va), f"buffer base {va:#x} not mapped during the capture"
        layout.keys(0)[:1].zero_()  # the lent pages are real memory (row 0 of layer 0: in the first page)
        lent = backend.live_mappings - before["mappings"]
    assert lent == (0 if admitted else len(alloc.buffer_addresses()))
    assert backend.live() == before
    assert {va: backend.mapped_handle(va) for va in alloc.buffer_addresses() if _mapped(backend, va)} == own
    if admitted:
        alloc.free(0)
    alloc.check_invariants()
    layout.close()
    alloc.close()


def _mapped(backend: HostMemory, va: int) -> bool:
    try:
        backend.mapped_handle(va)
    except BackendError:
        return False
    return True
