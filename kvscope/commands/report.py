"""`kvscope report TRACE [TRACE ...] -o report.html`: one self-contained HTML file (works offline), with a comparison
section when several traces are given."""

from __future__ import annotations

import argparse

from kvscope.commands.summary import add_salvage_flag


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace file(s) (.kvtrace)")
    p.add_argument(
        "-o", "--output", default="report.html", metavar="FILE", help="where to write (default: %(default)s)"
    )
    p.add_argument("--title", default=None, help="page title (default: names the run or the number of runs)")
    add_salvage_flag(p)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from kvscope.commands.outputs import check_output, writing
    from kvscope.commands.summary import load_traces
    from kvscope.errors import UserError
    from kvscope.report import write_report
    from kvscope.units import format_bytes

    out = Path(args.output)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; give the report's file name (e.g. -o {out / 'report.html'})")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: no such directory for the report (-o {out})")
    check_output(out, "-o", args.traces)  # also: not over one of the traces, not under a file
    start = time.perf_counter()
    traces = load_traces(args.traces, salvage=args.salvage)
    with writing(out):  # a full disk names the report
        write_report(traces, out, title=args.title)
    took = time.perf_counter() - start
    print(f"wrote {out} ({format_bytes(out.stat().st_size)}, {len(traces)} trace(s), {took:.1f} s)")
    return 0
