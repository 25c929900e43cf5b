"""static vs paged vs vmm on one GPU: the same ShareGPT-like workload, the same KV budget, real forward passes.

    python benchmarks/bench_e2e.py --out e2e/e2e.json            # full run (a few minutes on an H100)
    python benchmarks/bench_e2e.py --quick --out e2e/e2e.json    # smoke run (well under a minute)

Each allocator runs through `kvscope.engine.record_run` with the cuda executor (Triton attention in each allocator's
own memory; `--attention sdpa` puts torch SDPA on the static and vmm memory instead) and writes a trace next to the
JSON (<out dir>/<allocator>.kvtrace). Before each timed run a short warm-up run compiles the Triton kernels for that
layout, so compilation is not in the numbers. Per allocator the JSON has the trace's summary (kvscope.analysis), the
largest batch reached, tokens/s, peak waste, preemptions, GPU time of the forward passes and the K/V bandwidth
attention achieved, VMM mapping time on and off the critical path, NVML used bytes around the run and what the
CUDA VMM backend found still held at teardown. Exits 1 with one line when there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ALLOCATORS = ("static", "paged", "vmm")


def nvml_used(device: int) -> int | None:
    from kvscope.nvml import NvmlSampler, NvmlUnavailable

    try:
        sampler = NvmlSampler(device, sample_torch=False)
    except NvmlUnavailable:
        return None
    try:
        return sampler.used_bytes()
    finally:
        sampler.stop()


def use_cuda_executor_on_cpu() -> None:
    """Plumbing check without a GPU: route "cpu" to the cuda executor running kvscope.kernels.reference on CPU
    tensors. (On cuda, record_run's own executor gets every option through RunConfig.)"""
    from kvscope.engine.cuda_executor import CudaExecutor
    from kvscope.engine.executor import register_executor

    def factory(spec, allocator, options):
        return CudaExecutor(
            spec, allocator, replace(options, cuda=replace(options.cuda, kernels="reference")), device="cpu"
        )

    register_executor("cpu", factory)


def step_figures(trace) -> dict[str, Any]:
    """Largest batch, forward-pass GPU time and achieved K/V bandwidth, straight from the trace's step events."""
    ev = trace.events
    steps = ev[ev["kind"] == "step"]
    kern = ev[ev["kind"] == "step_kernel"]
    kernel_s = float(kern["dur_ns"].sum()) / 1e9
    kv_bytes = int(kern["bytes"].sum())
    attn = ev[ev["kind"] == "step_attention"]
    attn_s = float(attn["dur_ns"].sum()) / 1e9
    decode_steps = steps["step"].isin(ev[(ev["kind"] == "step_prefill") & (ev["n"] == 0)]["step"])
    steady = steps[decode_steps & (steps["step"] > 0)]
    ceiling = (trace.meta.get("warmup") or {}).get("copy_ceiling_tbps")
    return {
        "attention_gpu_s": attn_s,
        "attention_kv_tbps": int(attn["bytes"].sum()) / attn_s / 1e12 if attn_s else None,
        "copy_ceiling_tbps": ceiling,
        "first_step_ms": float(steps["dur_ns"].iloc[0]) / 1e6 if len(steps) else None,
        "decode_step_ms_median": float(steady["dur_ns"].median()) / 1e6 if len(steady) else None,
        "decode_step_ms_max": float(steady["dur_ns"].max()) / 1e6 if len(steady) else None,
        "max_batch_reached": int(steps["n"].max()) if len(steps) else 0,
        "step_ms_median": float(steps["dur_ns"].median()) / 1e6 if len(steps) else None,
        "forward_gpu_s": kernel_s,
        "kv_bytes_read": kv_bytes,
        "attention_kv_tbps_upper": kv_bytes / kernel_s / 1e12 if kernel_s else None,
    }


def run_one(name: str, args: argparse.Namespace, requests, description: dict, out_dir: Path) -> dict[str, Any]:
    import torch

    from kvscope.analysis.summary import summarize
    from kvscope.engine.api import RunConfig, record_run
    from kvscope.trace import load_trace

    attention = "triton" if name == "paged" else args.attention
    if args.device == "cpu":
        use_cuda_executor_on_cpu()
    cuda = args.device == "cuda"
    base = RunConfig(
        allocator=name,
        device=args.device,
        model=args.model,
        layers=args.layers,
        kv_memory=args.kv_memory,
        max_len=args.max_len,
        max_batch=args.max_batch,
        max_tokens_per_step=args.max_tokens_per_step,
        seed=args.seed,
        block_size=args.block_size if name == "paged" else None,
        page_size=args.page_size if name == "vmm" else None,
        megacache=args.megacache if name == "vmm" else False,
        static_variant=args.static_variant if name == "static" else None,
        attention=attention,
        background_map=not args.no_background if name == "vmm" else True,
        cuda_graphs=not args.eager,
    )
    # Warm-up: every run's executor does the same before its first step (kvscope.engine.warmup: copy ceiling,
    # every kernel variant compiled, decode graphs captured), recorded in the trace's meta["warmup"].
    before = nvml_used(torch.cuda.current_device()) if cuda else None
    path = out_dir / f"{name}.kvtrace"
    grabbed: dict[str, Any] = {}

    def setup(engine) -> None:
        grabbed["executor"] = engine.executor
        grabbed["backend"] = getattr(engine.allocator, "backend", None)

    t0 = time.perf_counter()
    result = record_run(
        requests, base, path=path, workload=description, progress=False, command=" ".join(sys.argv), setup=setup
    )
    wall = time.perf_counter() - t0
    after = None
    if cuda:
        torch.cuda.empty_cache()
        after = nvml_used(torch.cuda.current_device())
    trace = load_trace(path)
    summary = summarize(trace)
    ex = grabbed.get("executor")
    out: dict[str, Any] = {
        "trace": str(path),
        "attention": attention,
        "wall_s": wall,
        "finished_requests": result.stats.finished_requests,
        "rejected_requests": result.stats.rejected_requests,
        "preemptions": summary.get("preemptions"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "generated_tokens": summary.get("generated_tokens"),
        "peak_waste_bytes": summary.get("peak_waste_bytes"),
        "peak_reserved_bytes": summary.get("peak_reserved_bytes"),
        "peak_used_bytes": summary.get("peak_used_bytes"),
        "mean_waste_fraction": summary.get("mean_waste_fraction"),
        **step_figures(trace),
        "nvml_used_before": before,
        "nvml_used_after": after,
        "summary": summary,
    }
    backend = grabbed.get("backend")
    if backend is not None:
        out["vmm_backend_leaked"] = getattr(backend, "leaked", None)  # what record_run's teardown found still held
        out["vmm_driver_calls"] = dict(backend.calls)
    if ex is not None:
        out["mapping"] = ex.mapping.to_dict()
        out["executor_memory"] = ex.memory
        out["compiles_since_warmup"] = ex.compiles_since_warmup() if hasattr(ex, "compiles_since_warmup") else None
        out["graph_steps"] = getattr(ex, "graph_steps", None)
        out["eager_steps"] = getattr(ex, "eager_steps", None)
    out["warmup"] = trace.meta.get("warmup")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("e2e/bench_e2e.json"), help="JSON results; traces go beside it")
    p.add_argument("--quick", action="store_true", help="small model and workload: a smoke run")
    p.add_argument("--allocators", default=",".join(ALLOCATORS), help="comma-separated subset of static,paged,vmm")
    p.add_argument("--workload", default="sharegpt", help="named workload (sharegpt, alpaca, ...) or a .jsonl file")
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--layers", type=int, default=8, help="layers of the model (fewer: faster, same KV per layer)")
    p.add_argument("--kv-memory", default="4GiB", help="the KV budget every allocator gets")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-tokens-per-step", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16, help="paged")
    p.add_argument("--page-size", default="2MiB", help="vmm")
    p.add_argument("--megacache", action="store_true", help="vmm: one buffer for all layers")
    p.add_argument("--static-variant", default="max", choices=("max", "pow2", "oracle"))
    p.add_argument("--attention", choices=("triton", "sdpa"), default="triton", help="static and vmm")
    p.add_argument("--no-background", action="store_true", help="vmm: map pages on the engine thread only")
    p.add_argument("--eager", action="store_true", help="decode steps eagerly (default: CUDA graphs where possible)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)  # cpu: plumbing check
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.layers, args.kv_memory, args.max_len, args.max_batch = 48, 2, "512MiB", 1024, 64
    if args.device == "cpu":  # no GPU: the tiny model, reference kernels, host pages, one thread for tiny tensors
        args.model, args.layers, args.kv_memory, args.page_size = "tiny", None, "1MiB", "4KiB"
        args.workload, args.requests, args.max_len, args.max_batch = "alpaca", min(args.requests, 8), 256, 8
        import torch

        torch.set_num_threads(1)

    from kvscope.cudainfo import probe, versions
    from kvscope.units import parse_size
    from kvscope.workload_gen import resolve_workload

    info = probe()
    if args.device == "cuda" and not info.available:
        print(f"bench_e2e: {info.reason}", file=sys.stderr)
        return 1
    names = [a.strip() for a in args.allocators.split(",") if a.strip()]
    bad = [a for a in names if a not in ALLOCATORS]
    if bad:
        print(f"bench_e2e: --allocators: unknown {bad[0]!r} (choose from {', '.join(ALLOCATORS)})", file=sys.stderr)
        return 2
    args.kv_memory = parse_size(args.kv_memory)
    args.page_size = parse_size(args.page_size)
    requests, description = resolve_workload(
        args.workload, requests=args.requests, seed=args.seed, max_len=args.max_len
    )
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "e2e",
        "device": info.device().name if args.device == "cuda" else "cpu (plumbing check)",
        "versions": versions(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": description,
        "runs": {},
    }
    for name in names:
        print(f"bench_e2e: {name} ...", file=sys.stderr, flush=True)
        result["runs"][name] = run_one(name, args, requests, description, out_dir)
        args.out.write_text(json.dumps(result, indent=2, default=str))  # keep what is done if a later run fails
    print_table(result)
    print(f"wrote {args.out}")
    return 0


def print_table(result: dict[str, Any]) -> None:
    gib = 1 << 30
    print(f"{result['device']}: {result['args']['model']} x{result['args']['layers']} layers, "
          f"KV budget {result['args']['kv_memory'] / gib:.2f} GiB, {result['args']['requests']} requests")  # fmt: skip
    head = f"{'allocator':<10}{'max batch':>10}{'tok/s':>10}{'peak waste GiB':>16}{'preempt':>9}{'finished':>10}"
    print(head + f"{'fwd GPU s':>11}{'attn TB/s':>10}{'dec ms p50':>11}{'dec ms max':>11}{'compiles':>9}"
          f"{'map on ms':>11}{'map off ms':>12}")  # fmt: skip
    for name, r in result["runs"].items():
        m = r.get("mapping") or {}
        print(
            f"{name:<10}{r['max_batch_reached']:>10}{(r['tokens_per_s'] or 0):>10.0f}"
            f"{(r['peak_waste_bytes'] or 0) / gib:>16.3f}{(r['preemptions'] or 0):>9}{r['finished_requests']:>10}"
            f"{r['forward_gpu_s']:>11.2f}{(r['attention_kv_tbps'] or 0):>10.2f}"
            f"{(r['decode_step_ms_median'] or 0):>11.2f}{(r['decode_step_ms_max'] or 0):>11.2f}"
            f"{r.get('compiles_since_warmup')!s:>9}{m.get('on_path_driver_ns', 0) / 1e6:>11.2f}"
            f"{m.get('ahead_driver_ns', 0) / 1e6:>12.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
