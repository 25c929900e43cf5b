"""How fast the Triton attention kernels are on this GPU, against torch SDPA and the device's copy bandwidth.

    python benchmarks/bench_kernels.py                       # full grid (a few minutes on an H100)
    python benchmarks/bench_kernels.py --quick               # small grid (well under a minute)
    python benchmarks/bench_kernels.py --sweep               # also try a few tile configs and report the best

Llama-3-8B attention heads (32 q heads, 8 kv heads, head_dim 128, bf16) throughout.

1. Correctness: every kernel (paged decode at each block size, contiguous decode, paged and contiguous prefill with
   ragged lengths and cached context, KV store, block copy within the pool and to pinned CPU memory) on the GPU
   against the torch reference; max abs error printed. A failure is reported and makes the exit status 1.
2. Copy ceiling: a device-to-device copy of 2 GiB, bytes read + written per second (the practical ceiling for a
   memory-bound kernel).
3. Decode (one query token per sequence, every sequence `context` tokens): paged Triton at block sizes 1, 16, 64,
   256; contiguous Triton; torch SDPA with its default backend selection ("sdpa-default", the reference every
   ratio is against) and forced to flash ("sdpa-flash"), enable_gqa, on the very buffer the contiguous kernel
   reads; the paged caches hold the same K/V values. Two modes, each kernel compared with SDPA in the same mode:
   "graph" (calls captured in a CUDA graph, several buffer sets rotated so that no call reads from L2: how a
   graph-captured decode step runs) and "eager" (do_bench, L2 flushed: host time included). At batch <= 16 also
   paged block 16 with fixed split counts and with the merge fused into the split kernel. Achieved TB/s counts K/V bytes
   read plus q and output bytes (gpt-fast style). Combinations whose cache exceeds --max-kv-gib are skipped.
4. Prefill (causal, fresh prompts): paged and contiguous Triton against SDPA flash (is_causal, enable_gqa), TFLOP/s
   counting 2 matmuls x 2 flops x q_heads x head_dim x (causal query-key pairs).

Timing: triton.testing.do_bench (warm-up, L2 flushed before each run, median). Writes JSON (--out, default
benchmarks/results/kernels.json) and prints markdown tables. Needs a CUDA GPU; never imports plotly.
"""

# This script is longer than 400 lines: correctness, the copy ceiling, decode in two modes, prefill and the tile
# sweep share one device session and one results file.
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BLOCK_SIZES = (1, 16, 64, 256)
GiB = 1 << 30
DEVICE = "cuda"  # a module constant so that a dry run can point it elsewhere

FULL_DECODE_BATCHES = (1, 4, 16, 64, 256)
FULL_DECODE_CONTEXTS = (1024, 4096, 16384, 32768)
QUICK_DECODE_BATCHES = (1, 64)
QUICK_DECODE_CONTEXTS = (1024, 4096)
FULL_PREFILL = ((1, 1024), (1, 2048), (1, 4096), (1, 8192), (1, 16384), (8, 2048))
QUICK_PREFILL = ((1, 1024), (1, 4096))
SWEEP_DECODE = ((64, 4096), (1, 32768), (256, 1024))  # (batch, context) points of the --sweep
SWEEP_PREFILL_LENGTH = 8192


# ------------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------------


