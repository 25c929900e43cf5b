"""Triton device functions shared by the decode and prefill kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def token_slots(pos, mask, block_table_row_ptr, seq_base, PAGE: tl.constexpr, PAGED: tl.constexpr):
    """Where tokens `pos` of one sequence live, as int64 (block, row-in-block) pairs.

    Paged: token p is in block block_table[p // PAGE] at row p % PAGE. Contiguous (static/VMM): at row seq_base + p
    (the block is returned as 0 and must be ignored). One lookup per token, so a tile gathers many tokens whatever the
    block size; K and V share the lookup.
    """
    if PAGED:
        block = tl.load(block_table_row_ptr + pos // PAGE, mask=mask, other=0).to(tl.int64)
        row = (pos % PAGE).to(tl.int64)
    else:
        row = (seq_base + pos).to(tl.int64)
        block = row * 0
    return block, row


@triton.jit
def block_tile_slots(start, offs_n, block_table_row_ptr, PAGE: tl.constexpr):
    """`token_slots` of a paged tile that lies in one block (tokens `start + offs_n`, start a multiple of the tile
    size and PAGE a multiple of it, as whole-tile splits make it): one block-table load for the tile, and its
    rows are consecutive."""
    block = tl.load(block_table_row_ptr + start // PAGE).to(tl.int64)
    row = (start % PAGE + offs_n).to(tl.int64)
    return block, row


@triton.jit
def row_offsets(block, row, stride_block, stride_row, PAGED: tl.constexpr):
    """Element offsets of the rows from `token_slots`."""
    if PAGED:  # noqa: SIM108 - a constexpr branch, resolved at compile time
        offsets = block * stride_block + row * stride_row
    else:
        offsets = row * stride_row
    return offsets


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """tl.dot, or (UPCAST_DOT: only in Triton's interpreter, whose tl.dot mishandles bfloat16) a float32 dot."""
    if UPCAST_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b with the accumulator fed to the MMA (no separate add)."""
    if UPCAST_DOT:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return c


@triton.jit
def online_softmax_tile(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    load_mask,
    score_mask,
    scale_log2,
    LOAD_MASKED: tl.constexpr,
    SCORE_MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """One flash-attention step: fold a tile of keys/values into the running (acc, l, m) of each query row.

    Scores live in the log2 domain (scale_log2 = scale * log2(e)) so the exponentials are exp2. Every row must have at
    least one unmasked key in the first tile it sees (callers guarantee it), so m_i is finite from then on.
    """
    if LOAD_MASKED:  # noqa: SIM108 - a constexpr branch, resolved at compile time
        k = tl.load(k_ptrs, mask=load_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * scale_log2
    if SCORE_MASKED:
        s = tl.where(score_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if LOAD_MASKED:  # noqa: SIM108
        v = tl.load(v_ptrs, mask=load_mask, other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST_DOT)
    return acc, l_i, m_new
