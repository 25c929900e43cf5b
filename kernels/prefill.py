"""Prefill attention: a chunk of new tokens per sequence attends causally to the cached context and to itself.

Queries are packed varlen (q [total_new, q_heads, head_dim], sequence b's queries at rows cu_seqlens_q[b] ..
cu_seqlens_q[b+1] - 1). Sequence b already had context_lens[b] tokens cached (prefix-cache hits, earlier chunks of a
chunked prefill); its new K/V are already stored after them, so every key is read through the cache: the paged block
table, or the contiguous rows token_base[b] + position. New token i of sequence b sits at position context_lens[b] + i
and sees keys 0 .. context_lens[b] + i.

One program per (query tile, q head, sequence), FlashAttention-2 style. The key loop runs in two parts: keys every row
of the tile sees (no mask), then the diagonal band (causal mask).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    PrefillConfig,
    cache_args,
    cdiv,
    check_attention_inputs,
    check_cache_layout,
    check_grid_batch,
    check_index_vector,
    check_runnable,
    check_shape,
    default_prefill_config,
    default_scale,
    dot_args,
    next_power_of_2,
    output_like,
)
from .tile_ops import online_softmax_tile, row_offsets, token_slots


# The block-table width changes from step to step: not specialized, so that it never triggers a recompile.
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_tables_ptr,
    token_base_ptr,
    cu_seqlens_q_ptr,
    context_lens_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    PAGED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # Later query tiles see more keys: hand them out first so the short ones fill the tail of the grid.
    m_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    q_head = tl.program_id(1)
    seq = tl.program_id(2)

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    ctx = tl.load(context_lens_ptr + seq)
    m_lo = m_tile * BLOCK_M

    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    md_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + q_head * stride_qh + offs_d[None, :], mask=md_mask, other=0.0)

    kv_head = q_head // GROUP
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    seq_base = 0
    if not PAGED:
        seq_base = tl.load(token_base_ptr + seq).to(tl.int64)

    live = m_lo < q_len
    # Keys before ctx + m_lo are visible to every row of this tile; the band after them needs the causal mask.
    full_end = tl.where(live, (ctx + m_lo) // BLOCK_N * BLOCK_N, 0)
    kv_end = tl.where(live, ctx + tl.minimum(m_lo + BLOCK_M, q_len), 0)
    q_pos = ctx + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, full_end, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < full_end
        block, row = token_slots(pos, n_mask, block_table_row, seq_base, PAGE, PAGED)
        k_rows = row_offsets(block, row, stride_kb, stride_kt, PAGED)
        v_rows = row_offsets(block, row, stride_vb, stride_vt, PAGED)
        acc, l_i, m_i = online_softmax_tile(
            acc,
            l_i,
            m_i,
            q,
            k_head + k_rows[:, None] + offs_d[None, :],
            v_head + v_rows[:, None] + offs_d[None, :],
            n_mask[:, None] & d_mask[None, :],
            n_mask[None, :],
            scale_log2,
            HEAD_DIM != BLOCK_D,
            False,
            DOT_PRECISION,
            UPCAST_DOT,
        )
    for start in range(full_end, kv_end, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < kv_end
        block, row = token_slots(pos, n_mask, block_table_row, seq_base, PAGE, PAGED)
        k_rows = row_offsets(block, row, stride_kb, stride_kt, PAGED)
        v_rows = row_offsets(block, row, stride_vb, stride_vt, PAGED)
        acc, l_i, m_i = online_softmax_tile(
            acc,
            l_i,
            m_i,
            q,
            k_head + k_rows[:, None] + offs_d[None, :],
            v_head + v_rows[:, None] + offs_d[None, :],
            n_mask[:, None] & d_mask[None, :],
            n_mask[None, :] & (pos[None, :] <= q_pos[:, None]),
            scale_log2,
            True,
            True,
            DOT_PRECISION,
            UPCAST_DOT,
        )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    out_ptrs = out_ptr + (q_start + offs_m).to(tl.int64)[:, None] * stride_ot + q_head * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=md_mask)


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor | None,
    token_base: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None,
    max_query_len: int | None,
    out: torch.Tensor | None,
    config: PrefillConfig | None,
) -> torch.Tensor:
    paged = block_tables is not None
    check_runnable(q, k, v, cu_seqlens_q, context_lens, block_tables if paged else token_base)
    shape = check_attention_inputs(q, k, v, "[total_new_tokens, q_heads, head_dim]")
    check_shape("context_lens", context_lens, 1, "[batch]")
    batch = context_lens.shape[0]
    check_index_vector("context_lens", context_lens, batch)
    check_index_vector("cu_seqlens_q", cu_seqlens_q, batch + 1)
    cache = cache_args(paged, k, v, block_tables, token_base, batch, placeholder=context_lens)
    out = output_like(q, out)
    if batch == 0 or q.shape[0] == 0:
        return out
    check_grid_batch(batch)

    config = config or default_prefill_config(shape.head_dim, q.dtype)
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())  # one device sync
    if max_query_len <= 0:
        return out

    grid = (cdiv(max_query_len, config.block_m), shape.num_q_heads, batch)
    _prefill_kernel[grid](
        q,
        k,
        v,
        out,
        cache.block_tables,
        cache.token_base,
        cu_seqlens_q,
        context_lens,
        default_scale(scale, shape.head_dim) * LOG2E,
        *q.stride()[:2],
        *cache.strides,
        *out.stride()[:2],
        GROUP=shape.group,
        HEAD_DIM=shape.head_dim,
        BLOCK_D=max(16, next_power_of_2(shape.head_dim)),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        PAGE=cache.page,
        PAGED=paged,
        **dot_args(q.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


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
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens to their sequence's cached context and to themselves, paged cache.

    q [total_new, q_heads, head_dim]; k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim] (any strides,
    head_dim contiguous; the new tokens' K/V already stored); block_tables int32/int64 [batch, max_blocks]; cu_seqlens_q
    int32/int64 [batch + 1] (sequence b's new tokens are q rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] - 1);
    context_lens int32/int64 [batch] (tokens cached before this chunk). Returns [total_new, q_heads, head_dim] in q's
    dtype (into `out` when given). max_query_len (>= the longest chunk) sizes the grid; without it one device sync
    reads it; it must not be smaller than the longest chunk (the rows past it would not be computed).
    """
    check_cache_layout(True, k_cache, v_cache)
    return _prefill(
        q, k_cache, v_cache, block_tables, None, cu_seqlens_q, context_lens, scale, max_query_len, out, config
    )


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
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Prefill attention over a contiguous cache (static and VMM layouts).

    k_buf, v_buf [num_rows, kv_heads, head_dim] (any row stride); sequence b's token p is row token_base[b] + p
    (token_base int32/int64). Otherwise as `paged_prefill_attention`.
    """
    check_cache_layout(False, k_buf, v_buf)
    return _prefill(q, k_buf, v_buf, None, token_base, cu_seqlens_q, context_lens, scale, max_query_len, out, config)
