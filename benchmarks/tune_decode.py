"""Tile and split-count sweep of the paged decode kernel (block size 16) against torch SDPA, CUDA-graph mode.

    python benchmarks/tune_decode.py --out /tmp/tune.json                    # the bench_kernels decode grid
    python benchmarks/tune_decode.py --batches 1,16 --contexts 4096 --out /tmp/t.json
    python benchmarks/tune_decode.py --before path/to/old/kernels ...        # also time an older copy of kernels/
    python benchmarks/tune_decode.py --layout contiguous ...                 # the contiguous kernel instead
    TRITON_INTERPRET=1 python benchmarks/tune_decode.py --dry-run             # tiny shapes on CPU: does it run

For issue 14's decode target (paged-16 vs "sdpa-default" in graph mode). For every (batch, context) point: SDPA with
its default backend; the paged kernel with its default config (heuristic split count); optionally an older copy of
the kernels package (--before, imported as a package of that directory's name) with its defaults and the new kernel
with the old split heuristic's count; the merge kernel with other module constants (MODULE_VARIANTS); at batch <= 16
the split kernel alone (what the merge costs; its answer is wrong and only timed); and a grid of tile configs
(block_n, num_warps, num_stages) x split counts. Same data, same rotation of buffer sets, same timing as bench_kernels
(graph: one CUDA graph of one call per buffer set, median of 20 replays; eager: do_bench, L2 flushed), every variant
timed in ROUNDS passes (the mean is reported, each pass kept in the JSON). Prints, per point, SDPA's time and each
kernel's speed relative to it, and the best grid entry; writes every timing as JSON. It measures and asserts
nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402

#: (block_n, num_warps, num_stages) tried for every point. num_stages >= 5 gives the paged loop two K/V buffers
#: (the next tile's loads are in flight while the current one is computed); 3 and 4 give one.
TILES = ((32, 4, 5), (64, 4, 3), (64, 4, 5), (32, 4, 3), (64, 8, 5))
SMALL_BATCH_SPLITS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128)
LARGE_BATCH_SPLITS = (1, 2, 3, 4, 5)
#: Module constants of kernels.decode tried against their defaults: (name, {constant: value}).
MODULE_VARIANTS = (("reduce_splits=16", {"REDUCE_SPLITS": 16}), ("reduce warps=8", {"REDUCE_WARPS": 8}))
#: Timing passes over all variants (a variant's time is the mean of its passes; the spread is printed).
ROUNDS = 2


def _splits_for(batch: int, context: int, block_n: int) -> list[int]:
    """Split counts that give distinct tokens per split (whole tiles) for this point."""
    tiles = max(1, -(-context // block_n))
    out, seen = [], set()
    for s in SMALL_BATCH_SPLITS if batch <= 16 else LARGE_BATCH_SPLITS:
        if s > tiles:
            break
        per = -(-tiles // s)
        if per not in seen:
            seen.add(per)
            out.append(s)
    return out


def _timer(torch, dry: bool):
    if not dry:
        return (lambda fns: bk.graph_us(torch, fns)), (lambda fn: bk.bench_ms(fn) * 1e3)

    def wall(fns) -> float:
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - t0) * 1e6 / len(fns)

    return wall, (lambda fn: wall([fn]))


def decode_sets(torch, batch: int, context: int, dtype, dry: bool) -> list[tuple]:
    """Enough copies of one decode point's inputs that a graph of one call each reads nothing from L2 (one copy in
    a dry run): (q, k4, v4, k_cache, v_cache, block_tables, seq_lens, out) each, k4/v4 the SDPA view [batch, kv
    heads, context, head_dim] of the contiguous K/V and k_cache/v_cache the same tokens paged in 16-token blocks."""
    kv_bytes = 2 * batch * context * bk.KV_HEADS * bk.HEAD_DIM * dtype.itemsize
    copies = 1 if dry else max(1, min(16, -(-bk.ROTATE_BYTES // kv_bytes)))
    sets = []
    for i in range(copies):
        k, v, _, seq_lens = bk.contiguous_kv(torch, batch, context, dtype, seed=i)
        q = torch.randn(batch, bk.Q_HEADS, bk.HEAD_DIM, device=bk.DEVICE, dtype=dtype)
        kc, vc, bt = bk.paged_copy(torch, k, v, batch, context, 16)
        k4 = k.view(batch, context, bk.KV_HEADS, bk.HEAD_DIM).transpose(1, 2)
        v4 = v.view(batch, context, bk.KV_HEADS, bk.HEAD_DIM).transpose(1, 2)
        sets.append((q, k4, v4, kc, vc, bt, seq_lens, torch.empty_like(q)))
    return sets


def point(
    torch, K, before, batch: int, context: int, graph, eager, tiles, dry: bool, layout: str = "paged"
) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if not dry else torch.float32
    kv_bytes = 2 * batch * context * bk.KV_HEADS * bk.HEAD_DIM * dtype.itemsize
    sets = decode_sets(torch, batch, context, dtype, dry)
    moved = kv_bytes + 2 * batch * bk.Q_HEADS * bk.HEAD_DIM * dtype.itemsize
    expected = bk.sdpa_default(torch, sets[0][0].unsqueeze(2), sets[0][1], sets[0][2], False)().squeeze(2).float()

    # the contiguous kernel reads the SDPA view's own buffer [batch * context, kv heads, head_dim], sequence b at row
    # b * context
    flat = [
        (q, k4.transpose(1, 2).flatten(0, 1), v4.transpose(1, 2).flatten(0, 1),
         sl.new_tensor(range(0, batch * context, context)), sl, o)
        for q, k4, v4, _, _, _, sl, o in (sets if layout == "contiguous" else [])
    ]  # fmt: skip

    def kernel_fns(module, cfg):
        if layout == "contiguous":
            return [
                (lambda q=q, k=k, v=v, tb=tb, sl=sl, o=o: module.contiguous_decode_attention(
                    q, k, v, tb, sl, max_seq_len=context, out=o, config=cfg))
                for q, k, v, tb, sl, o in flat
            ]  # fmt: skip
        return [
            (lambda q=q, kc=kc, vc=vc, bt=bt, sl=sl, o=o: module.paged_decode_attention(
                q, kc, vc, bt, sl, max_seq_len=context, out=o, config=cfg))
            for q, _, _, kc, vc, bt, sl, o in sets
        ]  # fmt: skip

    variants: list[tuple[str, dict[str, Any], list, bool]] = []  # name, description, fns, eager too
    decode_module: Any = importlib.import_module(K.__name__ + ".decode")
    sdpa = [bk.sdpa_default(torch, q.unsqueeze(2), k4, v4, False) for q, k4, v4, *_ in sets]
    variants.append(("sdpa-default", {}, sdpa, True))
    if before is not None:
        variants.append(("before", {}, kernel_fns(before, None), True))
    base = K.default_decode_config(bk.HEAD_DIM, dtype)
    variants.append(("default", asdict(base), kernel_fns(K, None), True))
    for name, consts in MODULE_VARIANTS:  # module constants, read at each call (and so at capture)
        variants.append((f"default {name}", {"module": consts}, kernel_fns(K, None), False))
    if before is not None:  # the new kernel with the old heuristic's split count
        tiles_n = max(1, -(-context // base.block_n))
        old = before.common.choose_num_splits(batch * bk.KV_HEADS, tiles_n, before.common.sm_count(sets[0][0].device))
        old_fns = kernel_fns(K, replace(base, num_splits=old))
        variants.append((f"default old-heuristic splits={old}", {}, old_fns, False))
    if batch <= 16 and not dry:  # what the merge kernel costs: the split kernel alone (a wrong answer, timed only)
        variants.append(("default split kernel only", {"skip_reduce": True}, kernel_fns(K, None), False))
    for block_n, warps, stages in tiles:
        for ns in _splits_for(batch, context, block_n):
            cfg = K.DecodeConfig(block_n=block_n, num_warps=warps, num_stages=stages, num_splits=ns)
            variants.append((f"bn={block_n} w={warps} s={stages} splits={ns}", asdict(cfg), kernel_fns(K, cfg), False))
    desc_of = {name: desc for name, desc, _, _ in variants}
    rows = []
    timings: dict[tuple[str, str], list[float]] = {}
    errors: dict[str, float] = {}
    saved = {name: getattr(decode_module, name) for name in ("REDUCE_SPLITS", "REDUCE_WARPS", "_decode_reduce_kernel")}

    class _NoReduce:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for rnd in range(ROUNDS):
        for name, desc, fns, with_eager in variants:
            for const, value in desc.get("module", {}).items():
                setattr(decode_module, const, value)
            if desc.get("skip_reduce"):
                decode_module._decode_reduce_kernel = _NoReduce()
            try:
                if rnd == 0:
                    res = fns[0]()
                    got = (res.squeeze(2) if res.dim() == 4 else res).float()
                    errors[name] = (got - expected).abs().max().item()
                timings.setdefault((name, "graph"), []).append(graph(fns))
                if with_eager:
                    timings.setdefault((name, "eager"), []).append(eager(fns[0]))
            except Exception as exc:  # one config that does not compile or fit must not end the sweep
                if rnd == 0:
                    print(f"  B={batch} L={context} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            finally:
                for const, value in saved.items():
                    setattr(decode_module, const, value)
    for (name, mode), times in timings.items():
        us = sum(times) / len(times)
        ref = timings[("sdpa-default", mode)]
        ref_us = sum(ref) / len(ref)
        rows.append({"batch": batch, "context": context, "variant": name, "config": desc_of[name], "mode": mode,
                     "us": us, "us_rounds": times, "tbps": moved / (us * 1e-6) / 1e12, "vs_sdpa": ref_us / us,
                     "max_abs_err_vs_sdpa": errors.get(name)})  # fmt: skip
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    lines = ["| batch | context | sdpa-default us | before | default | before (eager) | default (eager) "
             "| best grid entry |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    points = list(dict.fromkeys((r["batch"], r["context"]) for r in rows))
    for batch, context in points:
        here = {r["variant"]: r for r in rows if (r["batch"], r["context"], r["mode"]) == (batch, context, "graph")}
        grid = [r for n, r in here.items() if n.startswith("bn=")]
        best = max(grid, key=lambda r: r["vs_sdpa"]) if grid else None

        eager = {r["variant"]: r for r in rows if (r["batch"], r["context"], r["mode"]) == (batch, context, "eager")}

        def cell(name: str, here: dict[str, Any] = here) -> str:
            r = here.get(name)
            return "-" if r is None else f"{r['us']:.1f} us ({r['vs_sdpa']:.2f}x)"

        best_cell = "-" if best is None else f"{best['variant']}: {best['us']:.1f} us ({best['vs_sdpa']:.2f}x)"
        sdpa_us = here["sdpa-default"]["us"] if "sdpa-default" in here else float("nan")
        lines.append(
            f"| {batch} | {context} | {sdpa_us:.1f} | {cell('before')} | {cell('default')} | "
            f"{cell('before', eager)} | {cell('default', eager)} | {best_cell} |"
        )
    return "\n".join(lines)


def tile_summary(rows: list[dict[str, Any]]) -> str:
    """Per tile config: geometric mean over the points of its best split's ratio (what a perfect split choice
    would give with those tiles)."""
    out = []
    tiles = list(dict.fromkeys(r["variant"].rsplit(" splits=", 1)[0] for r in rows if r["variant"].startswith("bn=")))
    points = list(dict.fromkeys((r["batch"], r["context"]) for r in rows))
    for t in tiles:
        best = []
        for p in points:
            sel = [r["vs_sdpa"] for r in rows if (r["batch"], r["context"]) == p and r["mode"] == "graph"
                   and r["variant"].startswith(t + " splits=")]  # fmt: skip
            if sel:
                best.append(max(sel))
        if best:
            g = math.exp(sum(map(math.log, best)) / len(best))
            out.append(f"- {t}: best-split gmean {g:.3f}x, worst point {min(best):.2f}x")
    return "\n".join(out)


def profile_sdpa(torch, batch: int, context: int) -> list[str]:
    """Names of the GPU kernels one sdpa-default decode call runs."""
    from torch.profiler import ProfilerActivity, profile

    k, v, _, _ = bk.contiguous_kv(torch, batch, context, torch.bfloat16)
    q = torch.randn(batch, bk.Q_HEADS, 1, bk.HEAD_DIM, device=bk.DEVICE, dtype=torch.bfloat16)
    k4 = k.view(batch, context, bk.KV_HEADS, bk.HEAD_DIM).transpose(1, 2)
    v4 = v.view(batch, context, bk.KV_HEADS, bk.HEAD_DIM).transpose(1, 2)
    fn = bk.sdpa_default(torch, q, k4, v4, False)
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.key for e in prof.key_averages() if e.device_type.name == "CUDA"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", default=",".join(map(str, bk.FULL_DECODE_BATCHES)))
    parser.add_argument("--contexts", default=",".join(map(str, bk.FULL_DECODE_CONTEXTS)))
    parser.add_argument("--max-kv-gib", type=float, default=16.0)
    parser.add_argument("--before", type=Path, help="directory of an older kernels package to time side by side")
    parser.add_argument("--tiles", default="", help="block_n:warps:stages,... (default: the built-in grid)")
    parser.add_argument("--layout", choices=("paged", "contiguous"), default="paged", help="the cache kvscope reads")
    parser.add_argument("--no-grid", action="store_true", help="only SDPA, before and the defaults")
    parser.add_argument("--profile", action="store_true", help="list the kernels sdpa-default runs")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if dry and os.environ.get("TRITON_INTERPRET") != "1":
        print("tune_decode: --dry-run needs TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    import torch

    if dry:
        bk.DEVICE = "cpu"
        bk.Q_HEADS, bk.KV_HEADS, bk.HEAD_DIM = 4, 1, 16
    elif not torch.cuda.is_available():
        print("tune_decode: needs a CUDA GPU", file=sys.stderr)
        return 1
    import kvscope.kernels as K

    before = None
    if args.before is not None:
        sys.path.insert(0, str(args.before.resolve().parent))
        before = importlib.import_module(args.before.resolve().name)
    tiles: tuple[tuple[int, ...], ...] = TILES
    if args.tiles:
        tiles = tuple(tuple(int(x) for x in t.split(":")) for t in args.tiles.split(","))
    if args.no_grid:
        tiles = ()
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    graph, eager = _timer(torch, dry)
    meta: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__}
    if not dry:
        import triton

        meta |= {"device": torch.cuda.get_device_name(0), "triton": triton.__version__}
        print(f"# tune_decode on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})")
        if args.profile:
            for b, c in ((1, 4096), (64, 4096)):
                meta[f"sdpa_kernels_{b}x{c}"] = names = profile_sdpa(torch, b, c)
                print(f"sdpa-default kernels at {b} x {c}: {names}")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for context in contexts:
        for batch in batches:
            if 2 * batch * context * bk.KV_HEADS * bk.HEAD_DIM * 2 > args.max_kv_gib * bk.GiB:
                continue
            rows.extend(point(torch, K, before, batch, context, graph, eager, tiles, dry, args.layout))
            here = [r for r in rows if (r["batch"], r["context"]) == (batch, context) and r["mode"] == "graph"]
            default = next((r for r in here if r["variant"] == "default"), None)
            best = max((r for r in here if r["variant"].startswith("bn=")), key=lambda r: r["vs_sdpa"], default=None)
            print(f"  B={batch:<4} L={context:<6} default {default['vs_sdpa'] if default else float('nan'):.2f}x"
                  + (f"  best {best['vs_sdpa']:.2f}x {best['variant']}" if best else "")
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            if not dry:
                torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n## graph mode (us, speed vs sdpa-default)\n")
    print(report(rows))
    print("\n## per tile config\n")
    print(tile_summary(rows))
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
