"""Experiment (issue 14, batch 16): paged decode whose program keeps STREAMS independent online softmaxes, one per
part of each loaded tile, through batched (3D) dots, and merges them once at its end.

    python benchmarks/exp_stream_decode.py --out /tmp/streams.json
    TRITON_INTERPRET=1 python benchmarks/exp_stream_decode.py --dry-run --out /tmp/streams.json

Why: an Nsight Compute profile at 16 x 1K (benchmarks/results/ncu_decode_h200.md) shows cuDNN's kernel streaming
3.3 TB/s with one 4-warp CTA per (sequence, kv head) and no split, while kvscope's one-program kernel gets 2.6 TB/s
and its three-split kernel needs a merge kernel (4 us of a 26 us call). In kvscope's kernel a [16, BLOCK_N] score
tile has its BLOCK_N columns spread over the warps, so every tile's row max and sum cross warps. Here a tile of
STREAMS x BLOCK_N tokens is a [STREAMS, BLOCK_N] batch: the batched dot can give each warp its own stream, whose
max and sum stay inside the warp; the streams are merged once, at the end. Timed against SDPA's default backend and
kvscope's paged-16 kernel in graph mode, on the same data. It measures and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_sweep import merge, partials, sweep, use_cpu_shapes  # noqa: E402


@triton.jit(do_not_specialize=["tokens_per_split", "stride_bt"])
def _stream_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    tokens_per_split,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
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
    STREAMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    kv_head = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    lo = split * tokens_per_split
    hi = tl.minimum(lo + tokens_per_split, seq_len)
    hi = tl.where(split == tl.num_programs(1) - 1, seq_len, hi)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    q_heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)  # fmt: skip
    q3 = tl.broadcast_to(q[None, :, :], (STREAMS, BLOCK_G, HEAD_DIM))
    if UPCAST_DOT:
        q3 = q3.to(tl.float32)

    # token (b, n) of a tile starting at `start` is start + b * BLOCK_N + n: stream b reads the b-th BLOCK_N rows
    tok_kv = tl.arange(0, STREAMS)[:, None, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]  # [S, N, 1]
    tok_s = tl.arange(0, STREAMS)[:, None, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, None, :]  # [S, 1, N]
    d3 = offs_d[None, None, :]
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_kh

    m_i = tl.full([STREAMS, BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([STREAMS, BLOCK_G], tl.float32)
    acc = tl.zeros([STREAMS, BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(lo, hi, STREAMS * BLOCK_N):
        pos = start + tok_kv
        valid = pos < hi
        if PAGE % BLOCK_N == 0:  # a stream's rows lie in one block: one table entry a stream
            block = tl.load(bt_row + (start + tl.arange(0, STREAMS) * BLOCK_N) // PAGE)[:, None, None].to(tl.int64)
        else:
            block = tl.load(bt_row + pos // PAGE, mask=valid, other=0).to(tl.int64)
        rows = block * stride_kb + (pos % PAGE).to(tl.int64) * stride_kt
        k = tl.load(k_head + rows + d3, mask=valid, other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q3, tl.permute(k, (0, 2, 1))) * scale_log2  # [S, G, N]
        s = tl.where(start + tok_s < hi, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 2))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a stream with no key yet (past the end)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        v = tl.load(v_head + rows + d3, mask=valid, other=0.0)
        if UPCAST_DOT:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, :, None])
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, :, None])
        m_i = m_new

    # merge the streams: each weighed by 2^(m_b - m), an empty stream (m_b = -inf) by 0
    m = tl.max(m_i, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(m_i - m_safe[None, :])
    l_tot = tl.sum(l_i * w, 0)
    acc_tot = tl.sum(acc * w[:, :, None], 0)
    l_safe = tl.where(l_tot == 0.0, 1.0, l_tot)
    o = acc_tot / l_safe[:, None]
    if DIRECT_OUT:
        out_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = part_out_ptr + seq.to(tl.int64) * stride_pb + q_heads.to(tl.int64) * stride_ph + split * stride_ps
        tl.store(part[:, None] + offs_d[None, :], o, mask=g_mask[:, None] & (lo < seq_len))
        lse = m + tl.log2(l_safe)
        lse_ptrs = part_lse_ptr + seq.to(tl.int64) * stride_lb + q_heads.to(tl.int64) * stride_lh + split
        tl.store(lse_ptrs, lse, mask=g_mask)


def stream_decode(torch, q, k_cache, v_cache, block_tables, seq_lens, max_seq_len, out, streams, block_n, warps,
                  stages, splits):  # fmt: skip
    from kvscope.kernels import decode as D
    from kvscope.kernels.common import INTERPRETED

    _, page, kvh, d = k_cache.shape
    batch, hq, _ = q.shape
    group = hq // kvh
    tile = streams * block_n
    tps = D.split_length(max_seq_len, splits, tile)
    splits = -(-max(max_seq_len, 1) // tps)
    direct = splits == 1
    part_out, part_lse, sp = partials(torch, out, splits)
    _stream_split_kernel[(kvh, splits, batch)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse, (d**-0.5) * 1.4426950408889634, tps,
        *q.stride()[:2], k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        *out.stride()[:2], *sp,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, STREAMS=streams, BLOCK_N=block_n,
        PAGE=page, DIRECT_OUT=direct, UPCAST_DOT=INTERPRETED, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    merge(part_out, part_lse, out, splits, sp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--tiles", default="4:16:4:3,4:16:4:4,4:32:4:3,4:32:4:4,2:32:4:4,2:64:4:3,4:16:8:4,8:16:8:3",
                    help="streams:block_n:warps:stages,...")  # fmt: skip
    ap.add_argument("--splits", default="1,2,3,4,6,8,16,32")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if args.dry_run:
        use_cpu_shapes()
    tiles = [tuple(int(x) for x in t.split(":")) for t in args.tiles.split(",")]

    def variants_for(torch, sets, batch: int, context: int) -> dict[str, list]:
        out = {}
        for st, bn, w, stg in tiles:
            for ns in map(int, args.splits.split(",")):
                if ns > -(-context // (st * bn)) or (batch >= 64 and ns > 2) or (batch >= 16 and ns > 8):
                    continue
                out[f"streams={st} bn={bn} w={w} s={stg} splits={ns}"] = [
                    (lambda q=q, kc=kc, vc=vc, bt=bt, sl=sl, o=o, a=(st, bn, w, stg, ns): stream_decode(
                        torch, q, kc, vc, bt, sl, context, o, *a))
                    for q, _, _, kc, vc, bt, sl, o in sets
                ]  # fmt: skip
        return out

    sweep(torch, args.out, args.batches, args.contexts, args.dry_run, "streams", variants_for)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1" and "--dry-run" not in sys.argv:
        sys.exit("exp_stream_decode: TRITON_INTERPRET=1 needs --dry-run")
    sys.exit(main())
