"""Plain torch reference implementations of every kernel in kvscope.kernels, with the same signatures.

They are the ground truth for the kernel tests and a slow but dependable fallback (any device, no Triton): math in
float32, one sequence at a time, the K/V of a sequence gathered explicitly through its block table or row range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .common import default_scale


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of queries at absolute positions `q_positions` to keys at positions 0..len(k)-1.

    q [n, q_heads, d]; k, v [len, kv_heads, d]; q head h reads kv head h // (q_heads / kv_heads). float32 result;
    a query that sees no key (empty context) gets zeros.
    """
    n, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    key_pos = torch.arange(k.shape[0], device=q.device)
    visible = key_pos[None, :] <= q_positions.to(q.device)[:, None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key: 0/0
    return torch.einsum("hqk,khd->qhd", probs, v)


def gather_paged(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens 0..length-1 of one sequence from a [num_blocks, block_size, kv_heads, d] cache."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = block_table_row[:num_blocks].long()
    return cache[blocks].reshape(num_blocks * block_size, *cache.shape[2:])[:length]


def gather_rows(buf: torch.Tensor, base: int, length: int) -> torch.Tensor:
    return buf[base : base + length]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    scale = default_scale(scale, q.shape[-1])
    result = torch.empty_like(q) if out is None else out
    for b, length in enumerate(seq_lens.tolist()):
        k = gather_paged(k_cache, block_tables[b], length)
        v = gather_paged(v_cache, block_tables[b], length)
        pos = torch.tensor([length - 1])
        result[b] = attend(q[b : b + 1], k, v, pos, scale)[0].to(result.dtype)
    return result


def contiguous_decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    token_base: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    scale = default_scale(scale, q.shape[-1])
    result = torch.empty_like(q) if out is None else out
    for b, (base, length) in enumerate(zip(token_base.tolist(), seq_lens.tolist(), strict=True)):
        k = gather_rows(k_buf, base, length)
        v = gather_rows(v_buf, base, length)
        pos = torch.tensor([length - 1])
        result[b] = attend(q[b : b + 1], k, v, pos, scale)[0].to(result.dtype)
    return result


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    scale = default_scale(scale, q.shape[-1])
    result = torch.empty_like(q) if out is None else out
    cu = cu_seqlens_q.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        start, end = cu[b], cu[b + 1]
        length = ctx + end - start
        k = gather_paged(k_cache, block_tables[b], length)
        v = gather_paged(v_cache, block_tables[b], length)
        pos = torch.arange(ctx, length)
        result[start:end] = attend(q[start:end], k, v, pos, scale).to(result.dtype)
    return result


def contiguous_prefill_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    token_base: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    scale = default_scale(scale, q.shape[-1])
    result = torch.empty_like(q) if out is None else out
    cu = cu_seqlens_q.tolist()
    for b, (base, ctx) in enumerate(zip(token_base.tolist(), context_lens.tolist(), strict=True)):
        start, end = cu[b], cu[b + 1]
        length = ctx + end - start
        k = gather_rows(k_buf, base, length)
        v = gather_rows(v_buf, base, length)
        pos = torch.arange(ctx, length)
        result[start:end] = attend(q[start:end], k, v, pos, scale).to(result.dtype)
    return result


def store_kv_paged(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = key[t]
        v_cache[slot // block_size, slot % block_size] = value[t]


def store_kv_contiguous(
    key: torch.Tensor, value: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, rows: torch.Tensor
) -> None:
    for t, row in enumerate(rows.tolist()):
        if row < 0:
            continue
        k_buf[row] = key[t]
        v_buf[row] = value[t]


def copy_blocks(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor | None,
    src: Sequence[int] | torch.Tensor,
    dst: Sequence[int] | torch.Tensor,
    *,
    block_dim: int = 0,
) -> None:
    dst_pool = src_pool if dst_pool is None else dst_pool
    src_list = src.tolist() if isinstance(src, torch.Tensor) else list(src)
    dst_list = dst.tolist() if isinstance(dst, torch.Tensor) else list(dst)
    for s, d in zip(src_list, dst_list, strict=True):
        dst_pool.select(block_dim, d).copy_(src_pool.select(block_dim, s))
