"""Which decode tiles a call gets: the default tiles with the split-K heuristic, or, where the (sequence, kv head)
pairs alone fill the GPU, one program a pair with bigger K/V buffers (`decode_plan`)."""

from __future__ import annotations

import functools

import torch

from .common import INTERPRETED, DecodeConfig, default_decode_config, next_power_of_2, sm_count

#: Tokens a program reads, at most, for the wide one-program-an-SM tiles of `decode_plan` over a paged cache.
WIDE_MAX_CONTEXT = 2048


def decode_plan(
    batch: int,
    kv_heads: int,
    max_seq_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    paged: bool = True,
) -> DecodeConfig:
    """The decode config of a call: `default_decode_config`'s tiles with the split heuristic, except where the
    (sequence, kv head) pairs alone fill one or two programs an SM to within 10%. There a split would need the merge
    kernel (about 4 us on an H200 at batch 16, a sixth of a 1K-context call), so each pair gets one program, and
    bigger K/V buffers stand in for the loads in flight that more programs would have had:

    - 1.8 to 2 pairs an SM: two programs an SM with 64-token tiles (d=128) and three pipeline stages of them
      (num_stages=7, ~105 KiB of shared memory each);
    - 0.9 to 1 pair an SM (paged caches: and at most WIDE_MAX_CONTEXT tokens): one program an SM with two buffers
      of 128-token tiles (8 warps, ~140 KiB). With longer contexts in a paged cache three split programs an SM and
      the merge are faster.

    Measured on an H200 (Llama-3-8B heads, 8 kv heads, graph mode, against SDPA's default backend, the previous
    plan side by side). Paged-16 (benchmarks/results/kernels_h200_plan*.log, two runs): batch 32 at 1K / 4K / 16K
    0.79-0.80 / 0.91 / 0.95x with two splits and the merge, 0.89-0.90 / 0.96 / 0.97-0.98x with one program a pair;
    batch 16 at 1K 0.76-0.77x with three splits, 0.82-0.84x with one wide program a pair, but at 4K 0.86x against
    0.89x (kernels_h200_wide.log). Pairs that fill a wave less evenly lose: batch 20 and 24 (1.2 and 1.45 pairs an
    SM) took 0.66-0.82x with one program a pair against 0.74-1.01x split. Contiguous caches
    (kernels_h200_contiguous_plan.log; their loop runs at most 3 stages, two buffers, see `loop_stages`), where the
    wide tiles win at every context: batch 16 at 1K / 4K / 16K 0.79 / 0.92 / 0.98x split, 0.98 / 0.99 / 1.00x
    wide; batch 32 0.82 / 0.93 / 0.97x split, 1.01 / 1.00 / 0.99x with two programs an SM. Only on GPUs whose
    shared memory holds those buffers (Hopper: 227 KiB a block, 228 KiB an SM); elsewhere, in fp32 and in the
    interpreter, the default tiles.
    """
    base = default_decode_config(head_dim, dtype)
    if INTERPRETED or dtype == torch.float32 or device.type != "cuda":
        return base
    pairs = batch * kv_heads
    sms = sm_count(device)
    block_d = next_power_of_2(head_dim)
    per_sm, per_block = _shared_memory(device.index if device.index is not None else torch.cuda.current_device())
    if 1.8 * sms <= pairs <= 2 * sms:
        double = two_per_sm_decode_config(head_dim)
        buffers = 3 if paged else 2  # the contiguous loop runs at most 3 stages: two buffers (`loop_stages`)
        if per_sm >= 2 * _buffers_bytes(double.block_n, block_d, buffers):
            return double
    if 0.9 * sms <= pairs <= sms and (max_seq_len <= WIDE_MAX_CONTEXT or not paged):
        wide = one_per_sm_decode_config(head_dim)
        if per_block >= _buffers_bytes(wide.block_n, block_d, 2):
            return wide
    return base


def two_per_sm_decode_config(head_dim: int) -> DecodeConfig:
    """`decode_plan`'s tiles for two programs an SM, no split: three buffers of 16 KiB K tiles (and as much V)."""
    return DecodeConfig(
        block_n=max(16, min(128, 8192 // next_power_of_2(head_dim))), num_warps=4, num_stages=7, num_splits=1
    )


def one_per_sm_decode_config(head_dim: int) -> DecodeConfig:
    """`decode_plan`'s tiles for one program an SM, no split: two buffers of 32 KiB K tiles (and as much V)."""
    return DecodeConfig(
        block_n=max(16, min(128, 16384 // next_power_of_2(head_dim))), num_warps=8, num_stages=5, num_splits=1
    )


def decode_plans(
    max_batch: int,
    kv_heads: int,
    max_seq_len: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    paged: bool = True,
) -> set[DecodeConfig]:
    """Every config `decode_plan` gives a call of 1..max_batch sequences of at most max_seq_len tokens: what a
    warm-up compiles."""
    lengths = {min(max_seq_len, WIDE_MAX_CONTEXT), max_seq_len}
    batches = range(1, max_batch + 1)
    return {decode_plan(b, kv_heads, n, head_dim, dtype, device, paged=paged) for b in batches for n in lengths}


def _buffers_bytes(block_n: int, block_d: int, buffers: int) -> int:
    """Shared memory of `buffers` K and V tiles of 16-bit values, plus 8 KiB for the rest (q, layout conversions)."""
    return buffers * 2 * block_n * block_d * 2 + 8192


@functools.lru_cache(maxsize=16)
def _shared_memory(index: int) -> tuple[int, int]:
    """(bytes an SM, bytes a block may opt in to) of CUDA device `index`; 0 where torch does not say."""
    props = torch.cuda.get_device_properties(index)
    return (
        int(getattr(props, "shared_memory_per_multiprocessor", 0)),
        int(getattr(props, "shared_memory_per_block_optin", 0)),
    )
