"""What CUDA VMM costs: each driver call per 2 MiB page, and what page mapping does to a decode step.

    python benchmarks/bench_vmm.py --out vmm.json            # full run (~1-2 min on an H100)
    python benchmarks/bench_vmm.py --quick --out vmm.json    # smoke run (seconds)

Part 1, driver calls: reserve / create / map / set_access / unmap / release / free_reservation over many pages,
each call timed on the host (perf_counter_ns; the VMM calls are synchronous), median / p90 / mean in microseconds.
Also one cuMemSetAccess over a range of many mapped pages, against one call per page (is the cost per call or per
page?), and a large reservation like the allocator's (one virtual buffer of a 32-layer model).

Part 2, the decode step (needs the cuda executor): the same batch of decodes on VMM memory three ways:
  premapped   every page the run needs is mapped before timing (the lower bound: no mapping at all)
  sync        pages are mapped when a sequence crosses a page boundary, on the engine thread (critical path)
  background  the next step's pages are mapped on a thread while this step's forward pass runs (vAttention)
Step times come from the host clock around the whole step (what the user waits for) and from CUDA events around
the forward pass; mapping time on and off the critical path, per decode step, from the executor's per-step counters
(the CUDA backend times every driver call on the thread that makes it). Modes run --repeats times, interleaved.
Read the mapping columns first: with a small model the step is bound by kernel launches on the host, whose jitter
(a few ms) can exceed the mapping cost being compared.

Writes one JSON file (--out) and prints a short table. Exits 1 with one line when there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20


def summarize_ns(samples: list[int]) -> dict[str, float]:
    """Median / p90 / mean / min / max in microseconds, and the count."""
    if not samples:
        return {"n": 0}
    s = sorted(samples)
    p90 = s[min(len(s) - 1, int(0.9 * (len(s) - 1) + 0.5))]
    return {
        "n": len(s),
        "median_us": statistics.median(s) / 1e3,
        "p90_us": p90 / 1e3,
        "mean_us": statistics.fmean(s) / 1e3,
        "min_us": s[0] / 1e3,
        "max_us": s[-1] / 1e3,
    }


def timed(fn, *args) -> tuple[Any, int]:
    t0 = time.perf_counter_ns()
    out = fn(*args)
    return out, time.perf_counter_ns() - t0


def bench_driver_calls(mem: Any, pages: int, rounds: int, range_pages: int) -> dict[str, Any]:
    """Per-call costs over `rounds` x `pages` pages of mem.granularity bytes (the first round is a warm-up)."""
    page = mem.granularity
    samples: dict[str, list[int]] = {op: [] for op in ("create", "map", "set_access", "unmap", "release")}
    samples["reserve"] = []
    samples["free_reservation"] = []
    for r in range(rounds + 1):
        va, t_res = timed(mem.reserve, pages * page)
        handles = []
        round_samples: dict[str, list[int]] = {k: [] for k in samples}
        round_samples["reserve"].append(t_res)
        for _ in range(pages):
            h, t = timed(mem.create, page)
            handles.append(h)
            round_samples["create"].append(t)
        for i, h in enumerate(handles):
            _, t = timed(mem.map, va + i * page, page, h)
            round_samples["map"].append(t)
            _, t = timed(mem.set_access, va + i * page, page)
            round_samples["set_access"].append(t)
        for i in range(pages):
            _, t = timed(mem.unmap, va + i * page, page)
            round_samples["unmap"].append(t)
        for h in handles:
            _, t = timed(mem.release, h)
            round_samples["release"].append(t)
        _, t = timed(mem.free_reservation, va, pages * page)
        round_samples["free_reservation"].append(t)
        if r > 0:  # round 0 pays for first-touch costs in the driver
            for k, v in round_samples.items():
                samples[k].extend(v)
    out: dict[str, Any] = {"page_bytes": page, "pages_per_round": pages, "rounds": rounds}
    out["calls"] = {op: summarize_ns(v) for op, v in samples.items()}
    out["map_page_us"] = out["calls"]["map"]["median_us"] + out["calls"]["set_access"]["median_us"]
    out["unmap_release_page_us"] = out["calls"]["unmap"]["median_us"] + out["calls"]["release"]["median_us"]
    out["create_map_page_us"] = out["calls"]["create"]["median_us"] + out["map_page_us"]
    if mem.name == "cuda":  # one cuMemSetAccess over many mappings: a driver-only question
        out["set_access_range"] = bench_set_access_range(mem, range_pages, rounds)
    return out


def bench_set_access_range(mem: Any, pages: int, rounds: int) -> dict[str, Any]:
    """One cuMemSetAccess over `pages` mapped pages vs one call per page."""
    page = mem.granularity
    va = mem.reserve(pages * page)
    handles = [mem.create(page) for _ in range(pages)]
    one_call: list[int] = []
    per_page: list[int] = []
    try:
        for r in range(rounds + 1):
            for i, h in enumerate(handles):
                mem.map(va + i * page, page, h)
            _, t = timed(_set_access_pages_as_one, mem, va, pages)
            if r:
                one_call.append(t)
            for i in range(pages):
                mem.unmap(va + i * page, page)
            for i, h in enumerate(handles):
                mem.map(va + i * page, page, h)
            t0 = time.perf_counter_ns()
            for i in range(pages):
                mem.set_access(va + i * page, page)
            if r:
                per_page.append(time.perf_counter_ns() - t0)
            for i in range(pages):
                mem.unmap(va + i * page, page)
    finally:
        for h in handles:
            mem.release(h)
        mem.free_reservation(va, pages * page)
    one = summarize_ns(one_call)
    each = summarize_ns(per_page)
    return {
        "pages": pages,
        "one_call_us": one.get("median_us"),
        "one_call_per_page_us": one["median_us"] / pages if one_call else None,
        "per_page_calls_us": each.get("median_us"),
        "per_page_calls_per_page_us": each["median_us"] / pages if per_page else None,
    }


def _set_access_pages_as_one(mem: Any, va: int, pages: int) -> None:
    """cuMemSetAccess over several mappings at once (the backend's own set_access checks one mapping per call)."""
    from kvscope.backends.cuda_vmm import _checked

    mem._bind()
    _checked("cuMemSetAccess", mem._driver.cuMemSetAccess(va, pages * mem.granularity, mem._access, 1))


def bench_big_reserve(mem: Any, size: int, rounds: int) -> dict[str, Any]:
    samples = []
    for _ in range(rounds):
        va, t = timed(mem.reserve, size)
        samples.append(t)
        mem.free_reservation(va, size)
    return {"bytes": size, **summarize_ns(samples)}


def decode_requests(batch: int, context: int, stagger: int, steps: int) -> list:
    """`batch` requests arriving together; sequence i starts with context + i * stagger tokens (so page boundaries
    are crossed at different steps) and decodes `steps` tokens after its prefill."""
    from kvscope.workload import Request

    return [
        Request(id=f"d{i}", arrival=0.0, prompt_len=context + i * stagger, output_len=steps + 1) for i in range(batch)
    ]


def decode_figures(trace, executor) -> dict[str, Any]:
    """Decode-only steps (no prefill tokens): host step time, forward-pass GPU time, and the VMM driver time on and
    off the critical path in those steps (admission-time mapping during prefill steps is left out), in ms."""
    ev = trace.events
    by_kind = {k: ev[ev["kind"] == k].set_index("step") for k in ("step", "step_prefill", "step_kernel")}
    decode_steps = by_kind["step_prefill"].index[by_kind["step_prefill"]["n"] == 0]
    step_ns = by_kind["step"].loc[decode_steps, "dur_ns"].to_numpy()
    kernel = by_kind["step_kernel"]
    fwd_ns = kernel.loc[kernel.index.intersection(decode_steps), "dur_ns"].to_numpy()
    s = summarize_ns([int(x) for x in step_ns])
    f = summarize_ns([int(x) for x in fwd_ns])
    wanted = {int(x) for x in decode_steps}
    in_decode = [m for m in executor.step_mapping if m.step in wanted]
    n = max(len(step_ns), 1)

    def ms(d: dict[str, float], key: str) -> float | None:
        return d[key] / 1e3 if key in d else None

    return {
        "decode_steps": int(len(step_ns)),
        "step_ms_median": ms(s, "median_us"),
        "step_ms_p90": ms(s, "p90_us"),
        "step_ms_mean": ms(s, "mean_us"),
        "step_ms_max": ms(s, "max_us"),
        "forward_ms_median": ms(f, "median_us"),
        "forward_ms_mean": ms(f, "mean_us"),
        "page_maps": int((ev["kind"] == "page_map").sum()),
        # Mapping in decode steps, per decode step on average: what growth costs the critical path.
        "decode_map_on_path_ms_per_step": sum(m.on_path_driver_ns for m in in_decode) / 1e6 / n,
        "decode_map_off_path_ms_per_step": sum(m.ahead_driver_ns for m in in_decode) / 1e6 / n,
        "decode_map_exposed_ms_per_step": sum(m.exposed_ns for m in in_decode) / 1e6 / n,
        "decode_steps_with_on_path_maps": sum(1 for m in in_decode if m.on_path_driver_ns),
    }


def bench_decode(args: argparse.Namespace) -> dict[str, Any]:
    """Decode steps on VMM memory: premapped vs sync vs background mapping (see the module docstring). Each mode
    runs `args.repeats` times, the modes interleaved in a rotating order, so that clock drift and run-to-run noise
    fall on every mode alike; per mode the figures are the median over its runs (each run's list is kept)."""
    from dataclasses import replace

    import torch

    from kvscope.engine.api import RunConfig, record_run
    from kvscope.spec import get_spec

    spec = get_spec(args.model, args.layers)
    row = spec.bytes_per_token if args.megacache else spec.token_bytes_per_layer_kv
    buffers = 1 if args.megacache else 2 * spec.num_layers
    tokens_per_page = args.page_size // row
    stagger = max(1, tokens_per_page // args.batch)  # spread page crossings evenly over the steps
    max_len = args.context + stagger * args.batch + args.steps + 1
    groups = -(-max_len // tokens_per_page) + 1
    capacity = args.batch * groups * buffers * args.page_size
    requests = decode_requests(args.batch, args.context, stagger, args.steps)
    base = RunConfig(
        allocator="vmm",
        device=args.device,
        model=args.model,
        layers=args.layers,
        kv_memory=capacity,
        max_len=max_len,
        max_batch=args.batch,
        max_tokens_per_step=16384,
        page_size=args.page_size,
        megacache=args.megacache,
        attention=args.attention,
    )
    modes = {
        "premapped": replace(base, eager_pages=groups, background_map=False),
        "sync": replace(base, background_map=False),
        "background": replace(base, background_map=True),
    }
    out: dict[str, Any] = {
        "model": spec.name,
        "layers": spec.num_layers,
        "batch": args.batch,
        "context": args.context,
        "stagger": stagger,
        "steps": args.steps,
        "repeats": args.repeats,
        "megacache": args.megacache,
        "tokens_per_page": tokens_per_page,
        "kv_memory": capacity,
        "attention": args.attention,
        "modes": {},
    }
    # Warm-up: compile the kernels for these shapes once.
    _use_executor(args.device)
    record_run(
        decode_requests(4, args.context, stagger, 4), replace(base, max_batch=4, background_map=False), path=None
    )
    names = list(modes)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rep in range(args.repeats):
        for mode in names[rep % len(names) :] + names[: rep % len(names)]:
            grabbed: dict[str, Any] = {}
            if args.device == "cuda":
                torch.cuda.empty_cache()
            result = record_run(
                requests,
                modes[mode],
                path=None,
                command=f"bench_vmm decode {mode}",
                setup=lambda engine, grabbed=grabbed: grabbed.update(executor=engine.executor),
            )
            ex = grabbed["executor"]
            r = decode_figures(result.trace(), ex)
            m = ex.mapping
            r["map_on_path_ms"] = m.on_path_driver_ns / 1e6  # whole run, admissions included
            r["map_off_path_ms"] = m.ahead_driver_ns / 1e6
            r["map_exposed_ms"] = m.exposed_ns / 1e6
            r["mapping"] = m.to_dict()
            r["finished_requests"] = result.stats.finished_requests
            runs[mode].append(r)
    for mode, rs in runs.items():
        merged: dict[str, Any] = {}
        for key, value in rs[0].items():
            values = [r[key] for r in rs]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and None not in values:
                merged[key] = statistics.median(values)
            else:
                merged[key] = value
        merged["runs"] = rs
        out["modes"][mode] = merged
    return out


def _use_executor(device: str) -> None:
    """Route `device` to the cuda executor with the NVML sampler off (RunConfig has no option for it); on cpu with
    the reference kernels on CPU tensors. Every other option (attention, background_map) comes from RunConfig."""
    from dataclasses import replace

    from kvscope.engine.cuda_executor import CudaExecutor
    from kvscope.engine.executor import register_executor

    extra = {"nvml": False} | ({"kernels": "reference"} if device == "cpu" else {})

    def factory(spec, allocator, options):
        return CudaExecutor(spec, allocator, replace(options, cuda=replace(options.cuda, **extra)), device=device)

    register_executor(device, factory)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_vmm.json"), help="JSON results file")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    p.add_argument("--pages", type=int, default=512, help="pages per round of driver calls")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--range-pages", type=int, default=64, help="pages in one set_access-over-a-range call")
    p.add_argument("--skip-decode", action="store_true", help="driver calls only")
    p.add_argument("--model", default="llama-3-8b", help="model preset for the decode part")
    p.add_argument("--layers", type=int, default=8, help="layers of the model in the decode part")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=1000, help="prompt tokens of the first sequence")
    p.add_argument("--steps", type=int, default=256, help="timed decode steps")
    p.add_argument("--repeats", type=int, default=3, help="runs of each decode mode, interleaved")
    p.add_argument("--page-size", default="2MiB")
    p.add_argument("--megacache", action="store_true", help="one buffer for all layers (rows of every layer's K, V)")
    p.add_argument("--attention", choices=["triton", "sdpa"], default="triton")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)  # cpu: plumbing check
    args = p.parse_args(argv)
    if args.quick:
        args.pages, args.rounds, args.range_pages = 64, 2, 16
        args.layers, args.batch, args.context, args.steps, args.repeats = 2, 8, 200, 32, 1
        args.megacache = True  # 256 tokens per page at 2 layers: the few quick steps still cross pages
    if args.device == "cpu":  # no GPU: host pages (the OS calls), the tiny model, reference kernels
        args.model, args.layers, args.page_size = "tiny", None, "4KiB"
        args.batch, args.context, args.steps = min(args.batch, 4), min(args.context, 20), min(args.steps, 24)
        args.pages, args.rounds = min(args.pages, 64), min(args.rounds, 2)
        import torch

        torch.set_num_threads(1)

    from kvscope.backends.base import BackendUnavailable
    from kvscope.cudainfo import probe, versions
    from kvscope.units import parse_size

    args.page_size = parse_size(args.page_size)
    info = probe()
    try:
        if args.device == "cpu":
            from kvscope.backends.host import HostMemory

            mem, device_name = HostMemory(), "cpu (plumbing check)"
        else:
            if not info.available:
                raise BackendUnavailable(info.reason)
            from kvscope.backends.cuda_vmm import CudaMemory

            mem = CudaMemory()
            device_name = info.device(mem.device).name
    except BackendUnavailable as e:
        print(f"bench_vmm: {e}", file=sys.stderr)
        return 1
    result: dict[str, Any] = {
        "benchmark": "vmm",
        "device": device_name,
        "versions": versions(),
        "host": platform.node(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "granularity": {"minimum": mem.granularity, "recommended": getattr(mem, "recommended_granularity", None)},
    }
    try:
        result["driver_calls"] = bench_driver_calls(mem, args.pages, args.rounds, args.range_pages)
        # A 16 GiB reservation, as REFERENCE.md measured it (28 us on an H100).
        result["reserve_big"] = bench_big_reserve(mem, 16 << 30, max(args.rounds, 3))
        result["leaked"] = {"reservations": mem.live_reservations, "handles": mem.live_handles}
    finally:
        mem.close()
    if not args.skip_decode:
        # Per-layer buffers (1024 tokens per 2 MiB page for llama-3-8b: rare, large growth steps) and the megacache
        # (all layers in one row: a page every few dozen tokens); --quick and --megacache run only the one asked.
        layouts = [args.megacache] if args.quick or args.megacache else [False, True]
        for mega in layouts:
            args.megacache = mega
            result["decode_megacache" if mega else "decode"] = bench_decode(args)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {args.out}")
    return 0


def print_table(result: dict[str, Any]) -> None:
    calls = result["driver_calls"]["calls"]
    print(f"{result['device']}: page {result['driver_calls']['page_bytes'] / MiB:g} MiB")
    print(f"{'call':<18}{'median us':>12}{'p90 us':>12}{'n':>8}")
    for op, s in calls.items():
        print(f"{op:<18}{s['median_us']:>12.1f}{s['p90_us']:>12.1f}{s['n']:>8}")
    rng = result["driver_calls"].get("set_access_range")
    if rng:
        print(
            f"set_access over {rng['pages']} pages: one call {rng['one_call_us']:.1f} us "
            f"vs {rng['per_page_calls_us']:.1f} us in per-page calls"
        )
    big = result["reserve_big"]
    print(f"reserve {big['bytes'] >> 30} GiB: {big['median_us']:.1f} us")
    for key in ("decode", "decode_megacache"):
        dec = result.get(key)
        if not dec:
            continue
        print(f"{key} ({dec['batch']} sequences, {dec['layers']} layers, {dec['tokens_per_page']} tokens per page):")
        print(
            f"{'mode':<12}{'step ms':>10}{'p90 ms':>10}{'mean ms':>10}{'fwd ms':>10}"
            f"{'map on ms/step':>16}{'map off ms/step':>17}{'exposed ms/step':>17}"
        )
        for mode, r in dec["modes"].items():
            print(
                f"{mode:<12}{_f(r['step_ms_median']):>10}{_f(r['step_ms_p90']):>10}{_f(r['step_ms_mean']):>10}"
                f"{_f(r['forward_ms_median']):>10}{r['decode_map_on_path_ms_per_step']:>16.3f}"
                f"{r['decode_map_off_path_ms_per_step']:>17.3f}{r['decode_map_exposed_ms_per_step']:>17.3f}"
            )


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
