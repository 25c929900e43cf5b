"""Store the new tokens' K and V into the cache: paged (vLLM's reshape_and_cache) or contiguous rows.

Paged: token t goes to slot slot_mapping[t] = block * block_size + offset of k_cache/v_cache [num_blocks, block_size,
kv_heads, head_dim]; a negative slot skips the token (padding). Contiguous (static/VMM): token t goes to row rows[t]
(token_base of its sequence + its position) of k_buf/v_buf [num_rows, kv_heads, head_dim]; negative rows skip.
One program per token moves its whole [kv_heads, head_dim] K and V rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INDEX_DTYPES,
    cache_strides,
    check_cache_layout,
    check_dtype,
    check_float_rows,
    check_index_vector,
    check_kv_pair,
    check_runnable,
    check_shape,
    next_power_of_2,
)


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    PAGED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if PAGED:
        k_row = (slot // PAGE) * stride_kb + (slot % PAGE) * stride_kt
        v_row = (slot // PAGE) * stride_vb + (slot % PAGE) * stride_vt
    else:
        k_row = slot * stride_kt
        v_row = slot * stride_vt
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM) & (slot >= 0)
    k = tl.load(key_ptr + token * stride_key_t + offs_h[:, None] * stride_key_h + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_value_t + offs_h[:, None] * stride_value_h + offs_d[None, :], mask=mask)
    tl.store(k_ptr + k_row + offs_h[:, None] * stride_kh + offs_d[None, :], k, mask=mask)
    tl.store(v_ptr + v_row + offs_h[:, None] * stride_vh + offs_d[None, :], v, mask=mask)


def _store(
    key: torch.Tensor,
    value: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    slots_name: str,
    paged: bool,
) -> None:
    check_runnable(key, value, k, v, slots)
    check_shape("key", key, 3, "[num_tokens, kv_heads, head_dim]")
    if value.shape != key.shape:
        raise ValueError(f"value: shape {tuple(value.shape)} differs from key's {tuple(key.shape)}")
    num_tokens, kv_heads, head_dim = key.shape
    check_kv_pair(k, v)
    if tuple(k.shape[-2:]) != (kv_heads, head_dim):
        raise ValueError(
            f"cache rows are {tuple(k.shape[-2:])} [kv_heads, head_dim], new tokens {(kv_heads, head_dim)}"
        )
    check_float_rows(("key", key), ("value", value), ("k cache", k), ("v cache", v))
    if key.dtype != k.dtype or value.dtype != v.dtype:
        raise ValueError(f"new K/V dtype {key.dtype} differs from the cache's {k.dtype}")
    check_index_vector(slots_name, slots, num_tokens)
    if num_tokens == 0:
        return
    page = k.shape[1] if paged else 1
    block_h, block_d = next_power_of_2(kv_heads), next_power_of_2(head_dim)
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        k,
        v,
        slots,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *cache_strides(paged, k),
        *cache_strides(paged, v),
        NUM_HEADS=kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        PAGE=page,
        PAGED=paged,
        num_warps=max(1, min(8, block_h * block_d // 256)),
    )


def store_kv_paged(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, kv_heads, head_dim] into k_cache/v_cache [num_blocks, block_size, kv_heads,
    head_dim] (any strides, head_dim contiguous) at slot_mapping [num_tokens] (int32/int64, block * block_size +
    offset; negative = skip)."""
    check_cache_layout(True, k_cache, v_cache)
    _store(key, value, k_cache, v_cache, slot_mapping, "slot_mapping", paged=True)


def store_kv_contiguous(
    key: torch.Tensor,
    value: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """Write key/value [num_tokens, kv_heads, head_dim] into rows `rows` [num_tokens] (int32/int64: token_base of the
    sequence + position; negative = skip) of k_buf/v_buf [num_rows, kv_heads, head_dim] (any row stride)."""
    check_cache_layout(False, k_buf, v_buf)
    _store(key, value, k_buf, v_buf, rows, "rows", paged=False)


def contiguous_rows(token_base: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of new tokens in a contiguous cache: token_base[seq_ids] + positions (int64), for `store_kv_contiguous`."""
    check_dtype("token_base", token_base, INDEX_DTYPES)
    return token_base.long()[seq_ids.long()] + positions.long()
