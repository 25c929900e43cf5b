"""Before the first measured step of a cuda run: the copy ceiling, and every Triton kernel variant the run will
launch compiled (on scratch K/V with the layout's own strides, so no allocator memory is touched and the compiled
variants are exactly those the run's calls select).

The copy ceiling is a device-to-device copy of 1 GiB (bytes read + written per second, median of 10 copies timed
with CUDA events): what a memory-bound kernel can hope for on this GPU, measured in the same process as the run.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kvscope.engine.layout import KVLayout
from kvscope.engine.model import LlamaModel
from kvscope.spec import KVSpec

COPY_BYTES = 1 << 30
SCRATCH_TOKENS = 256


def copy_ceiling(device: torch.device, nbytes: int = COPY_BYTES, reps: int = 10) -> dict[str, float]:
    """Device-to-device copy bandwidth, bytes read + written per second (TB/s), median of `reps` timed copies."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    s = sorted(times)[len(times) // 2]
    return {"copy_bytes": nbytes, "copy_s": s, "copy_ceiling_tbps": 2 * nbytes / s / 1e12}


def scratch_caches(layout: KVLayout, tokens: int = SCRATCH_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Small K/V caches with the strides of the layout's own views (the compiled variant depends on strides, not
    sizes): for blocks [blocks, block_size, kv_heads, head_dim], for rows [rows, kv_heads, head_dim]."""
    k, _ = layout.caches(0, 0)
    rows = tokens if layout.contiguous else max(1, -(-tokens // k.shape[1]))
    shape = (rows, *k.shape[1:])
    kc = torch.empty_strided(shape, k.stride(), dtype=k.dtype, device=k.device)
    vc = torch.empty_strided(shape, k.stride(), dtype=k.dtype, device=k.device)
    kc.normal_()
    vc.normal_()
    return kc, vc


def warm_kernels(
    spec: KVSpec, model: LlamaModel, layout: KVLayout, kernels: Any, max_len: int, max_batch: int = 1
) -> None:
    """Launch every variant a run selects: the KV store, decode with one split (direct) and with several (merged)
    and with each other tile config the decode plan picks for up to max_batch sequences, prefill with and without
    cached context, then one whole forward pass (cuBLAS handles and heuristics)."""
    dev = model.device
    kc, vc = scratch_caches(layout)
    paged = not layout.contiguous
    i64 = torch.int64

    def where(batch: int) -> torch.Tensor:
        if paged:
            return torch.arange(kc.shape[0], dtype=i64, device=dev).repeat(batch, 1)
        return torch.zeros(batch, dtype=i64, device=dev)

    store = kernels.store_kv_paged if paged else kernels.store_kv_contiguous
    decode = kernels.paged_decode_attention if paged else kernels.contiguous_decode_attention
    prefill = kernels.paged_prefill_attention if paged else kernels.contiguous_prefill_attention
    qh, kvh, d = spec.q_heads, spec.num_kv_heads, spec.head_dim
    dtype = kc.dtype
    n = min(SCRATCH_TOKENS, 64)
    key = torch.randn(n, kvh, d, device=dev, dtype=dtype)
    store(key, key, kc, vc, torch.arange(n, dtype=i64, device=dev))
    for batch, longest in ((1, 16), (1, max_len), (3, max_len), (3, 16)):
        q = torch.randn(batch, qh, d, device=dev, dtype=dtype)
        lens = torch.full((batch,), n, dtype=i64, device=dev)
        decode(q, kc, vc, where(batch), lens, max_seq_len=longest)
    # the decode plan's other tiles: the batch picks them, not the compiled variant, so one sequence is enough
    others = kernels.decode_plans(max_batch, kvh, max_len, d, dtype, dev, paged=paged)
    for cfg in others - {kernels.default_decode_config(d, dtype)}:
        q = torch.randn(1, qh, d, device=dev, dtype=dtype)
        one = torch.full((1,), n, dtype=i64, device=dev)
        decode(q, kc, vc, where(1), one, max_seq_len=max_len, config=cfg)
    for ctx in (0, 17):
        q = torch.randn(n - ctx, qh, d, device=dev, dtype=dtype)
        cu = torch.tensor([0, n - ctx], dtype=i64, device=dev)
        prefill(q, kc, vc, where(1), cu, torch.tensor([ctx], dtype=i64, device=dev), max_query_len=n - ctx)

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[0]
        store(k, v, kc, vc, torch.arange(t, dtype=i64, device=dev))
        cu = torch.tensor([0, t], dtype=i64, device=dev)
        zero = torch.zeros(1, dtype=i64, device=dev)
        return prefill(q, kc, vc, where(1), cu, zero, max_query_len=t)

    ids = torch.arange(n, dtype=i64, device=dev)
    with torch.inference_mode():
        logits = model.forward(ids, ids, attend, torch.tensor([n - 1], dtype=i64, device=dev))
        if logits is not None:
            logits.argmax(-1)
    torch.cuda.synchronize(dev)


def timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
