"""Shared pieces of the Triton kernel wrappers: tile configs and their heuristics, input checks, launch helpers.

Kernels run compiled on CUDA tensors, or in Triton's interpreter on CPU tensors when TRITON_INTERPRET=1 was set before
the kernel modules were imported (tests/conftest.py does that on machines without a GPU). Which of the two we got is
decided once, at import, by what `triton.jit` returned.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _probe_kernel(x_ptr):
    tl.store(x_ptr, 0)


#: True when `triton.jit` built interpreted functions (TRITON_INTERPRET=1 at import): kernels take CPU tensors.
INTERPRETED: bool = not isinstance(_probe_kernel, triton.runtime.JITFunction)

#: Pretend SM count in interpreter mode: small, so that the default split-K heuristic still splits in tests.
_INTERPRETER_SMS = 4

#: Largest grid size along CUDA's y and z axes (the batch axis of the attention grids).
MAX_GRID_YZ = 65535

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class DecodeConfig:
    """Tiling of the split-K decode kernel.

    block_n: tokens per loop iteration (independent of the KV block size: with 1-token blocks a tile still gathers
    block_n tokens). num_splits: context partitions per (sequence, kv head); None lets the heuristic fill the SMs.
    fused: the last split to finish merges the partial results (one launch); False (default): a second kernel
    merges them, one program per (sequence, q head). Measured on an H200 (benchmarks/results/kernels_h200.json):
    the fused merge, serial in one program per kv head, made small-batch decode slower (1 x 4K: 0.41x SDPA against
    0.67x with the merge kernel, both graph-captured), so it is off by default.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None
    fused: bool = False

    def __post_init__(self) -> None:
        _check_tile("DecodeConfig.block_n", self.block_n)
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"DecodeConfig.num_splits must be >= 1, got {self.num_splits}")


@dataclass(frozen=True)
class PrefillConfig:
    """Tiling of the causal prefill kernel: block_m query tokens per program, block_n keys per loop iteration."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self) -> None:
        _check_tile("PrefillConfig.block_m", self.block_m)
        _check_tile("PrefillConfig.block_n", self.block_n)


def _check_tile(name: str, value: int) -> None:
    # tl.dot needs every dimension >= 16 on GPUs; tiles must be powers of two for tl.arange.
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {value}")


@functools.lru_cache(maxsize=64)
def default_decode_config(head_dim: int, dtype: torch.dtype) -> DecodeConfig:
    """Tile heuristic: 8 KiB of K (and as much V) per iteration for 16-bit dtypes, two of them in flight (num_stages=5
    is what makes Triton's pipeliner give the paged loop two K/V buffers: the next tile loads while this one is
    computed; 3 and 4 give one). d=128: 32-token tiles, ~37 KiB of shared memory a program. Chosen on an H200 from
    benchmarks/tune_decode.py (benchmarks/results/kernels_h200_tune_grid.json: graph mode, batch 1-256 x context
    1K-32K, each tile config at its best split count): against one 64-token buffer (the earlier default) faster at
    batch 1-4, level at 16-256. Checked spill-free on sm90 by
    `python -m kvscope.kernels.compile_check`."""
    if INTERPRETED:
        # The interpreter's cost is per op, not per element: big tiles are the fast choice there.
        return DecodeConfig(block_n=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # fp32 dots run on FMA units ("ieee"): 16-token tiles keep them out of register spills.
        return DecodeConfig(block_n=16, num_warps=4, num_stages=2)
    block_n = max(16, min(128, 4096 // next_power_of_2(head_dim)))  # d=128: 32 tokens, 8 KiB of K per tile
    return DecodeConfig(block_n=block_n, num_warps=4, num_stages=5)


@functools.lru_cache(maxsize=64)
def default_prefill_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """Tile heuristic after Triton's fused-attention tutorial (Hopper, d=128: 128x64 tiles, 8 warps, 3 stages)."""
    if INTERPRETED:
        return PrefillConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)
    block_d = next_power_of_2(head_dim)
    if dtype == torch.float32:
        # fp32 dots run on FMA units ("ieee"), not tensor cores: small tiles keep them out of register spills.
        return PrefillConfig(block_m=32, block_n=16, num_warps=8, num_stages=2)
    if block_d <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if block_d <= 128:
        return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)  # 256-wide heads


@functools.lru_cache(maxsize=16)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRETER_SMS


