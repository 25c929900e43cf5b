"""Batched block copy: copy-on-write of shared blocks, and swapping blocks between the GPU pool and a CPU pool.

A pool is any tensor with a block axis (`block_dim`), e.g. the engine's [layers, 2, num_blocks, block_size, kv_heads,
head_dim] pool with block_dim=2: one copy moves a block's K and V in every layer. The axes before the block axis must
flatten to one strided axis and the axes after it to one contiguous run (true of a contiguous pool and of views that
slice the leading axes). Copies on one device go through a Triton kernel; copies between devices (swap out to pinned
CPU memory, swap in) through torch's index_select/index_copy_.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .common import INTERPRETED, cdiv, check_runnable

_COPY_TILE = 4096  # elements a program moves: 8 KiB of bf16


@triton.jit
def _copy_blocks_kernel(
    src_ptr,
    dst_ptr,
    src_ids_ptr,
    dst_ids_ptr,
    inner,
    src_stride_outer,
    src_stride_block,
    dst_stride_outer,
    dst_stride_block,
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0)
    outer = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    src_block = tl.load(src_ids_ptr + pair).to(tl.int64)
    dst_block = tl.load(dst_ids_ptr + pair).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    data = tl.load(src_ptr + outer * src_stride_outer + src_block * src_stride_block + offs, mask=mask)
    tl.store(dst_ptr + outer * dst_stride_outer + dst_block * dst_stride_block + offs, data, mask=mask)


def _as_outer_block_inner(name: str, pool: torch.Tensor, block_dim: int) -> torch.Tensor:
    """The pool as a [outer, num_blocks, inner] view (inner contiguous), or a one-line error."""
    if not 0 <= block_dim < pool.dim():
        raise ValueError(f"{name}: block_dim {block_dim} out of range for a {pool.dim()}-D pool")
    outer = 1
    for size in pool.shape[:block_dim]:
        outer *= size
    inner = 1
    for size in pool.shape[block_dim + 1 :]:
        inner *= size
    try:
        view = pool.view(outer, pool.shape[block_dim], inner)
    except RuntimeError:
        raise ValueError(
            f"{name}: shape {tuple(pool.shape)} with strides {pool.stride()} cannot be viewed as "
            f"[outer, blocks, inner] around block_dim {block_dim}"
        ) from None
    if inner > 1 and view.stride(2) != 1:
        raise ValueError(f"{name}: the axes after block_dim must be contiguous, got strides {pool.stride()}")
    return view


def _as_index(name: str, ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D int32/int64 tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
        return ids.to(device=device, dtype=torch.int64).contiguous()
    return torch.tensor(list(ids), dtype=torch.int64, device=device)


def copy_blocks(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor | None,
    src: Sequence[int] | torch.Tensor,
    dst: Sequence[int] | torch.Tensor,
    *,
    block_dim: int = 0,
) -> None:
    """Copy block src[i] of src_pool to block dst[i] of dst_pool (dst_pool None: the same pool), for every i.

    Within one pool, no block may be both a source and a destination (copy-on-write never needs that); the copies of
    one call are unordered. Pools must agree in shape except along block_dim, and in dtype. Block ids are not
    bounds-checked on the device.
    """
    dst_pool = src_pool if dst_pool is None else dst_pool
    if src_pool.dtype != dst_pool.dtype:
        raise ValueError(f"copy_blocks: pools differ in dtype: {src_pool.dtype} vs {dst_pool.dtype}")
    same_shape = src_pool.dim() == dst_pool.dim() and all(
        a == b for i, (a, b) in enumerate(zip(src_pool.shape, dst_pool.shape, strict=True)) if i != block_dim
    )
    if not same_shape:
        raise ValueError(
            f"copy_blocks: pools differ in shape outside block_dim {block_dim}: "
            f"{tuple(src_pool.shape)} vs {tuple(dst_pool.shape)}"
        )
    if src_pool.device != dst_pool.device:
        _copy_between_devices(src_pool, dst_pool, src, dst, block_dim)
        return
    src_view = _as_outer_block_inner("src_pool", src_pool, block_dim)
    dst_view = _as_outer_block_inner("dst_pool", dst_pool, block_dim)
    device = src_pool.device
    src_ids = _as_index("src", src, device)
    dst_ids = _as_index("dst", dst, device)
    if src_ids.shape != dst_ids.shape:
        raise ValueError(f"copy_blocks: {src_ids.numel()} source blocks but {dst_ids.numel()} destinations")
    if src_ids.numel() == 0:
        return
    if device.type == "cpu" and not INTERPRETED:
        # Plain CPU pools (no interpreter): torch does it directly.
        dst_view[:, dst_ids] = src_view[:, src_ids]
        return
    check_runnable(src_pool, dst_pool)
    outer, _, inner = src_view.shape
    block = min(_COPY_TILE, triton.next_power_of_2(inner))
    grid = (src_ids.numel(), outer, cdiv(inner, block))
    _copy_blocks_kernel[grid](
        src_view,
        dst_view,
        src_ids,
        dst_ids,
        inner,
        src_view.stride(0),
        src_view.stride(1),
        dst_view.stride(0),
        dst_view.stride(1),
        BLOCK=block,
        num_warps=4 if block >= 1024 else 1,
    )


def _copy_between_devices(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    src: Sequence[int] | torch.Tensor,
    dst: Sequence[int] | torch.Tensor,
    block_dim: int,
) -> None:
    # Gather on the source device, one transfer, scatter on the destination device. Blocking on purpose: a
    # non-blocking device-to-host copy would let the CPU-side index_copy_ read the buffer before it lands.
    src_ids = _as_index("src", src, src_pool.device)
    dst_ids = _as_index("dst", dst, dst_pool.device)
    if src_ids.numel() != dst_ids.numel():
        raise ValueError(f"copy_blocks: {src_ids.numel()} source blocks but {dst_ids.numel()} destinations")
    if src_ids.numel() == 0:
        return
    gathered = src_pool.index_select(block_dim, src_ids).to(dst_pool.device)
    dst_pool.index_copy_(block_dim, dst_ids, gathered)
