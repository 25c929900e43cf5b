"""Experiment (issue 14, batch 16): the paged decode split kernel with K/V tiles fetched by TMA (host-side tensor
descriptors), timed against SDPA's default backend and kvscope's paged-16 kernel in graph mode on the same data.

    python benchmarks/exp_tma_decode.py --out /tmp/tma.json
    TRITON_INTERPRET=1 python benchmarks/exp_tma_decode.py --dry-run --out /tmp/tma.json

Each K/V tile is one block's rows of one kv head: a [BLOCK_N, head_dim] box of the cache viewed as
[num_blocks * block_size, kv_heads * head_dim] (rows of a block are contiguous in kvscope's and vLLM's pools). The
splits are merged by kvscope's merge kernel. It measures and asserts nothing.
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


@triton.jit(do_not_specialize=["tokens_per_split"])
def _tma_split_kernel(
    q_ptr,
    k_desc,
    v_desc,
    bt_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    tokens_per_split,
    stride_qb,
    stride_qh,
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
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
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
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    q_heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)  # fmt: skip
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    col = kv_head * HEAD_DIM
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        block = tl.load(bt_row + start // PAGE)
        r = block * PAGE + start % PAGE
        n_mask = start + offs_n < hi
        k = k_desc.load([r, col])
        s = tl.dot(q, tl.trans(k)) * scale_log2
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([r, col])
        v = tl.where(n_mask[:, None], v, 0.0)  # rows past the end: stale cache contents, maybe NaN bits
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if DIRECT_OUT:
        out_ptrs = out_ptr + seq.to(tl.int64) * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        part = part_out_ptr + seq.to(tl.int64) * stride_pb + q_heads.to(tl.int64) * stride_ph + split * stride_ps
        tl.store(part[:, None] + offs_d[None, :], o, mask=g_mask[:, None] & (lo < seq_len))
        lse = m_i + tl.log2(l_safe)
        lse_ptrs = part_lse_ptr + seq.to(tl.int64) * stride_lb + q_heads.to(tl.int64) * stride_lh + split
        tl.store(lse_ptrs, lse, mask=g_mask)


def tma_decode(torch, q, k_cache, v_cache, block_tables, seq_lens, max_seq_len, out, block_n, warps, stages, splits):
    from kvscope.kernels import decode as D
    from triton.tools.tensor_descriptor import TensorDescriptor

    nb, page, kvh, d = k_cache.shape
    if page % block_n:
        raise ValueError(f"a TMA tile of {block_n} rows must lie in one {page}-token block")
    batch, hq, _ = q.shape
    group = hq // kvh
    rows = [nb * page, kvh * d]
    kd = TensorDescriptor(k_cache, rows, [k_cache.stride(1), 1], [block_n, d])
    vd = TensorDescriptor(v_cache, rows, [v_cache.stride(1), 1], [block_n, d])
    tps = D.split_length(max_seq_len, splits, block_n)
    splits = -(-max_seq_len // tps)
    direct = splits == 1
    part_out, part_lse, sp = partials(torch, out, splits)
    _tma_split_kernel[(kvh, splits, batch)](
        q, kd, vd, block_tables, seq_lens, out, part_out, part_lse, (d**-0.5) * 1.4426950408889634, tps,
        *q.stride()[:2], block_tables.stride(0), *out.stride()[:2], *sp,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_N=block_n, PAGE=page,
        DIRECT_OUT=direct, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    merge(part_out, part_lse, out, splits, sp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--tiles", default="16:4:3,16:4:4,16:4:6,16:4:8,16:2:4,16:2:6,16:2:8,16:8:4")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if args.dry_run:
        use_cpu_shapes()
    else:
        # TMA descriptors need 16-byte aligned strides and a global scratch allocator for device-side descriptors
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    tiles = [tuple(int(x) for x in t.split(":")) for t in args.tiles.split(",")]

    def variants_for(torch, sets, batch: int, context: int) -> dict[str, list]:
        out = {}
        for bn, w, st in tiles:
            for ns in (1, 2, 3, 4, 6, 8, 16, 32, 64):
                if ns > -(-context // bn) or (batch >= 64 and ns > 2):
                    continue
                out[f"tma bn={bn} w={w} s={st} splits={ns}"] = [
                    (lambda q=q, kc=kc, vc=vc, bt=bt, sl=sl, o=o, a=(bn, w, st, ns): tma_decode(
                        torch, q, kc, vc, bt, sl, context, o, *a))
                    for q, _, _, kc, vc, bt, sl, o in sets
                ]  # fmt: skip
        return out

    sweep(torch, args.out, args.batches, args.contexts, args.dry_run, "tma", variants_for)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1" and "--dry-run" not in sys.argv:
        sys.exit("exp_tma_decode: TRITON_INTERPRET=1 needs --dry-run")
    sys.exit(main())
