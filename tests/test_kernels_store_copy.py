"""KV store (paged slots, contiguous rows) and batched block copy against the torch reference."""

from __future__ import annotations

import pytest
import torch
from kvscope.kernels import contiguous_rows, copy_blocks, reference, store_kv_contiguous, store_kv_paged
from kvscope.kernels.block_copy import _copy_between_devices
from kvscope.kernels.testing import random_contiguous_kv, random_paged_kv

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize(("block_size", "dtype"), [(1, F16), (16, BF16), (256, F32)])
def test_store_kv_paged_writes_exactly_the_given_slots(device, block_size, dtype):
    gen = torch.Generator().manual_seed(block_size)
    kv = random_paged_kv([300, 20], 2, 16, block_size, dtype, device, generator=gen)
    capacity = kv.k_cache.shape[0] * block_size
    slots = torch.randperm(capacity, generator=gen)[:9]
    slots[[2, 6]] = -1  # padding tokens: skipped
    key = torch.randn(9, 2, 16, generator=gen).to(device=device, dtype=dtype)
    # the new values arrive as a strided view (e.g. a slice of a fused qkv projection)
    value = torch.randn(9, 3, 16, generator=gen).to(device=device, dtype=dtype)[:, 1:]
    expected_pool = kv.pool.clone()

    store_kv_paged(key, value, kv.k_cache, kv.v_cache, slots.to(device))
    reference.store_kv_paged(key, value, expected_pool[1, 0], expected_pool[1, 1], slots)

    assert torch.equal(kv.pool, expected_pool)  # other layers and other slots untouched too


def test_store_kv_contiguous_into_interleaved_rows(device):
    gen = torch.Generator().manual_seed(1)
    kv = random_contiguous_kv([10, 25, 4], 2, 16, BF16, device, generator=gen)
    seq_ids = torch.tensor([0, 1, 1, 2, 0])
    positions = torch.tensor([9, 0, 24, 3, 2])
    rows = contiguous_rows(kv.token_base.cpu(), seq_ids, positions)
    assert rows.tolist() == [int(kv.token_base[s]) + int(p) for s, p in zip(seq_ids, positions, strict=True)]
    rows[1] = -1
    key = torch.randn(5, 2, 16, generator=gen).to(device=device, dtype=BF16)
    value = torch.randn(5, 2, 16, generator=gen).to(device=device, dtype=BF16)
    k_expected, v_expected = kv.k_buf.clone(), kv.v_buf.clone()

    store_kv_contiguous(key, value, kv.k_buf, kv.v_buf, rows.to(device))
    reference.store_kv_contiguous(key, value, k_expected, v_expected, rows)

    assert torch.equal(kv.k_buf, k_expected)
    assert torch.equal(kv.v_buf, v_expected)


def test_store_kv_rejects_a_head_mismatch(device):
    kv = random_paged_kv([4], 2, 16, 4, F32, device)
    key = torch.randn(1, 3, 16).to(device)
    with pytest.raises(ValueError, match="kv_heads"):
        store_kv_paged(key, key, kv.k_cache, kv.v_cache, torch.zeros(1, dtype=torch.int64, device=device))


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_copy_blocks_within_a_layered_pool(device, dtype):
    """Copy-on-write: whole blocks, K and V of every layer, through the [layers, 2, blocks, ...] pool."""
    gen = torch.Generator().manual_seed(2)
    pool = torch.randn(3, 2, 12, 4, 2, 16, generator=gen).to(device=device, dtype=dtype)
    expected = pool.clone()
    src, dst = [5, 0, 11], [2, 9, 4]

    copy_blocks(pool, None, torch.tensor(src, device=device), dst, block_dim=2)
    reference.copy_blocks(expected, None, src, dst, block_dim=2)

    assert torch.equal(pool, expected)
    assert torch.equal(pool[:, :, 2], pool[:, :, 5])


def test_copy_blocks_between_pools_of_different_sizes(device):
    gen = torch.Generator().manual_seed(4)
    gpu_pool = torch.randn(2, 2, 10, 8, 1, 16, generator=gen).to(device)
    swap_pool = torch.zeros(2, 2, 4, 8, 1, 16, device=device)

    copy_blocks(gpu_pool, swap_pool, [7, 1], [0, 3], block_dim=2)

    assert torch.equal(swap_pool[:, :, 0], gpu_pool[:, :, 7])
    assert torch.equal(swap_pool[:, :, 3], gpu_pool[:, :, 1])
    assert torch.count_nonzero(swap_pool[:, :, 1:3]) == 0


def test_cross_device_path_gathers_and_scatters(device):
    # The swap path (GPU pool <-> pinned CPU pool) is plain torch; run it here on whatever device we have.
    gen = torch.Generator().manual_seed(6)
    src_pool = torch.randn(5, 3, 4, generator=gen).to(device)
    dst_pool = torch.zeros(6, 3, 4)
    _copy_between_devices(src_pool, dst_pool, [4, 0], [1, 5], block_dim=0)
    assert torch.equal(dst_pool[1], src_pool[4].cpu())
    assert torch.equal(dst_pool[5], src_pool[0].cpu())
    assert torch.count_nonzero(dst_pool[[0, 2, 3, 4]]) == 0


@pytest.mark.gpu
def test_swap_out_and_in_between_gpu_and_pinned_cpu():
    pool = torch.randn(2, 2, 8, 16, 2, 32, device="cuda", dtype=BF16)
    host = torch.zeros(2, 2, 4, 16, 2, 32, dtype=BF16).pin_memory()
    copy_blocks(pool, host, [6, 3], [0, 1], block_dim=2)
    restored = torch.zeros_like(pool)
    copy_blocks(host, restored, [0, 1], [2, 5], block_dim=2)
    torch.cuda.synchronize()
    assert torch.equal(restored[:, :, 2], pool[:, :, 6])
    assert torch.equal(restored[:, :, 5], pool[:, :, 3])


def test_copy_blocks_rejects_pools_that_disagree(device):
    a = torch.zeros(2, 2, 4, 4, device=device)
    b = torch.zeros(2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="differ in shape"):
        copy_blocks(a, b, [0], [1], block_dim=2)
    with pytest.raises(ValueError, match="source blocks"):
        copy_blocks(a, None, [0, 1], [2], block_dim=2)
    with pytest.raises(ValueError, match="block_dim"):
        copy_blocks(a.transpose(2, 3), None, [0], [1], block_dim=3)
