"""The CPU tier's copies are real data moves on cpu and cuda: blocks offloaded from the GPU prefix cache and copied
back on a hit hold exactly what was written into them (kvscope.engine.layout.PagedLayout runs the allocator's queued
swap_out / swap_in copies, the tier's blocks after the swap pool's)."""

from __future__ import annotations

import numpy as np
import pytest

from kvscope.alloc.paged import PagedAllocator
from kvscope.spec import get_spec
from kvscope.workload import stream_tokens

torch = pytest.importorskip("torch")

SPEC = get_spec("tiny")
BS = 4
BLOCK = BS * SPEC.bytes_per_token


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("swap_blocks", [0, 3])
def test_offloaded_blocks_come_back_with_their_data(device, swap_blocks):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from kvscope.engine.layout import PagedLayout

    alloc = PagedAllocator(
        SPEC,
        5 * BLOCK,
        block_size=BS,
        enable_prefix_caching=True,
        cpu_swap_bytes=swap_blocks * BLOCK,
        cpu_cache_bytes=6 * BLOCK,
    )
    layout = PagedLayout(SPEC, alloc, torch.device(device))
    assert layout.cpu_pool is not None and layout.cpu_pool.shape[2] == swap_blocks + 6
    gen = torch.Generator().manual_seed(0)
    truth: dict[bytes, torch.Tensor] = {}  # block hash -> the K/V written when it was computed
    names = ["a", "b", "c", "a", "d", "b", "c", "a", "e", "a"]
    checked = 0
    for i, name in enumerate(names):
        prompt = stream_tokens(name, 0, 2 * BS + 1).astype(np.int64)
        hit = alloc.admit(i, prompt, len(prompt) + 1)
        layout.apply(alloc.pending_copies)
        alloc.pending_copies.clear()
        s = alloc._seqs[i]
        for idx in range(hit // BS):  # every hit block, on the GPU or copied back, holds its data
            assert torch.equal(layout.pool[:, :, s.table[idx]].cpu(), truth[s.hashes[idx]])
            checked += 1
        alloc.append(i, prompt[hit:])
        layout.apply(alloc.pending_copies)
        alloc.pending_copies.clear()
        for idx in range(hit // BS, len(s.table)):  # "compute" the new blocks
            data = torch.randn(layout.pool[:, :, 0].shape, generator=gen).to(layout.pool.dtype)
            layout.pool[:, :, s.table[idx]] = data.to(layout.pool.device)
            if idx < len(s.hashes):
                truth[s.hashes[idx]] = data
        alloc.check_invariants()
        alloc.free(i)
    assert alloc.tier_in_bytes > 0 and checked >= 8