def choose_num_splits(programs: int, num_tiles: int, num_sms: int, programs_per_sm: int = 3) -> int:
    """How many context partitions per (sequence, kv head).

    programs: (sequence, kv head) pairs; num_tiles: key tiles of the longest sequence. Aim for one wave of about
    programs_per_sm split programs per SM: enough loads in flight to keep HBM busy, no second partial wave, and no
    more partial results than that. Measured on an H200 with the default tiles (benchmarks/tune_decode.py, graph
    mode): ~3 programs an SM gave the shortest decode at batch 1, 4 and 16 (e.g. 1 x 32K: 384 programs 1.00x SDPA,
    512 0.97x, 1024 0.80x; 4 x 4K: 384 0.97x, 512 0.85x), although ~5 fit. No split once the pairs alone come close
    (past half a program an SM more: 1.5 rounds to 2) to that number; never more splits than tiles.
    """
    if num_tiles <= 1:
        return 1
    target = num_sms * programs_per_sm
    return max(1, min(num_tiles, 128, int(target / max(programs, 1) + 0.5)))


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_args(dtype: torch.dtype) -> dict[str, object]:
    """The DOT_PRECISION / UPCAST_DOT constexprs of the attention kernels for inputs of `dtype`."""
    return _dot_args(dtype).copy()


@functools.lru_cache(maxsize=8)
def _dot_args(dtype: torch.dtype) -> dict[str, object]:
    return {
        # fp32 inputs must not silently drop to TF32 on tensor cores (the CPU tiny model compares against fp32 torch).
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        # Triton's interpreter multiplies bfloat16 tiles as their raw uint16 bits: upcast there (never on GPU).
        "UPCAST_DOT": INTERPRETED and dtype == torch.bfloat16,
    }


# ----------------------------------------------------------------------------------------------------------------
# input checks: one-line ValueErrors naming the argument and the offending value
# ----------------------------------------------------------------------------------------------------------------


def kernels_available(device: torch.device | str) -> bool:
    """Whether the Triton kernels can take tensors on `device` in this process (else use kvscope.kernels.reference):
    CUDA tensors when compiled, CPU tensors when interpreted (TRITON_INTERPRET=1 before import)."""
    kind = torch.device(device).type
    return (kind == "cuda" and not INTERPRETED) or (kind == "cpu" and INTERPRETED)


