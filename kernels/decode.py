"""Decode attention (one new query token per sequence) over a paged or a contiguous KV cache: flash-decoding.

Stage 1 gives each (sequence, kv head, context split) one program. The program loads each K/V tile once for all q heads
of its GQA group (they are the rows of a tl.dot, padded to 16) and keeps an online softmax. With one split the program
writes the normalized output directly; with several, it writes a partial output and its log-sum-exp, and stage 2
(`_decode_reduce_kernel`) merges the splits of each (sequence, q head).

Paged cache: k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim] with any strides (head_dim contiguous),
block_tables [batch, max_blocks]. Contiguous cache (static and VMM layouts): k_buf, v_buf [num_rows, kv_heads,
head_dim], sequence b in rows token_base[b] .. token_base[b] + seq_lens[b] - 1.

Two ways to merge the splits: the merge kernel (default; one program per (sequence, q head), BLOCK_S splits per
load), or fused into stage 1 (the last split of a (sequence, kv head) to finish merges them, counted with an atomic;
one launch, but measured slower on an H200 at small batch, see DecodeConfig). For CUDA graphs the split size can be
read on the device (`split_len`), so that one captured grid serves every context length.

This module is longer than 400 lines: the split kernel, its two merges and the wrapper that plans the split-K grid
belong together (they share the partial-result layout).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    DecodeConfig,
    cache_args,
    cdiv,
    check_attention_inputs,
    check_cache_layout,
    check_grid_batch,
    check_index_vector,
    check_runnable,
    choose_num_splits,
    default_scale,
    dot_args,
    next_power_of_2,
    output_like,
    sm_count,
)
from .decode_tiles import decode_plan
from .tile_ops import block_tile_slots, online_softmax_tile, row_offsets, token_slots

# Integer arguments that change from call to call (split sizes, partial-buffer strides, the block-table width) are
# not specialized: Triton would otherwise compile a new variant whenever one of them becomes 1 or changes its
# divisibility by 16 (a recompile of ~0.5 s in the middle of a measured run). The K/V and partial-output strides stay
# specialized (constant per run, or multiples of the padded head_dim): their divisibility is what lets Triton prove
# 16-byte aligned rows and issue vector loads.
_VARYING = ["tokens_per_split", "stride_bt", "stride_lb", "stride_lh"]


@triton.jit(do_not_specialize=_VARYING)
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_tables_ptr,
    token_base_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    counters_ptr,
    split_len_ptr,
    scale_log2,
    tokens_per_split,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    PAGED: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    FUSED: tl.constexpr,
    DEVICE_SPLIT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # kv heads vary fastest: programs running side by side read the neighbouring heads of the same token rows.
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)

    # Token positions in 32 bits whatever the index dtype (int64 from the engine): 64-bit loop arithmetic costs
    # registers, and with them programs per SM.
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    if DEVICE_SPLIT:  # CUDA graphs: the grid is fixed at capture, the split size is read each replay
        tokens_per_split = tl.load(split_len_ptr).to(tl.int32)
        # whole tiles, whatever the caller stored: a tile in one block must start at a multiple of BLOCK_N
        tokens_per_split = (tokens_per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, seq_len)
    # The last split runs to the end even if max_seq_len was underestimated: never silently drop tokens.
    hi = tl.where(split == tl.num_programs(1) - 1, seq_len, hi)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q_heads = kv_head * GROUP + offs_g
    gd_mask = g_mask[:, None] & d_mask[None, :]

    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :], mask=gd_mask, other=0.0
    )

    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    seq_base = 0
    if not PAGED:
        seq_base = tl.load(token_base_ptr + seq).to(tl.int64)
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < hi
        if PAGED and PAGE % BLOCK_N == 0:  # the tile is one block's rows: one block-table load, not one a token
            block, row = block_tile_slots(start, offs_n, block_table_row, PAGE)
        else:
            block, row = token_slots(pos, n_mask, block_table_row, seq_base, PAGE, PAGED)
        k_rows = row_offsets(block, row, stride_kb, stride_kt, PAGED)
        v_rows = row_offsets(block, row, stride_vb, stride_vt, PAGED)
        load_mask = n_mask[:, None] & d_mask[None, :]
        acc, l_i, m_i = online_softmax_tile(
            acc,
            l_i,
            m_i,
            q,
            k_head + k_rows[:, None] + offs_d[None, :],
            v_head + v_rows[:, None] + offs_d[None, :],
            load_mask,
            n_mask[None, :],
            scale_log2,
            True,
            True,
            DOT_PRECISION,
            UPCAST_DOT,
        )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # an empty sequence gives zeros, not 0/0
    o = acc / l_safe[:, None]
    if DIRECT_OUT:
        out_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=gd_mask)
    else:
        # Every split writes its log-sum-exp, an empty one (past the end of a short sequence) -inf (its m_i never
        # left -inf) and no partial output: the merge reads all num_splits without knowing seq_len, so its loads
        # depend on nothing but the program id, and weighs the unwritten outputs of empty splits by an exact 0.
        part = part_out_ptr + seq.to(tl.int64) * stride_pb + q_heads.to(tl.int64) * stride_ph + split * stride_ps
        tl.store(part[:, None] + offs_d[None, :], o, mask=gd_mask & (lo < seq_len))
        lse = m_i + tl.log2(l_safe)
        lse_ptrs = part_lse_ptr + seq.to(tl.int64) * stride_lb + q_heads.to(tl.int64) * stride_lh + split
        tl.store(lse_ptrs, lse, mask=g_mask)
        if FUSED:
            # The last split of this (sequence, kv head) to finish merges all of them: one launch instead of two.
            # Every thread's partial stores are done (barrier) before one release-ordered increment publishes them.
            tl.debug_barrier()
            counter = counters_ptr + seq * tl.num_programs(0) + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == tl.num_programs(1) - 1:
                tl.store(counter, 0)  # ready for the next call (or graph replay)
                _merge_splits(
                    part_out_ptr,
                    part_lse_ptr,
                    out_ptr,
                    seq,
                    kv_head,
                    tl.num_programs(1),
                    stride_pb,
                    stride_ph,
                    stride_ps,
                    stride_lb,
                    stride_lh,
                    stride_ob,
                    stride_oh,
                    GROUP,
                    HEAD_DIM,
                    BLOCK_D,
                    BLOCK_S,
                )


@triton.jit
def _merge_row(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    seq,
    q_head,
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BYPASS_L1: tl.constexpr,
):
    """Merge one (sequence, q head)'s `num_splits` partial outputs, BLOCK_S splits per load (a [BLOCK_S, BLOCK_D]
    tile), weighting each by its log-sum-exp (an empty split's -inf weighs 0; all empty gives zeros), and store the
    result. BYPASS_L1: load with .cg, for partials written by other programs of the same launch (the fused merge),
    maybe on other SMs."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    d_mask = offs_d < HEAD_DIM
    row = seq.to(tl.int64) * stride_pb + q_head.to(tl.int64) * stride_ph
    lse_row = part_lse_ptr + seq.to(tl.int64) * stride_lb + q_head.to(tl.int64) * stride_lh
    m = tl.full([1], float("-inf"), tl.float32)
    weight_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s_idx = s0 + offs_s
        s_mask = s_idx < num_splits
        o_ptrs = part_out_ptr + row + s_idx.to(tl.int64)[:, None] * stride_ps + offs_d[None, :]
        o_mask = s_mask[:, None] & d_mask[None, :]
        if BYPASS_L1:
            lse = tl.load(lse_row + s_idx, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
            o = tl.load(o_ptrs, mask=o_mask, other=0.0, cache_modifier=".cg")
        else:
            lse = tl.load(lse_row + s_idx, mask=s_mask, other=float("-inf"))
            o = tl.load(o_ptrs, mask=o_mask, other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf while every split so far is empty
        alpha = tl.exp2(m - m_ref)
        w = tl.exp2(lse - m_ref)  # 0 for empty and masked-off splits
        acc = acc * alpha + tl.sum(tl.where((w > 0.0)[:, None], o, 0.0) * w[:, None], 0)  # unwritten o: any bits
        weight_sum = weight_sum * alpha + tl.sum(w, 0)
        m = m_new
    weight_sum = tl.where(weight_sum == 0.0, 1.0, weight_sum)
    out = acc / weight_sum
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ob + q_head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


@triton.jit
def _merge_splits(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    seq,
    kv_head,
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """The fused merge: the last split of one (sequence, kv head) merges the splits of each q head of its group."""
    for g in tl.static_range(GROUP):
        _merge_row(
            part_out_ptr,
            part_lse_ptr,
            out_ptr,
            seq,
            kv_head * GROUP + g,
            num_splits,
            stride_pb,
            stride_ph,
            stride_ps,
            stride_lb,
            stride_lh,
            stride_ob,
            stride_oh,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_S,
            True,
        )


@triton.jit(do_not_specialize=["num_splits", "stride_lb", "stride_lh"])
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """The separate merge: one program per (sequence, q head)."""
    q_head = tl.program_id(0)
    seq = tl.program_id(1)
    _merge_row(
        part_out_ptr,
        part_lse_ptr,
        out_ptr,
        seq,
        q_head,
        num_splits,
        stride_pb,
        stride_ph,
        stride_ps,
        stride_lb,
        stride_lh,
        stride_ob,
        stride_oh,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_S,
        False,
    )


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """The zeroed int32 arrival counters the fused decode kernel needs, one per (sequence, kv head); each call's
    last program resets its counter, so the buffer is reused by every later call and CUDA-graph replay. It grows
    only outside a graph capture: warm up with the largest batch before capturing."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"kvscope decode: {n} split counters needed during a CUDA-graph capture; run the largest batch "
                "once before capturing"
            )
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def plan_splits(batch: int, kv_heads: int, max_seq_len: int, config: DecodeConfig, device: torch.device) -> int:
    """Context splits per (sequence, kv head) for a call whose longest sequence has max_seq_len tokens."""
    num_tiles = max(1, cdiv(max_seq_len, config.block_n))
    num_splits = config.num_splits or choose_num_splits(batch * kv_heads, num_tiles, sm_count(device))
    num_splits = min(num_splits, num_tiles)
    tokens_per_split = cdiv(num_tiles, num_splits) * config.block_n
    return cdiv(max(max_seq_len, 1), tokens_per_split)


def loop_stages(config: DecodeConfig, paged: bool) -> int:
    """Triton's pipelining depth for the split kernel's loop. config.num_stages is the paged loop's: its block-table
    load takes stages of its own, so 5 gives two K/V buffers and 3 or 4 one. The contiguous loop (no table) gets two
    buffers from 3 and four from 5 (~69 KiB a program at d=128, three programs an SM): it is capped at 3, two
    buffers, what the paged default has."""
    return config.num_stages if paged else min(config.num_stages, 3)


def split_length(max_seq_len: int, num_splits: int, block_n: int) -> int:
    """Tokens per split when num_splits splits share max_seq_len tokens (whole tiles; the last split takes the
    rest): what a graph-captured decode reads from its split_len tensor each replay."""
    return cdiv(max(1, cdiv(max_seq_len, block_n)), num_splits) * block_n


def _decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor | None,
    token_base: torch.Tensor | None,
    seq_lens: torch.Tensor,
    scale: float | None,
    max_seq_len: int | None,
    out: torch.Tensor | None,
    config: DecodeConfig | None,
    split_len: torch.Tensor | None = None,
) -> torch.Tensor:
    paged = block_tables is not None
    device = check_runnable(q, k, v, seq_lens, block_tables if paged else token_base)
    shape = check_attention_inputs(q, k, v, "[batch, q_heads, head_dim]")
    batch, head_dim, kv_heads = q.shape[0], shape.head_dim, shape.kv_heads
    check_index_vector("seq_lens", seq_lens, batch)
    cache = cache_args(paged, k, v, block_tables, token_base, batch, placeholder=seq_lens)
    out = output_like(q, out)
    if batch == 0:
        return out
    check_grid_batch(batch)

    if max_seq_len is None:
        max_seq_len = int(seq_lens.max()) if batch else 0  # one device sync; pass max_seq_len to avoid it
    config = config or decode_plan(batch, kv_heads, max_seq_len, head_dim, q.dtype, device, paged=paged)
    num_splits = plan_splits(batch, kv_heads, max_seq_len, config, device)
    tokens_per_split = split_length(max_seq_len, num_splits, config.block_n)
    device_split = split_len is not None
    if device_split:
        # The grid (num_splits) is fixed, the split size is read on the device: a captured graph stays right for any
        # length up to max_seq_len. One split needs no merge: the last split reads to seq_len whatever split_len holds.
        assert split_len is not None
        check_index_vector("split_len", split_len, 1)

    direct = num_splits == 1
    fused = config.fused and not direct
    block_d = max(16, next_power_of_2(head_dim))
    counters = seq_lens  # placeholder
    if direct:
        part_out = out  # unused
        part_lse = out
        stride_p: tuple[int, ...] = (0, 0, 0, 0, 0)
    else:
        part_out = torch.empty((batch, shape.num_q_heads, num_splits, block_d), dtype=torch.float32, device=device)
        part_lse = torch.empty((batch, shape.num_q_heads, num_splits), dtype=torch.float32, device=device)
        stride_p = (*part_out.stride()[:3], *part_lse.stride()[:2])
        if fused:
            counters = split_counters(device, batch * kv_heads)

    _decode_split_kernel[(kv_heads, num_splits, batch)](
        q,
        k,
        v,
        cache.block_tables,
        cache.token_base,
        seq_lens,
        out,
        part_out,
        part_lse,
        counters,
        split_len if device_split else seq_lens,
        default_scale(scale, head_dim) * LOG2E,
        tokens_per_split,
        *q.stride()[:2],
        *cache.strides,
        *out.stride()[:2],
        *stride_p,
        GROUP=shape.group,
        BLOCK_G=max(16, next_power_of_2(shape.group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=config.block_n,
        PAGE=cache.page,
        PAGED=paged,
        DIRECT_OUT=direct,
        FUSED=fused,
        DEVICE_SPLIT=device_split,
        BLOCK_S=MERGE_SPLITS,
        **dot_args(q.dtype),
        num_warps=config.num_warps,
        num_stages=loop_stages(config, paged),
    )
    if not direct and not fused:
        _decode_reduce_kernel[(shape.num_q_heads, batch)](
            part_out,
            part_lse,
            out,
            num_splits,
            *stride_p,
            *out.stride()[:2],
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=REDUCE_SPLITS,
            num_warps=reduce_warps(block_d),
        )
    return out


#: Splits the fused merge folds per load (a [MERGE_SPLITS, head_dim] fp32 tile per q head).
MERGE_SPLITS = 16
#: Splits the merge kernel folds per load: 64, so that the split counts the heuristic picks (up to ~50 for one long
#: sequence) merge from one [64, head_dim] tile, one round trip to L2 instead of one per 16 splits. Measured on an H200
#: (benchmarks/results/kernels_h200_tune_grid.json, graph mode, 64 splits at 1 x 4K): 16 per load 0.77x SDPA, 64 0.99x.
REDUCE_SPLITS = 64
#: Warps of a merge program. With 8 (fewer registers for the [64, head_dim] tile, but a cross-warp reduction) the
#: same H200 run measured the merge slower: 1 x 4K 0.85x against 0.99x with 4.
REDUCE_WARPS = 4


def reduce_warps(block_d: int) -> int:
    """Warps of a merge program: REDUCE_WARPS, 8 for heads wider than 128 (a [64, 256] fp32 tile is 208 registers a
    thread with 4)."""
    return REDUCE_WARPS if block_d <= 128 else 8


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
    config: DecodeConfig | None = None,
    split_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence to its cached context, read through a block table.

    q [batch, q_heads, head_dim]; k_cache, v_cache [num_blocks, block_size, kv_heads, head_dim] (any strides with a
    contiguous head_dim, e.g. views of a [layers, 2, num_blocks, block_size, kv_heads, head_dim] pool); block_tables
    int32/int64 [batch, max_blocks]; seq_lens int32/int64 [batch] (tokens to attend to, the new one included, so the
    new K/V must already be stored). scale defaults to 1/sqrt(head_dim). Returns [batch, q_heads, head_dim] in q's
    dtype (into `out` when given). max_seq_len (max(seq_lens)) sizes the split-K grid (an underestimate stays
    correct, the last split takes the rest, but loses parallelism) and, without a config, picks the tiles
    (`decode_plan`); without it one device sync reads it. A sequence
    of length 0 gets zeros. split_len (CUDA graphs): a one-element int tensor holding the tokens per split
    (`split_length(longest, num_splits, block_n)`, whole tiles: a tile never straddles two blocks the kernel looks up
    once), read on the device each replay; max_seq_len then fixes the grid (the longest sequence any replay may see).
    """
    check_cache_layout(True, k_cache, v_cache)
    return _decode(q, k_cache, v_cache, block_tables, None, seq_lens, scale, max_seq_len, out, config, split_len)


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
    config: DecodeConfig | None = None,
    split_len: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over a contiguous cache (static and VMM layouts).

    k_buf, v_buf [num_rows, kv_heads, head_dim] (any row stride: the VMM megacache interleaves layers); sequence b
    occupies rows token_base[b] .. token_base[b] + seq_lens[b] - 1 (token_base int32/int64, e.g. slot * max_len).
    Otherwise as `paged_decode_attention`.
    """
    check_cache_layout(False, k_buf, v_buf)
    return _decode(q, k_buf, v_buf, None, token_base, seq_lens, scale, max_seq_len, out, config, split_len)
