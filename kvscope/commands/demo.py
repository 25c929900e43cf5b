"""`kvscope demo`: the main job. One ShareGPT-like workload through every allocator, a comparison table, a report.

    kvscope demo                      # GPU if there is one, else the simulated device
    kvscope demo --device sim --requests 2000 --out out/demo

Each run writes a trace (out/demo/<run>.kvtrace); the table comes from kvscope.analysis.compare and the report from
kvscope.report, the same numbers every other surface shows.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

# (trace name, allocator, allocator options) — the configurations the README's comparison table uses.
RUNS: list[tuple[str, str, dict]] = [
    ("static-max", "static", {"static_variant": "max"}),
    ("static-pow2", "static", {"static_variant": "pow2"}),
    ("static-oracle", "static", {"static_variant": "oracle"}),
    ("paged-b1", "paged", {"block_size": 1}),
    ("paged-b16", "paged", {"block_size": 16}),
    ("paged-b256", "paged", {"block_size": 256}),
    ("vmm-2MiB", "vmm", {"page_size": 2 << 20}),
    ("vmm-2MiB-megacache", "vmm", {"page_size": 2 << 20, "megacache": True}),
]


def add_parser(p: argparse.ArgumentParser) -> None:
    from kvscope.commands.run import DefaultsHelpFormatter

    p.formatter_class = DefaultsHelpFormatter
    p.add_argument(
        "--device",
        choices=("auto", "sim", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when a GPU is usable, else sim (default)",
    )
    p.add_argument("--workload", default="sharegpt", metavar="NAME|FILE", help="workload (default sharegpt)")
    p.add_argument("--requests", type=int, default=1000, metavar="N", help="requests (default 1000)")
    p.add_argument("--model", default=None, metavar="PRESET", help="default llama-3-8b (tiny on --device cpu)")
    p.add_argument("--kv-memory", default=None, metavar="SIZE", help="KV memory (default 16GiB; 64MiB on cpu)")
    p.add_argument("--max-len", type=int, default=2048, metavar="N", help="longest sequence, prompt + output")
    p.add_argument(
        "--max-batch", type=int, default=256, metavar="N", help="most sequences in a step (a cap on every run)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the workload generator")
    p.add_argument(
        "--runs", default=None, metavar="A,B,...", help=f"subset of runs (default all: {', '.join(r[0] for r in RUNS)})"
    )
    p.add_argument("--out", default="out/demo", metavar="DIR", help="where traces and report.html go")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")  # fmt: skip


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    from kvscope.cudainfo import probe

    info = probe()
    if info.available:
        return "cuda"
    print(f"kvscope demo: {info.reason}; running on the simulated device (--device sim)")
    return "sim"


def selected_runs(spec: str | None) -> list[tuple[str, str, dict]]:
    if not spec:
        return RUNS
    names = [s.strip() for s in spec.split(",") if s.strip()]
    known = {r[0]: r for r in RUNS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--runs: unknown run {unknown[0]!r}; choose from {', '.join(known)}")
    return [known[n] for n in names]


def run(args: argparse.Namespace) -> int:
    import sys

    from rich.console import Console

    from kvscope.analysis.compare import compare_runs, comparison_verdict
    from kvscope.commands.outputs import named_os_error
    from kvscope.commands.run import check_memory, check_options, check_requests
    from kvscope.engine.api import RunConfig, record_run
    from kvscope.report import write_report
    from kvscope.workload_gen import resolve_workload

    check_requests(args.requests)
    check_options(args)
    if args.kv_memory is not None and not args.kv_memory.strip():
        raise ValueError("--kv-memory: empty; give a size such as 16GiB")
    device = pick_device(args.device)
    runs = selected_runs(args.runs)
    kv_memory = _size("--kv-memory", args.kv_memory or ("64MiB" if device == "cpu" else "16GiB"))
    out = check_outputs(args, runs)
    check_memory(RunConfig(allocator="static", device=device, kv_memory=kv_memory), args.kv_memory)
    out.mkdir(parents=True, exist_ok=True)
    requests, description = resolve_workload(args.workload, requests=args.requests, seed=args.seed)
    # markup=False: the workload name and the paths are the user's, printed literally ("[bold]" is not a style);
    # soft_wrap: a long path stays on one line, so it can be copied.
    console = Console(file=sys.stdout, markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"kvscope demo: {len(requests):,} {description.get('name', args.workload)} requests on {device}, "
        f"KV memory {args.kv_memory or ('64MiB' if device == 'cpu' else '16GiB')}, {len(runs)} allocator setups"
    )
    traces = []
    for name, allocator, options in runs:
        cfg = RunConfig(allocator=allocator, device=device, model=args.model, kv_memory=kv_memory,
                        max_len=args.max_len, max_batch=args.max_batch, seed=args.seed, **options)  # fmt: skip
        if device == "cpu" and "page_size" in options:
            cfg.page_size = 64 << 10  # the tiny model's rows are small: 2 MiB pages would hold whole requests
        path = out / f"{name}.kvtrace"
        try:
            result = record_run(requests, cfg, path=path, workload=description, progress=not args.quiet,
                                command=f"kvscope demo ({name})")  # fmt: skip
        except OSError as e:  # a full disk mid-run: name the trace
            raise named_os_error(e, path) from None
        s = result.stats
        console.print(f"  {name:<20} {s.steps:>7,} steps  {s.wall_s:6.1f} s wall  -> {path}")
        traces.append(result.trace())
    named = dict(zip([r[0] for r in runs], traces, strict=True))
    frame = compare_runs(named)
    for table in comparison_tables(frame):
        print_table(console, table)
    verdict = comparison_verdict(named)
    for line in [*(f"warning: {w}" for w in verdict.warnings), *verdict.sentences]:
        console.print(line)
    try:
        report = write_report(traces, out / "report.html", title=f"kvscope demo: {description.get('name')} on {device}")
    except OSError as e:
        raise named_os_error(e, out / "report.html") from None
    console.print(f"report: {report}  (open it in a browser; it works offline)")
    console.print(f"dashboard: kvscope dashboard {out}/*.kvtrace")
    return 0


def _size(flag: str, text: str) -> int:
    from kvscope.units import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise ValueError(f"{flag}: {e}") from None


def check_outputs(args: argparse.Namespace, runs: list[tuple[str, str, dict]]) -> Path:
    """The --out directory, after checking every file the demo will write there (not over the workload file, not
    under a regular file) before the first run starts."""
    from pathlib import Path

    from kvscope.commands.outputs import check_output, input_files

    if not args.out.strip():
        raise ValueError("--out: empty path; give a directory")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is not a directory (--out)")
    for name in [f"{r[0]}.kvtrace" for r in runs] + ["report.html"]:
        check_output(out / name, "--out", input_files(args.workload), make_parents=True)
    return out


# (column in compare_runs, header, format) for the demo's tables, one row per run: memory, then batch and speed.
TABLE_COLUMNS = [
    ("peak_reserved_bytes", "peak reserved", "bytes"),
    ("peak_used_bytes", "peak used", "bytes"),
    ("used_per_reserved", "used / reserved", "pct"),
    ("mean_waste_fraction", "mean waste", "pct"),
    ("preemptions", "preempt- ions", "int"),
]
SPEED_COLUMNS = [
    ("max_batch", "largest batch", "int"),
    ("mean_batch", "mean batch", "rate"),
    ("batch_limited_by", "batch limited by", "str"),
    ("tokens_per_s", "tokens per s", "int"),
    ("ttft_p50_s", "TTFT p50", "secs"),
    ("tpot_p50_s", "TPOT p50", "secs"),
]


def _table(frame, title: str, columns: list[tuple[str, str, str]]):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from kvscope.present.rows import format_value

    # SIMPLE_HEAD: no vertical rules, so the runs' names and the numbers get the width. Cells never wrap and the
    # run name is never cut (headers wrap instead); print_table widens the output when even that does not fit.
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    names = [str(v) for v in frame["label"]]
    records = frame.to_dict("records")
    cells = [[format_value(row, key, how) for key, _, how in columns] for row in records]
    table.add_column("run", style="bold", no_wrap=True, min_width=max([3, *map(len, names)]))
    for i, (_, header, _) in enumerate(columns):
        # At least as wide as its widest value: rich shrinks the header (it wraps), never a number.
        widest = max([*map(len, header.split()), *(len(c[i]) for c in cells)])
        table.add_column(header, justify="right", min_width=widest)
    for name, row in zip(names, cells, strict=True):
        # Text cells: labels come from trace metadata and must print literally, not as Rich markup.
        table.add_row(Text(name, no_wrap=True), *(Text(c, no_wrap=True) for c in row))
    return table


def comparison_table(frame):
    """The memory table: one row per run from kvscope.analysis.compare.compare_runs."""
    return _table(frame, "peak KV memory per allocator (same workload, same budget)", TABLE_COLUMNS)


def comparison_tables(frame) -> list:
    """The memory table and the batch-and-speed table (one row per run each)."""
    return [comparison_table(frame), _table(frame, "batch and speed (run clock)", SPEED_COLUMNS)]


def print_table(console, table) -> None:
    """Print at the console's width, or wider when the table's narrowest layout needs it (a pipe is 80 columns):
    lines longer than the terminal beat a run name cut to "paged-…"."""
    from rich.measure import Measurement

    need = Measurement.get(console, console.options, table).minimum
    console.print(table, width=max(console.width, need))
