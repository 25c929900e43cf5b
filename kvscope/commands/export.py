"""`kvscope export TRACE --format perfetto -o trace.json`: a trace as Chrome trace-event JSON (ui.perfetto.dev)."""

from __future__ import annotations

import argparse

FORMATS = ("perfetto",)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", metavar="TRACE", help="trace file (.kvtrace)")
    p.add_argument("--format", choices=FORMATS, default="perfetto", help="output format (default: perfetto)")
    p.add_argument("-o", "--output", metavar="PATH", help="output file (default: TRACE with .perfetto.json)")
    p.add_argument(
        "--clock",
        choices=("host", "sim"),
        default="host",
        help="timestamps from host time (default), or the simulated clock of a --device sim run",
    )


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from kvscope.commands.summary import load_traces
    from kvscope.export_perfetto import export_perfetto
    from kvscope.trace import TRACE_SUFFIX

    trace = load_traces([args.trace])[0]
    src = Path(args.trace)
    out = Path(args.output) if args.output else src.with_name(src.name.removesuffix(TRACE_SUFFIX) + ".perfetto.json")
    if out.exists() and out.is_dir():
        raise ValueError(f"{out}: is a directory; give a file name with -o")
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: refusing to overwrite the trace itself; give another name with -o")
    result = export_perfetto(trace, out, clock=args.clock)
    print(f"wrote {out} ({result['events']:,} trace events); open it at https://ui.perfetto.dev")
    for note in result["aggregated"]:
        print(f"  note: {note}", file=sys.stderr)
    return 0
