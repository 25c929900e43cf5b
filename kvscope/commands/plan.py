"""`kvscope plan`: the KV budget a model leaves on a GPU, and the tokens and requests it holds per allocator.

    kvscope plan --model llama-3-70b --gpu-memory 80GiB --tp 4
    kvscope plan --model llama-3-8b --gpu-memory 80GiB --context 1024 --block-size 16,32,128
    kvscope plan --model llama-3-8b --gpu-memory 24GiB --workload sharegpt --json

Prints the arithmetic (weights, reserve, KV budget, bytes per token), one row per allocator configuration and the
assumptions; --json prints the same as one JSON object for scripts (kvscope.plan.Plan.to_dict).
"""

from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True, metavar="PRESET", help="llama-3-8b, llama-3-70b, yi-6b, ...")
    p.add_argument("--gpu-memory", required=True, metavar="SIZE", help="memory of one GPU, e.g. 80GiB")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel GPUs (default 1)")
    p.add_argument(
        "--reserve",
        default="10%",
        metavar="SIZE|PCT",
        help="per GPU, kept for activations, CUDA context and slack (default 10%%)",
    )
    p.add_argument("--max-len", type=int, default=2048, metavar="N", help="longest sequence (static reserves it)")
    p.add_argument("--context", type=int, metavar="N", help="tokens each request holds (default --max-len)")
    p.add_argument("--allocator", "-a", metavar="NAME,..", help="default: every allocator")
    p.add_argument("--block-size", metavar="N,..", help="paged block sizes (default 16,32)")
    p.add_argument("--page-size", metavar="SIZE,..", help="vmm page sizes per GPU (default 2MiB)")
    p.add_argument("--static-variant", metavar="V,..", help="static reservation rules (default max)")
    w = p.add_argument_group("from a workload (a small simulated sweep)")
    w.add_argument("--workload", "-w", metavar="NAME|FILE", help="run it through each configuration")
    w.add_argument("--requests", "-n", type=int, default=200, metavar="N", help="requests (default 200)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-batch", type=int, default=256, metavar="N", help="the engine's batch cap (default 256)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def inputs_from_args(args: argparse.Namespace):
    from kvscope.alloc import registry
    from kvscope.errors import UserError
    from kvscope.plan import DEFAULT_OPTIONS, PlanInputs
    from kvscope.sweep.grid import parse_axes, parse_list, takes
    from kvscope.units import parse_size

    try:
        gpu = parse_size(args.gpu_memory)
    except ValueError as e:
        raise UserError(f"--gpu-memory: {e}") from None
    for flag, value in (("--max-len", args.max_len), ("--requests", args.requests), ("--max-batch", args.max_batch)):
        if value < 1:
            raise UserError(f"{flag}: must be a positive integer, got {value}")
    allocators = parse_list("--allocator", args.allocator, str) if args.allocator else None
    given = parse_axes(
        {"block_size": args.block_size, "page_size": args.page_size, "static_variant": args.static_variant}
    )
    # Not given: the defaults, each for the allocators that take it; given: exactly that (a --block-size with only
    # vmm chosen is an error, not silently dropped).
    options = None
    if given:
        defaults = {k: v for k, v in DEFAULT_OPTIONS.items() if k not in given}
        chosen = allocators if allocators is not None else registry.names()
        options = {k: v for k, v in defaults.items() if any(takes(a, k) for a in chosen)} | given
    return PlanInputs(
        model=args.model,
        gpu_memory=gpu,
        tp=args.tp,
        reserve=args.reserve,
        max_len=args.max_len,
        context=args.context,
        allocators=allocators,
        options=options,
        workload=args.workload,
        requests=args.requests,
        seed=args.seed,
        max_batch=args.max_batch,
    )


def run(args: argparse.Namespace) -> int:
    import json

    from kvscope.plan import plan

    result = plan(inputs_from_args(args), progress=not (args.quiet or args.json))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    _print(result)
    return 0


def _print(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from kvscope.units import format_bytes

    b, inputs = result.budget, result.inputs
    console = Console(highlight=False, width=max(Console().width, 100))  # a pipe gets 100 columns, not 80
    per = " per GPU" if b.tp > 1 else ""
    split = f" / {b.tp}" if b.tp > 1 else ""
    console.print(f"[bold]{b.model}[/], TP {b.tp}, {format_bytes(b.gpu_memory_bytes)} per GPU ({b.dtype})")
    lines = [
        ("GPU memory", b.gpu_memory_bytes, ""),
        ("- weights", b.weight_bytes_per_gpu, f"{b.params / 1e9:.2f} B params x {b.dtype}" + split),
        ("- reserve", b.reserve_bytes, b.reserve_rule),
        ("= KV budget", b.kv_budget_bytes, per.strip()),
    ]
    for name, value, note in lines:
        console.print(f"  {name:<12} {format_bytes(value):>10}  {note}")
    console.print(
        f"  KV per token {format_bytes(b.kv_bytes_per_token_per_gpu):>10}  {b.kv_heads_per_gpu} of {b.kv_heads} "
        f"KV heads{per}; at most {b.ideal_tokens:,} tokens"
    )
    table = Table(title=f"requests of {inputs.context_tokens:,} tokens held at once", title_justify="left")
    table.add_column("allocator")
    table.add_column("requests", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("of ideal", justify="right")
    for r in result.rows:
        table.add_row(r.label, f"{r.requests:,}", f"{r.tokens:,}", f"{r.share_of_ideal:.1%}")
    console.print(table)
    if any(r.workload for r in result.rows):
        console.print(_workload_table(result))
    console.print("[bold]assumptions[/]")
    for line in result.assumptions:
        console.print(f"  - {line}")


def _workload_table(result):
    from rich.table import Table

    inputs = result.inputs
    table = Table(title=f"{inputs.workload}, {inputs.requests} requests (simulated)", title_justify="left")
    for name in ("allocator", "peak batch", "limited by", "peak tokens", "preemptions", "tokens/s", "TTFT p90"):
        table.add_column(name, justify="left" if name in ("allocator", "limited by") else "right")
    for r in result.rows:
        w = r.workload or {}
        if w.get("error"):
            table.add_row(r.label, w["error"], "", "", "", "", "")
            continue
        tps, ttft = w.get("tokens_per_s"), w.get("ttft_p90_s")
        table.add_row(
            r.label,
            str(w.get("peak_batch")),
            str(w.get("batch_limited_by")),
            f"{w['peak_tokens']:,}" if w.get("peak_tokens") is not None else "",
            str(w.get("preemptions")),
            f"{tps:,.0f}" if tps is not None else "n/a (TP)",
            f"{ttft:.3g} s" if ttft is not None else "n/a",
        )
    return table