def check_runnable(first: torch.Tensor, *tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device the kernels can run on; returns that device. A None stands for a missing cache
    index (neither block_tables nor token_base given)."""
    device = first.device
    for t in tensors:
        if t is None:
            raise ValueError("kvscope.kernels: give block_tables (paged cache) or token_base (contiguous cache)")
        if t.device != device:
            raise ValueError(f"kvscope.kernels: all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda" and INTERPRETED:
        raise ValueError("kvscope.kernels: TRITON_INTERPRET=1 was set at import, so kernels take CPU tensors, not cuda")
    if device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            "kvscope.kernels: CPU tensors need TRITON_INTERPRET=1 set before importing kvscope.kernels "
            "(or use kvscope.kernels.reference)"
        )
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"kvscope.kernels: unsupported device {device}")
    return device


def check_shape(name: str, t: torch.Tensor, ndim: int, what: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {what}, got shape {tuple(t.shape)}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        raise ValueError(f"{name}: dtype {t.dtype} not supported (choose from {', '.join(map(str, allowed))})")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: the head_dim axis must be contiguous (stride 1), got strides {t.stride()}")


def check_heads(num_q_heads: int, num_kv_heads: int) -> int:
    """The GQA group size (q heads per kv head)."""
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"q heads ({num_q_heads}) must be a positive multiple of kv heads ({num_kv_heads})")
    return num_q_heads // num_kv_heads


def check_head_dim(head_dim: int, *others: tuple[str, int]) -> None:
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head_dim must be in 1..256, got {head_dim}")
    for name, d in others:
        if d != head_dim:
            raise ValueError(f"{name}: head_dim {d} differs from q's {head_dim}")


def check_index_vector(name: str, t: torch.Tensor, length: int) -> None:
    check_dtype(name, t, INDEX_DTYPES)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name}: expected a 1-D tensor of length {length}, got shape {tuple(t.shape)}")
    if t.numel() and t.stride(0) != 1:
        raise ValueError(f"{name}: must be contiguous")


def check_cache_index(
    paged: bool, block_tables: torch.Tensor | None, token_base: torch.Tensor | None, batch: int, k: torch.Tensor
) -> int:
    """Validate where each sequence's K/V live (block tables, or first rows); returns tokens per page (1 if flat)."""
    if not paged:
        assert token_base is not None, "token_base is required for a contiguous cache"
        check_index_vector("token_base", token_base, batch)
        return 1
    assert block_tables is not None, "block_tables is required for a paged cache"
    check_dtype("block_tables", block_tables, INDEX_DTYPES)
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables: expected [batch={batch}, max_blocks], got {tuple(block_tables.shape)}")
    if block_tables.shape[1] and block_tables.stride(1) != 1:
        raise ValueError("block_tables: rows must be contiguous")
    return k.shape[1]


PAGED_LAYOUT = "[num_blocks, block_size, kv_heads, head_dim]"
CONTIGUOUS_LAYOUT = "[num_rows, kv_heads, head_dim]"


def check_cache_layout(paged: bool, k: torch.Tensor, v: torch.Tensor) -> None:
    """The public wrappers' rank check, naming the arguments as the caller knows them (k_cache/v_cache, k_buf/v_buf)."""
    if paged:
        check_shape("k_cache", k, 4, PAGED_LAYOUT)
        check_shape("v_cache", v, 4, PAGED_LAYOUT)
    else:
        check_shape("k_buf", k, 3, CONTIGUOUS_LAYOUT)
        check_shape("v_buf", v, 3, CONTIGUOUS_LAYOUT)


def check_float_rows(*named: tuple[str, torch.Tensor]) -> None:
    """Each tensor holds floats the kernels read, with a contiguous head_dim axis."""
    for name, t in named:
        check_dtype(name, t, FLOAT_DTYPES)
        check_last_dim_contiguous(name, t)


def check_kv_pair(k: torch.Tensor, v: torch.Tensor) -> None:
    if k.shape != v.shape:
        raise ValueError(f"k and v caches differ in shape: {tuple(k.shape)} vs {tuple(v.shape)}")


@dataclass(frozen=True)
class AttentionShape:
    """What the decode and prefill wrappers read off checked q and K/V caches."""

    num_q_heads: int
    kv_heads: int
    head_dim: int
    group: int  # q heads per kv head


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_layout: str) -> AttentionShape:
    """q [tokens, q_heads, head_dim] against K/V caches of either layout: heads, head_dim, shapes, dtypes, strides."""
    check_shape("q", q, 3, q_layout)
    _, num_q_heads, head_dim = q.shape
    kv_heads = k.shape[-2]
    group = check_heads(num_q_heads, kv_heads)
    check_head_dim(head_dim, ("k cache", k.shape[-1]), ("v cache", v.shape[-1]))
    check_kv_pair(k, v)
    check_float_rows(("q", q), ("k cache", k), ("v cache", v))
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return AttentionShape(num_q_heads, kv_heads, head_dim, group)


def check_grid_batch(batch: int) -> None:
    if batch > MAX_GRID_YZ:
        raise ValueError(f"batch {batch} exceeds the CUDA grid limit {MAX_GRID_YZ}: split the batch")


def cache_strides(paged: bool, t: torch.Tensor) -> tuple[int, int, int]:
    """(block, token, head) strides of a cache; a contiguous buffer is one block of all rows (block stride 0)."""
    s = t.stride()
    return (s[0], s[1], s[2]) if paged else (0, s[0], s[1])


@dataclass(frozen=True)
class CacheArgs:
    """The cache-side kernel arguments shared by decode and prefill, for either layout."""

    page: int  # PAGE constexpr: tokens per block, 1 for a contiguous buffer
    block_tables: torch.Tensor  # a placeholder int tensor when contiguous: the kernel signature stays fixed
    token_base: torch.Tensor  # likewise when paged
    strides: tuple[int, ...]  # stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt


def cache_args(
    paged: bool,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor | None,
    token_base: torch.Tensor | None,
    batch: int,
    placeholder: torch.Tensor,
) -> CacheArgs:
    """Check where each sequence's K/V live (see `check_cache_index`) and lay out the matching kernel arguments;
    `placeholder` (any int tensor on the device) stands in for the index tensor the layout does not use."""
    page = check_cache_index(paged, block_tables, token_base, batch, k)
    if paged:
        assert block_tables is not None  # checked above
        strides = (*cache_strides(paged, k), *cache_strides(paged, v), block_tables.stride(0))
        return CacheArgs(page, block_tables, placeholder, strides)
    assert token_base is not None  # checked above
    return CacheArgs(page, placeholder, token_base, (*cache_strides(paged, k), *cache_strides(paged, v), 0))


def output_like(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out` checked against q (same shape, dtype, device; last dim contiguous), or a new tensor like q."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out: expected {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype}")
    check_last_dim_contiguous("out", out)
    return out


def default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


LOG2E = 1.4426950408889634
