"""The harness of the decode-kernel experiments (exp_tma_decode.py, exp_stream_decode.py): for each (batch, context)
point, SDPA's default backend, kvscope's paged-16 kernel and the experiment's variants on the same data, graph mode
(one call per rotating buffer set, bench_kernels.graph_us), each checked against SDPA; one JSON of every timing. It
measures and asserts nothing."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402
from tune_decode import decode_sets  # noqa: E402

#: (torch, sets, batch, context) -> {variant name: one call per buffer set}
Variants = Callable[[Any, list, int, int], dict[str, list]]


def use_cpu_shapes() -> None:
    """--dry-run: tiny heads on CPU, for Triton's interpreter."""
    bk.DEVICE = "cpu"
    bk.Q_HEADS, bk.KV_HEADS, bk.HEAD_DIM = 4, 1, 16


def partials(torch, out, splits: int) -> tuple[Any, Any, tuple[int, ...]]:
    """(part_out, part_lse, their strides) of a split-K call into `out` [batch, q heads, head_dim]: fp32 partial
    results kvscope's merge kernel reads; with one split the kernel writes `out` and they are placeholders."""
    if splits == 1:
        return out, out, (0, 0, 0, 0, 0)
    batch, hq, d = out.shape
    part_out = torch.empty((batch, hq, splits, d), dtype=torch.float32, device=out.device)
    part_lse = torch.empty((batch, hq, splits), dtype=torch.float32, device=out.device)
    return part_out, part_lse, (*part_out.stride()[:3], *part_lse.stride()[:2])


def merge(part_out, part_lse, out, splits: int, strides: tuple[int, ...]) -> None:
    """kvscope's merge kernel over the partial results (nothing to do with one split)."""
    from kvscope.kernels import decode as D

    if splits == 1:
        return
    batch, hq, d = out.shape
    D._decode_reduce_kernel[(hq, batch)](
        part_out, part_lse, out, splits, *strides, *out.stride()[:2],
        HEAD_DIM=d, BLOCK_D=d, BLOCK_S=D.REDUCE_SPLITS, num_warps=D.reduce_warps(d),
    )  # fmt: skip


def sweep(torch, out: Path, batches: str, contexts: str, dry: bool, prefix: str, variants_for: Variants) -> None:
    """Time every point's variants and write them to `out`; prints, per point, the best variant whose name starts
    with `prefix`."""
    import kvscope.kernels as K
    import triton

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for context in map(int, contexts.split(",")):
        for batch in map(int, batches.split(",")):
            sets = decode_sets(torch, batch, context, torch.float32 if dry else torch.bfloat16, dry)
            timer = (lambda fns: bk.graph_us(torch, fns)) if not dry else (lambda fns: [f() for f in fns] and 1.0)
            ref = bk.sdpa_default(torch, sets[0][0].unsqueeze(2), sets[0][1], sets[0][2], False)().squeeze(2).float()
            variants: dict[str, list] = {
                "sdpa-default": [bk.sdpa_default(torch, q.unsqueeze(2), k4, v4, False) for q, k4, v4, *_ in sets],
                "paged-16": [(lambda q=q, kc=kc, vc=vc, bt=bt, sl=sl, o=o, c=context: K.paged_decode_attention(
                    q, kc, vc, bt, sl, max_seq_len=c, out=o)) for q, _, _, kc, vc, bt, sl, o in sets],
            }  # fmt: skip
            variants |= variants_for(torch, sets, batch, context)
            here = {}
            for name, fns in variants.items():
                try:
                    got = fns[0]()
                    got = (got.squeeze(2) if got.dim() == 4 else got).float()
                    err = (got - ref).abs().max().item()
                    us = timer(fns)
                except Exception as exc:  # a config that does not compile or fit must not end the sweep
                    print(f"  {batch}x{context} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    continue
                here[name] = us
                rows.append({"batch": batch, "context": context, "variant": name, "us": us, "err": err})
            base = here.get("sdpa-default", 1.0)
            ours = {n: u for n, u in here.items() if n.startswith(prefix)}
            best = min(ours, key=ours.get) if ours else None  # type: ignore[arg-type]
            worst_err = max((r["err"] for r in rows if (r["batch"], r["context"]) == (batch, context)), default=0.0)
            print(f"B={batch:<3} L={context:<6} sdpa {base:.1f} us  paged-16 {base / here.get('paged-16', 1e9):.2f}x"
                  + (f"  best {base / ours[best]:.2f}x {best}" if best else "")
                  + f"  max err {worst_err:.1e}  ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            for r in rows:
                if (r["batch"], r["context"]) == (batch, context):
                    r["vs_sdpa"] = base / r["us"]
            del sets
            if not dry:
                torch.cuda.empty_cache()
    out.write_text(json.dumps({"device": "cpu" if dry else torch.cuda.get_device_name(0),
                               "triton": triton.__version__, "rows": rows}, indent=1))  # fmt: skip
