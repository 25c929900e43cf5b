"""Prefill kernels (packed varlen queries, causal over cached context + themselves) against the torch reference."""

from __future__ import annotations

import pytest
import torch
from kvscope.kernels import (
    PrefillConfig,
    contiguous_prefill_attention,
    paged_decode_attention,
    paged_prefill_attention,
    reference,
    store_kv_paged,
)
from kvscope.kernels.testing import TOLERANCES, cu_seqlens, random_contiguous_kv, random_paged_kv

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SMALL = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=2)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# (context_lens, query_lens, q_heads, kv_heads, head_dim, block_size, dtype, config)
PAGED_CASES = [
    # fresh prompt, prefix-cache hit with one new token, chunk after a context that ends mid-block
    ([0, 5, 33], [40, 1, 17], 4, 1, 32, 16, BF16, None),
    ([3, 0], [20, 9], 8, 1, 16, 1, F16, SMALL),  # 1-token blocks, GQA 8, several query tiles
    ([260, 0], [6, 30], 2, 2, 16, 256, F32, SMALL),  # 256-token blocks, MHA, context past one block
    ([16, 40], [16, 3], 4, 1, 24, 8, F32, SMALL),  # head_dim not a power of two
]


@pytest.mark.parametrize(
    ("context_lens", "query_lens", "q_heads", "kv_heads", "head_dim", "block_size", "dtype", "config"), PAGED_CASES
)
def test_paged_prefill_matches_reference(
    device, context_lens, query_lens, q_heads, kv_heads, head_dim, block_size, dtype, config
):
    gen = torch.Generator().manual_seed(sum(context_lens) + sum(query_lens))
    seq_lens = [c + n for c, n in zip(context_lens, query_lens, strict=True)]
    kv = random_paged_kv(seq_lens, kv_heads, head_dim, block_size, dtype, device, generator=gen)
    q = torch.randn(sum(query_lens), q_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    cu = cu_seqlens(query_lens, device)
    ctx = torch.tensor(context_lens, dtype=torch.int32, device=device)

    out = paged_prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, ctx, config=config)
    ref = reference.paged_prefill_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, cu, ctx)

    _assert_close(out, ref, dtype)


CONTIGUOUS_CASES = [
    ([0, 12], [35, 4], 4, 1, 32, BF16, None),
    ([7, 0, 30], [9, 18, 1], 8, 2, 16, F32, SMALL),
]


@pytest.mark.parametrize(
    ("context_lens", "query_lens", "q_heads", "kv_heads", "head_dim", "dtype", "config"), CONTIGUOUS_CASES
)
def test_contiguous_prefill_matches_reference(
    device, context_lens, query_lens, q_heads, kv_heads, head_dim, dtype, config
):
    gen = torch.Generator().manual_seed(sum(query_lens))
    seq_lens = [c + n for c, n in zip(context_lens, query_lens, strict=True)]
    kv = random_contiguous_kv(seq_lens, kv_heads, head_dim, dtype, device, generator=gen)
    q = torch.randn(sum(query_lens), q_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    cu = cu_seqlens(query_lens, device)
    ctx = torch.tensor(context_lens, dtype=torch.int64, device=device)

    out = contiguous_prefill_attention(q, kv.k_buf, kv.v_buf, kv.token_base, cu, ctx, config=config)
    ref = reference.contiguous_prefill_attention(q, kv.k_buf, kv.v_buf, kv.token_base, cu, ctx)

    _assert_close(out, ref, dtype)


def test_chunked_prefill_then_decode_equals_one_prefill(device):
    """Store K/V chunk by chunk as an engine does; each chunk and the final decode match one whole-prompt prefill."""
    gen = torch.Generator().manual_seed(11)
    prompt, kv_heads, q_heads, head_dim, block_size = 37, 1, 4, 16, 8
    kv = random_paged_kv([prompt + 1], kv_heads, head_dim, block_size, F32, device, generator=gen)
    kv.pool.zero_()  # everything the kernels read must come from store_kv_paged
    keys = torch.randn(prompt + 1, kv_heads, head_dim, generator=gen).to(device)
    values = torch.randn(prompt + 1, kv_heads, head_dim, generator=gen).to(device)
    queries = torch.randn(prompt + 1, q_heads, head_dim, generator=gen).to(device)
    table = kv.block_tables[0].tolist()
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(prompt + 1)])
    slots = slots.to(device)

    chunks = [(0, 20), (20, prompt)]
    outputs = []
    for lo, hi in chunks:
        store_kv_paged(keys[lo:hi], values[lo:hi], kv.k_cache, kv.v_cache, slots[lo:hi])
        cu = cu_seqlens([hi - lo], device)
        ctx = torch.tensor([lo], dtype=torch.int32, device=device)
        outputs.append(paged_prefill_attention(queries[lo:hi], kv.k_cache, kv.v_cache, kv.block_tables, cu, ctx))
    store_kv_paged(keys[prompt:], values[prompt:], kv.k_cache, kv.v_cache, slots[prompt:])
    seq_lens = torch.tensor([prompt + 1], dtype=torch.int32, device=device)
    decoded = paged_decode_attention(queries[prompt:], kv.k_cache, kv.v_cache, kv.block_tables, seq_lens)

    positions = torch.arange(prompt + 1)
    whole = reference.attend(queries, keys, values, positions, head_dim**-0.5)
    torch.testing.assert_close(torch.cat(outputs), whole[:prompt], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(decoded, whole[prompt:], atol=2e-4, rtol=2e-4)


def test_prefill_rejects_mismatched_cu_seqlens(device):
    kv = random_paged_kv([5, 6], 1, 16, 4, F32, device)
    q = torch.randn(11, 2, 16).to(device)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(
            q,
            kv.k_cache,
            kv.v_cache,
            kv.block_tables,
            cu_seqlens([5, 6], device)[:2],
            torch.zeros(2, dtype=torch.int32, device=device),
        )
