"""`kvscope sweep`: a grid of configurations as independent simulated runs -> one Parquet table + a figure page.

    kvscope sweep --workload sharegpt --requests 200 --allocator paged,vmm --block-size 16,32 \\
        --kv-memory 4GiB,8GiB --seed 0,1 -o out/sweep
    kvscope sweep ... --jobs 4            # local process pool (default: one process per CPU)
    kvscope sweep ... --ray               # a local Ray instance; --ray auto / --ray ray://HOST:10001 for a cluster

Every comma-separated option is an axis; an allocator option (--block-size, --page-size, --static-variant) is crossed
only with the allocators that take it. Writes DIR/sweep.parquet (one row per run: its configuration and its
summary's fields) and DIR/sweep.html (Pareto front, what-if curves). Bad grids end with one line before any run.
"""

from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("grid (comma-separated lists; every combination runs)")
    g.add_argument("--workload", "-w", default="sharegpt", metavar="NAME|FILE,..", help="default sharegpt")
    g.add_argument("--allocator", "-a", default="paged", metavar="NAME,..", help="default paged")
    g.add_argument("--kv-memory", metavar="SIZE,..", help="KV memory of each run (default 16GiB)")
    g.add_argument("--seed", default="0", metavar="N,..", help="seeds the workload generator and the run (default 0)")
    g.add_argument("--block-size", metavar="N,..", help="paged: tokens per block (default 16)")
    g.add_argument("--page-size", metavar="SIZE,..", help="vmm: physical page size (default 2MiB)")
    g.add_argument("--static-variant", metavar="V,..", help="static: max, pow2, oracle (default max)")
    g.add_argument(
        "--prefix-caching",
        nargs="?",
        const="on",
        metavar="on,off",
        help="paged: share cached prompt blocks (alone: on; 'on,off' sweeps both)",
    )
    g.add_argument("--eviction", metavar="POLICY,..", help="prefix-cache eviction policy (when the engine has them)")

    e = p.add_argument_group("every run")
    e.add_argument("--requests", "-n", type=int, default=200, metavar="N", help="requests per workload (default 200)")
    e.add_argument("--model", "-m", metavar="PRESET", help="model preset (default llama-3-8b)")
    e.add_argument("--max-len", type=int, default=2048, metavar="N", help="longest sequence, prompt + output")
    e.add_argument("--max-batch", type=int, default=256, metavar="N", help="most sequences in a step")
    e.add_argument("--max-tokens-per-step", type=int, default=8192, metavar="N", help="token budget of a step")

    x = p.add_argument_group("execution and output")
    x.add_argument("--jobs", "-j", type=int, metavar="N", help="local worker processes (default: one per CPU)")
    x.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: alone, a local instance; 'auto' or ray://HOST:PORT, an existing cluster "
        "(pip install 'kvscope[ray]')",
    )
    x.add_argument("-o", "--output", default="out/sweep", metavar="DIR", help="where sweep.parquet and sweep.html go")
    x.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def grid_from_args(args: argparse.Namespace):
    """The SweepGrid the options describe (UserError / ValueError, one line, for anything wrong with them)."""
    from kvscope.errors import UserError
    from kvscope.sweep.grid import SweepGrid, parse_axes, parse_list
    from kvscope.units import parse_size

    def nonneg(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"not an integer: {text!r}") from None
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value

    def size(text: str) -> int:
        value = parse_size(text)
        if value < 1:
            raise ValueError("must be positive")
        return value

    for flag, value in (
        ("--requests", args.requests),
        ("--max-len", args.max_len),
        ("--max-batch", args.max_batch),
        ("--max-tokens-per-step", args.max_tokens_per_step),
    ):
        if value < 1:
            raise UserError(f"{flag}: must be a positive integer, got {value}")
    base = {
        "max_len": args.max_len,
        "max_batch": args.max_batch,
        "max_tokens_per_step": args.max_tokens_per_step,
    }
    if args.model is not None:
        base["model"] = args.model
    options = parse_axes(
        {
            "block_size": args.block_size,
            "page_size": args.page_size,
            "static_variant": args.static_variant,
            "prefix_caching": args.prefix_caching,
            "eviction": args.eviction,
        }
    )
    allocators = parse_list("--allocator", args.allocator, str)
    return SweepGrid(
        allocators=allocators,
        workloads=parse_list("--workload", args.workload, str),
        kv_memory=parse_list("--kv-memory", args.kv_memory, size) if args.kv_memory is not None else (None,),
        seeds=parse_list("--seed", args.seed, nonneg),
        options=options,
        requests=args.requests,
        base=base,
    )


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from kvscope.commands.outputs import check_output, writing
    from kvscope.sweep import run_sweep, write_table
    from kvscope.sweep.page import write_page

    grid = grid_from_args(args)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        from kvscope.errors import UserError

        raise UserError(f"-o {out}: is a file; give a directory for sweep.parquet and sweep.html")
    workloads = [w for w in grid.workloads if Path(w).is_file()]
    table_path = check_output(out / "sweep.parquet", "-o", workloads, make_parents=True)
    page_path = check_output(out / "sweep.html", "-o", workloads, make_parents=True)
    grid.points()  # every one-line error about the grid before the output directory is made
    result = run_sweep(grid, jobs=args.jobs, ray=args.ray, progress=not args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    with writing(table_path):
        write_table(result.table, table_path)
    with writing(page_path):
        write_page(result.table.to_pandas(), result.meta, page_path)
    failed = f", {result.failed} failed (see the page)" if result.failed else ""
    print(f"{result.meta['runs']} runs{failed} in {result.meta['wall_s']:.1f} s on {result.meta['executor']}")
    print(f"table: {table_path}")
    print(f"page:  {page_path}")
    _print_front(result.table.to_pandas())
    if result.failed == result.meta["runs"]:
        print("kvscope sweep: every run failed", file=sys.stderr)
        return 1
    return 0


def _print_front(table) -> None:
    """The Pareto front's configurations, least memory first: the same rows as the page's table."""
    from kvscope.sweep import analysis
    from kvscope.units import format_bytes

    obj = analysis.objectives(table)
    configs = analysis.with_front(analysis.configurations(table), obj)
    front = configs[configs["front"]].sort_values(obj.memory, kind="stable")
    if front.empty:
        return
    print(f"Pareto front (KV memory, tokens/s, {obj.latency_title}; means over seeds):")
    for _, r in front.iterrows():
        print(
            f"  {r['series']} at {format_bytes(r['kv_memory'])}: {r['tokens_per_s']:,.0f} tokens/s, "
            f"{r[obj.latency]:.3g} s"
        )