def bench_ms(fn) -> float:
    """Median milliseconds of fn() on the GPU (triton's do_bench: warm-up, L2 flushed before every run)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_us(torch, fns, replays: int = 20) -> float:
    """Median microseconds of one call when `fns` (one call each, on different buffers so that no call finds its
    K/V in L2) are captured in one CUDA graph and replayed: launch gaps as a graph-captured decode step has them,
    host time excluded. Both sides of every comparison are timed this way."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    del graph
    return sorted(times)[len(times) // 2]


def copy_ceiling_tbps(torch, nbytes: int = 2 * GiB) -> dict[str, float]:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return {"bytes": nbytes, "ms": ms, "tbps": 2 * nbytes / (ms * 1e-3) / 1e12}


# ------------------------------------------------------------------------------------------------------------------
# data: one contiguous K/V buffer, paged copies of the same values
# ------------------------------------------------------------------------------------------------------------------


def contiguous_kv(torch, batch: int, context: int, dtype, seed: int = 0):
    """k, v [batch * context, kv_heads, head_dim]: sequence b in rows b * context ..; token_base, seq_lens."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    shape = (batch * context, KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, generator=gen, device=DEVICE, dtype=dtype)
    v = torch.randn(shape, generator=gen, device=DEVICE, dtype=dtype)
    token_base = torch.arange(batch, device=DEVICE, dtype=torch.int64) * context
    seq_lens = torch.full((batch,), context, device=DEVICE, dtype=torch.int32)
    return k, v, token_base, seq_lens


def paged_copy(torch, k, v, batch: int, context: int, block_size: int, seed: int = 1):
    """The same tokens in a paged cache: each sequence's blocks at shuffled, non-contiguous block ids."""
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_seq
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    perm = torch.randperm(num_blocks, generator=gen, device=DEVICE)
    padded = blocks_per_seq * block_size
    k_cache = torch.zeros((num_blocks, block_size, KV_HEADS, HEAD_DIM), device=DEVICE, dtype=k.dtype)
    v_cache = torch.zeros_like(k_cache)
    for src, dst in ((k, k_cache), (v, v_cache)):
        seqs = src.view(batch, context, KV_HEADS, HEAD_DIM)
        if padded != context:
            seqs = torch.nn.functional.pad(seqs, (0, 0, 0, 0, 0, padded - context))
        dst[perm] = seqs.reshape(num_blocks, block_size, KV_HEADS, HEAD_DIM)
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    return k_cache, v_cache, block_tables


def sdpa_call(torch, q4, k4, v4, is_causal: bool):
    """SDPA restricted to the flash backend when it accepts the inputs (else the default choice); and its name."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    f = torch.nn.functional.scaled_dot_product_attention
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            f(q4, k4, v4, is_causal=is_causal, enable_gqa=True)

        def run():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return f(q4, k4, v4, is_causal=is_causal, enable_gqa=True)

        return run, "flash"
    except RuntimeError:
        return (lambda: f(q4, k4, v4, is_causal=is_causal, enable_gqa=True)), "default"


def sdpa_default(torch, q4, k4, v4, is_causal: bool):
    """SDPA with torch's own backend selection (no restriction): usually the fastest torch has for the inputs."""
    f = torch.nn.functional.scaled_dot_product_attention
    return lambda: f(q4, k4, v4, is_causal=is_causal, enable_gqa=True)


# ------------------------------------------------------------------------------------------------------------------
# 1. correctness on the GPU
# ------------------------------------------------------------------------------------------------------------------


def check_correctness(torch, K, ref, testing) -> list[dict[str, Any]]:
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    results = []

    def record(name: str, out, expected, *, exact: bool = False, dtype=dtype) -> None:
        atol, rtol = testing.TOLERANCES[dtype]
        err = (out.float() - expected.float()).abs().max().item() if out.numel() else 0.0
        ok = err == 0.0 if exact else bool(torch.allclose(out.float(), expected.float(), atol=atol, rtol=rtol))
        results.append({"kernel": name, "max_abs_err": err, "ok": ok})
        print(f"  {name:44} max abs err {err:.3e}  {'ok' if ok else 'FAILED'}")

    seq_lens = [1, 17, 1000, 2049]
    for bs in BLOCK_SIZES:
        kv = testing.random_paged_kv(seq_lens, KV_HEADS, HEAD_DIM, bs, dtype, DEVICE, generator=gen)
        q = torch.randn(len(seq_lens), Q_HEADS, HEAD_DIM, generator=gen).to(DEVICE, dtype)
        out = K.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
        expected = ref.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
        record(f"paged decode, block {bs}", out, expected)
        ctx, new = [0, 16, 1000, 5], [300, 1, 77, 130]
        lens = [c + n for c, n in zip(ctx, new, strict=True)]
        kvp = testing.random_paged_kv(lens, KV_HEADS, HEAD_DIM, bs, dtype, DEVICE, generator=gen)
        qp = torch.randn(sum(new), Q_HEADS, HEAD_DIM, generator=gen).to(DEVICE, dtype)
        cu = testing.cu_seqlens(new, DEVICE)
        ctx_t = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
        out = K.paged_prefill_attention(qp, kvp.k_cache, kvp.v_cache, kvp.block_tables, cu, ctx_t)
        expected = ref.paged_prefill_attention(qp, kvp.k_cache, kvp.v_cache, kvp.block_tables, cu, ctx_t)
        record(f"paged prefill, block {bs}", out, expected)

    kv = testing.random_contiguous_kv(seq_lens, KV_HEADS, HEAD_DIM, dtype, DEVICE, generator=gen)
    q = torch.randn(len(seq_lens), Q_HEADS, HEAD_DIM, generator=gen).to(DEVICE, dtype)
    out = K.contiguous_decode_attention(q, kv.k_buf, kv.v_buf, kv.token_base, kv.seq_lens)
    expected = ref.contiguous_decode_attention(q, kv.k_buf, kv.v_buf, kv.token_base, kv.seq_lens)
    record("contiguous decode", out, expected)
    ctx, new = [0, 900], [513, 64]
    lens = [c + n for c, n in zip(ctx, new, strict=True)]
    kvc = testing.random_contiguous_kv(lens, KV_HEADS, HEAD_DIM, dtype, DEVICE, generator=gen)
    qc = torch.randn(sum(new), Q_HEADS, HEAD_DIM, generator=gen).to(DEVICE, dtype)
    cu = testing.cu_seqlens(new, DEVICE)
    ctx_t = torch.tensor(ctx, dtype=torch.int64, device=DEVICE)
    out = K.contiguous_prefill_attention(qc, kvc.k_buf, kvc.v_buf, kvc.token_base, cu, ctx_t)
    expected = ref.contiguous_prefill_attention(qc, kvc.k_buf, kvc.v_buf, kvc.token_base, cu, ctx_t)
    record("contiguous prefill", out, expected)

    # fp32 (the tiny model's dtype) and fp16 decode, MHA and GQA 8
    for dt, qh, kvh in ((torch.float32, 8, 8), (torch.float16, 64, 8)):
        kv = testing.random_paged_kv(seq_lens, kvh, HEAD_DIM, 16, dt, DEVICE, generator=gen)
        q = torch.randn(len(seq_lens), qh, HEAD_DIM, generator=gen).to(DEVICE, dt)
        out = K.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
        expected = ref.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
        record(f"paged decode {str(dt).removeprefix('torch.')}, {qh}/{kvh} heads", out, expected, dtype=dt)

    kv = testing.random_paged_kv([40, 70], KV_HEADS, HEAD_DIM, 16, dtype, DEVICE, generator=gen)
    slots = torch.randperm(kv.k_cache.shape[0] * 16, generator=gen)[:50]
    slots[::7] = -1
    key = torch.randn(50, KV_HEADS, HEAD_DIM, generator=gen).to(DEVICE, dtype)
    value = torch.randn(50, KV_HEADS, HEAD_DIM, generator=gen).to(DEVICE, dtype)
    expected = kv.pool.clone()
    K.store_kv_paged(key, value, kv.k_cache, kv.v_cache, slots.to(DEVICE))
    ref.store_kv_paged(key, value, expected[1, 0], expected[1, 1], slots)
    record("store kv paged", kv.pool, expected, exact=True)

    kvc = testing.random_contiguous_kv([40, 70], KV_HEADS, HEAD_DIM, dtype, DEVICE, generator=gen)
    rows = K.contiguous_rows(kvc.token_base.cpu(), torch.tensor([0, 1, 1]), torch.tensor([39, 0, 69]))
    k_exp, v_exp = kvc.k_buf.clone(), kvc.v_buf.clone()
    K.store_kv_contiguous(key[:3], value[:3], kvc.k_buf, kvc.v_buf, rows.to(DEVICE))
    ref.store_kv_contiguous(key[:3], value[:3], k_exp, v_exp, rows)
    record("store kv contiguous", torch.cat([kvc.k_buf, kvc.v_buf]), torch.cat([k_exp, v_exp]), exact=True)

    pool = torch.randn(4, 2, 64, 16, KV_HEADS, HEAD_DIM, generator=gen).to(DEVICE, dtype)
    expected = pool.clone()
    K.copy_blocks(pool, None, [3, 40, 9], [60, 1, 33], block_dim=2)
    ref.copy_blocks(expected, None, [3, 40, 9], [60, 1, 33], block_dim=2)
    record("copy blocks (in pool)", pool, expected, exact=True)
    host = torch.zeros(4, 2, 8, 16, KV_HEADS, HEAD_DIM, dtype=dtype)
    host = host.pin_memory() if torch.cuda.is_available() else host
    K.copy_blocks(pool, host, [3, 40], [7, 0], block_dim=2)
    record("copy blocks (gpu -> pinned cpu)", host[:, :, [7, 0]], pool[:, :, [3, 40]].cpu(), exact=True)
    return results


# ------------------------------------------------------------------------------------------------------------------
# 3. decode
# ------------------------------------------------------------------------------------------------------------------


def bench_decode(torch, K, batches, contexts, max_kv_gib: float, ceiling: float) -> list[dict[str, Any]]:
    dtype = torch.bfloat16
    elem = 2
    rows = []
    for context in contexts:
        for batch in batches:
            kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * elem  # K and V
            if kv_bytes > max_kv_gib * GiB:
                print(f"  skip batch {batch} x context {context}: {kv_bytes / GiB:.1f} GiB of K/V > --max-kv-gib")
                rows.append({"batch": batch, "context": context, "skipped": "exceeds --max-kv-gib"})
                continue
            try:
                rows.extend(_decode_point(torch, K, batch, context, dtype, kv_bytes, ceiling))
            except torch.cuda.OutOfMemoryError:
                print(f"  skip batch {batch} x context {context}: out of memory")
                rows.append({"batch": batch, "context": context, "skipped": "out of memory"})
            torch.cuda.empty_cache()
    return rows


#: Split counts tried in graph mode at small batch (--splits), besides the heuristic's choice.
SPLIT_SWEEP = (4, 8, 16, 32, 64)
#: K/V bytes a graph-mode measurement rotates through, so that no call reads its K/V from L2 (60 MB on an H200).
ROTATE_BYTES = 512 << 20


def _decode_point(torch, K, batch: int, context: int, dtype, kv_bytes: int, ceiling: float) -> list[dict[str, Any]]:
    copies = max(1, min(16, -(-ROTATE_BYTES // kv_bytes)))
    sets = []
    for i in range(copies):
        k, v, token_base, seq_lens = contiguous_kv(torch, batch, context, dtype, seed=i)
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
        sets.append((q, k, v, token_base, seq_lens, torch.empty_like(q)))
    moved = kv_bytes + 2 * batch * Q_HEADS * HEAD_DIM * 2  # K/V read, q read, output written

    def views(q, k, v):
        k4 = k.view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)  # the same memory as SDPA sees it
        v4 = v.view(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2)
        return q.unsqueeze(2), k4, v4

    q0, k0, v0, tb0, sl0, out0 = sets[0]
    flash, backend = sdpa_call(torch, *views(q0, k0, v0), is_causal=False)
    expected = flash().squeeze(2).float()
    rows: list[dict[str, Any]] = []
    variants: dict[str, list] = {}  # name -> one call per buffer set
    variants["sdpa-default"] = [sdpa_default(torch, *views(q, k, v), False) for q, k, v, *_ in sets]
    variants[f"sdpa-{backend}"] = [sdpa_call(torch, *views(q, k, v), False)[0] for q, k, v, *_ in sets]
    variants["contiguous"] = [
        (lambda q=q, k=k, v=v, tb=tb, sl=sl, o=o: K.contiguous_decode_attention(q, k, v, tb, sl, max_seq_len=context,
                                                                                 out=o))
        for q, k, v, tb, sl, o in sets
    ]  # fmt: skip
    paged = {}
    for bs in BLOCK_SIZES:
        paged[bs] = [paged_copy(torch, k, v, batch, context, bs) for _, k, v, *_ in sets]
        variants[f"paged-{bs}"] = [
            (lambda q=q, kc=kc, vc=vc, bt=bt, sl=sl, o=o: K.paged_decode_attention(q, kc, vc, bt, sl,
                                                                                    max_seq_len=context, out=o))
            for (q, _, _, _, sl, o), (kc, vc, bt) in zip(sets, paged[bs], strict=True)
        ]  # fmt: skip
    base = K.default_decode_config(HEAD_DIM, dtype)
    extra: dict[str, Any] = {"paged-16 fused": K.DecodeConfig(**{**asdict(base), "fused": True})}
    if batch <= 16:
        for ns in SPLIT_SWEEP:
            extra[f"paged-16 splits={ns}"] = K.DecodeConfig(**{**asdict(base), "num_splits": ns})
        # around the default (32-token tiles, two buffers): other tiles, 8 warps, one K/V buffer (num_stages 3)
        for key, value in (("block_n", 16), ("block_n", 64), ("num_warps", 8), ("num_stages", 3)):
            extra[f"paged-16 {key}={value}"] = K.DecodeConfig(**{**asdict(base), key: value})
    for name, cfg in extra.items():
        variants[name] = [
            (lambda q=q, kc=kc, vc=vc, bt=bt, sl=sl, o=o, c=cfg: K.paged_decode_attention(
                q, kc, vc, bt, sl, max_seq_len=context, out=o, config=c))
            for (q, _, _, _, sl, o), (kc, vc, bt) in zip(sets, paged[16], strict=True)
        ]  # fmt: skip
    eager_names = ("sdpa-default", f"sdpa-{backend}", "contiguous", "paged-1", "paged-16", "paged-256")
    timings: dict[tuple[str, str], float] = {}
    errors: dict[str, float] = {}
    for name, fns in variants.items():
        res = fns[0]()
        got = (res.squeeze(2) if res.dim() == 4 else res).float()
        errors[name] = (got - expected).abs().max().item()  # same data, same answer
        timings[(name, "graph")] = graph_us(torch, fns)
        if name in eager_names:
            timings[(name, "eager")] = bench_ms(fns[0]) * 1e3
    for (name, mode), us in timings.items():
        tbps = moved / (us * 1e-6) / 1e12
        ref_us = timings[("sdpa-default", mode)]
        rows.append(
            {
                "batch": batch,
                "context": context,
                "kernel": name,
                "mode": mode,
                "us": us,
                "bytes": moved,
                "tbps": tbps,
                "vs_ceiling": tbps / ceiling,
                "vs_sdpa": ref_us / us,  # against SDPA's default backend selection, same mode
                "vs_sdpa_flash": timings[(f"sdpa-{backend}", mode)] / us,
                "max_abs_err_vs_sdpa": errors[name],
            }
        )
    line = "  ".join(f"{r['kernel']} {r['tbps']:.2f}" for r in rows if r["mode"] == "graph")
    print(f"  B={batch:<4} L={context:<6} graph TB/s: {line}  (max |diff| vs sdpa {max(errors.values()):.1e})")
    return rows


# ------------------------------------------------------------------------------------------------------------------
# 4. prefill
# ------------------------------------------------------------------------------------------------------------------


def bench_prefill(torch, K, testing, points) -> list[dict[str, Any]]:
    dtype = torch.bfloat16
    rows = []
    for batch, length in points:
        try:
            rows.extend(_prefill_point(torch, K, testing, batch, length, dtype))
        except torch.cuda.OutOfMemoryError:
            print(f"  skip batch {batch} x length {length}: out of memory")
            rows.append({"batch": batch, "length": length, "skipped": "out of memory"})
        torch.cuda.empty_cache()
    return rows


def _prefill_point(torch, K, testing, batch: int, length: int, dtype) -> list[dict[str, Any]]:
    k, v, token_base, seq_lens = contiguous_kv(torch, batch, length, dtype)
    q = torch.randn(batch * length, Q_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
    out = torch.empty_like(q)
    cu = testing.cu_seqlens([length] * batch, DEVICE)
    ctx = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    pairs = batch * length * (length + 1) // 2  # causal (query, key) pairs
    flops = 4 * pairs * Q_HEADS * HEAD_DIM
    timings: dict[str, float] = {}

    q4 = q.view(batch, length, Q_HEADS, HEAD_DIM).transpose(1, 2)
    k4 = k.view(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v4 = v.view(batch, length, KV_HEADS, HEAD_DIM).transpose(1, 2)
    sdpa, backend = sdpa_call(torch, q4, k4, v4, is_causal=True)
    expected = sdpa().transpose(1, 2).reshape(batch * length, Q_HEADS, HEAD_DIM).float()
    errors: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        timings[name] = bench_ms(fn)
        errors[name] = (fn().float().reshape(expected.shape) - expected).abs().max().item()

    timed(f"sdpa-{backend}", lambda: sdpa().transpose(1, 2))
    timed(
        "contiguous",
        lambda: K.contiguous_prefill_attention(q, k, v, token_base, cu, ctx, max_query_len=length, out=out),
    )
    for bs in (16, 256):
        k_cache, v_cache, tables = paged_copy(torch, k, v, batch, length, bs)
        timed(
            f"paged-{bs}",
            lambda kc=k_cache, vc=v_cache, bt=tables: K.paged_prefill_attention(
                q, kc, vc, bt, cu, ctx, max_query_len=length, out=out
            ),
        )
        del k_cache, v_cache, tables
    sdpa_ms = timings[f"sdpa-{backend}"]
    rows = []
    for name, ms in timings.items():
        rows.append(
            {
                "batch": batch,
                "length": length,
                "kernel": name,
                "ms": ms,
                "flops": flops,
                "tflops": flops / (ms * 1e-3) / 1e12,
                "vs_sdpa": sdpa_ms / ms,
                "max_abs_err_vs_sdpa": errors[name],
            }
        )
    line = "  ".join(f"{r['kernel']} {r['tflops']:.0f}" for r in rows)
    worst = max(errors.values())
    print(f"  B={batch:<2} L={length:<6} TFLOP/s: {line}  (max |diff| vs sdpa {worst:.1e})")
    return rows


# ------------------------------------------------------------------------------------------------------------------
# optional: tile-config sweep
# ------------------------------------------------------------------------------------------------------------------


def sweep_configs(torch, K, testing) -> dict[str, Any]:
    """Time a few tile configs on representative shapes, so the defaults in kernels/common.py can be checked."""
    import triton

    dtype = torch.bfloat16
    result: dict[str, Any] = {"decode": [], "prefill": []}
    for batch, context in SWEEP_DECODE:
        k, v, token_base, seq_lens = contiguous_kv(torch, batch, context, dtype)
        k_cache, v_cache, tables = paged_copy(torch, k, v, batch, context, 16)
        del k, v
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
        moved = 2 * batch * context * KV_HEADS * HEAD_DIM * 2 + 2 * q.numel() * 2
        default = K.default_decode_config(HEAD_DIM, dtype)
        candidates = [default] + [
            K.DecodeConfig(block_n=bn, num_warps=w, num_stages=s)
            for bn in (32, 64, 128)
            for w in (4, 8)
            for s in (3, 5)  # one K/V buffer, two
        ]
        best = first = None
        for cfg in candidates:
            try:
                ms = bench_ms(
                    lambda c=cfg, q=q, kc=k_cache, vc=v_cache, bt=tables, sl=seq_lens, n=context: (
                        K.paged_decode_attention(q, kc, vc, bt, sl, max_seq_len=n, config=c)
                    )
                )
            except (triton.runtime.errors.OutOfResources, RuntimeError) as exc:
                print(f"  decode {cfg}: {type(exc).__name__}")
                continue
            tbps = moved / (ms * 1e-3) / 1e12
            row = {"batch": batch, "context": context, "config": asdict(cfg), "us": ms * 1e3, "tbps": tbps}
            result["decode"].append(row)
            first = first or row
            if best is None or ms < best["us"] / 1e3:
                best = row
        if best is not None:
            print(
                f"  decode B={batch} L={context} paged-16: first (default) {first['tbps']:.2f} TB/s, "
                f"best {best['tbps']:.2f} TB/s with {best['config']}"
            )
        del k_cache, v_cache, tables
        torch.cuda.empty_cache()

    length = SWEEP_PREFILL_LENGTH
    k, v, token_base, seq_lens = contiguous_kv(torch, 1, length, dtype)
    k_cache, v_cache, tables = paged_copy(torch, k, v, 1, length, 16)
    q = torch.randn(length, Q_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
    cu = testing.cu_seqlens([length], DEVICE)
    ctx = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    flops = 4 * (length * (length + 1) // 2) * Q_HEADS * HEAD_DIM
    default = K.default_prefill_config(HEAD_DIM, dtype)
    candidates = [default] + [
        K.PrefillConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3, 4)
    ]
    best = None
    for cfg in candidates:
        try:
            ms = bench_ms(
                lambda c=cfg: K.paged_prefill_attention(
                    q, k_cache, v_cache, tables, cu, ctx, max_query_len=length, config=c
                )
            )
        except (triton.runtime.errors.OutOfResources, RuntimeError) as exc:
            print(f"  prefill {cfg}: {type(exc).__name__}")
            continue
        row = {"length": length, "config": asdict(cfg), "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
        result["prefill"].append(row)
        if best is None or ms < best["ms"]:
            best = row
    if best is not None:
        print(
            f"  prefill L={length} paged-16: first (default) {result['prefill'][0]['tflops']:.0f} TFLOP/s, "
            f"best {best['tflops']:.0f} TFLOP/s with {best['config']}"
        )
    return result


# ------------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------------


def decode_table(rows: list[dict[str, Any]], mode: str = "graph") -> str:
    done = [r for r in rows if "skipped" not in r and r.get("mode", "eager") == mode]
    kernels = list(dict.fromkeys(r["kernel"] for r in done))
    points = list(dict.fromkeys((r["batch"], r["context"]) for r in done))
    head = "| batch | context | " + " | ".join(kernels) + " |"
    lines = [head, "|" + "---|" * (len(kernels) + 2)]
    for batch, context in points:
        cells = []
        for name in kernels:
            r = next((x for x in done if (x["batch"], x["context"], x["kernel"]) == (batch, context, name)), None)
            cells.append("-" if r is None else f"{r['tbps']:.2f} ({r['vs_ceiling']:.0%}, {r['vs_sdpa']:.2f}x)")
        lines.append(f"| {batch} | {context} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prefill_table(rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if "skipped" not in r]
    kernels = list(dict.fromkeys(r["kernel"] for r in done))
    points = list(dict.fromkeys((r["batch"], r["length"]) for r in done))
    lines = ["| batch | length | " + " | ".join(kernels) + " |", "|" + "---|" * (len(kernels) + 2)]
    for batch, length in points:
        cells = []
        for name in kernels:
            r = next(x for x in done if (x["batch"], x["length"], x["kernel"]) == (batch, length, name))
            cells.append(f"{r['tflops']:.0f} ({r['vs_sdpa']:.2f}x)")
        lines.append(f"| {batch} | {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(decode: list[dict[str, Any]], prefill: list[dict[str, Any]]) -> dict[str, float | None]:
    """Geometric means over the grid of the ratios the targets are stated in (None where nothing was measured)."""

    def gmean(values: list[float]) -> float | None:
        return math.exp(sum(math.log(x) for x in values) / len(values)) if values else None

    out = {}
    for mode in ("graph", "eager"):
        for name in ("paged-16", "paged-1", "contiguous"):
            sel = [r for r in decode if r.get("kernel") == name and r.get("mode") == mode]
            out[f"decode {name} {mode} vs ceiling"] = gmean([r["vs_ceiling"] for r in sel])
            out[f"decode {name} {mode} vs sdpa-default"] = gmean([r["vs_sdpa"] for r in sel])
    for name in ("paged-16", "contiguous"):
        sel = [r for r in prefill if r.get("kernel") == name]
        out[f"prefill {name} vs sdpa"] = gmean([r["vs_sdpa"] for r in sel])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels.json"), help="JSON results path")
    parser.add_argument("--quick", action="store_true", help="small grid (smoke run)")
    parser.add_argument("--sweep", action="store_true", help="also time a few tile configs per kernel")
    parser.add_argument("--max-kv-gib", type=float, default=16.0, help="skip decode points with more K/V than this")
    parser.add_argument("--skip-correctness", action="store_true", help="time only")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_kernels: unset TRITON_INTERPRET (the benchmark times compiled kernels on a GPU)", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (none found)", file=sys.stderr)
        return 1
    import kvscope.kernels as K
    import triton
    from kvscope.kernels import reference as ref
    from kvscope.kernels import testing

    props = torch.cuda.get_device_properties(0)
    meta = {
        "device": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "memory_gib": props.total_memory / GiB,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "heads": {"q": Q_HEADS, "kv": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16"},
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "default_configs": {
            "decode": asdict(K.default_decode_config(HEAD_DIM, torch.bfloat16)),
            "prefill": asdict(K.default_prefill_config(HEAD_DIM, torch.bfloat16)),
        },
    }
    print(f"# kvscope kernels on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})\n")
    t0 = time.perf_counter()
    torch.manual_seed(0)

    correctness = []
    if not args.skip_correctness:
        print("## correctness (vs torch reference)")
        correctness = check_correctness(torch, K, ref, testing)

    ceiling = copy_ceiling_tbps(torch)
    print(f"\ncopy ceiling: {ceiling['tbps']:.2f} TB/s (device-to-device copy of 2 GiB, read + write)\n")

    print("## decode")
    batches = QUICK_DECODE_BATCHES if args.quick else FULL_DECODE_BATCHES
    contexts = QUICK_DECODE_CONTEXTS if args.quick else FULL_DECODE_CONTEXTS
    decode = bench_decode(torch, K, batches, contexts, args.max_kv_gib, ceiling["tbps"])

    print("\n## prefill")
    prefill = bench_prefill(torch, K, testing, QUICK_PREFILL if args.quick else FULL_PREFILL)

    sweep = sweep_configs(torch, K, testing) if args.sweep else None
    totals = summary(decode, prefill)
    result = {
        "meta": meta | {"seconds": time.perf_counter() - t0},
        "correctness": correctness,
        "copy_ceiling": ceiling,
        "decode": decode,
        "prefill": prefill,
        "summary": totals,
        "sweep": sweep,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))

    for mode in ("graph", "eager"):
        print(
            f"\n## decode, {mode}: achieved TB/s (share of the {ceiling['tbps']:.2f} TB/s copy ceiling, speed vs "
            "SDPA's default backend in the same mode)\n"
        )
        print(decode_table(decode, mode))
    print("\n## prefill: TFLOP/s (speed vs SDPA)\n")
    print(prefill_table(prefill))
    print("\n## summary (geometric means over the grid)\n")
    for key, value in totals.items():
        print(f"- {key}: {'n/a' if value is None else f'{value:.3f}'}")
    failed = [c["kernel"] for c in correctness if not c["ok"]]
    if failed:
        print(f"\nCORRECTNESS FAILED: {', '.join(failed)}")
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
