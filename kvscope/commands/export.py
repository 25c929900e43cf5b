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

    from kvscope.commands.outputs import check_output, writing
    from kvscope.commands.summary import load_traces
    from kvscope.export_perfetto import export_perfetto
    from kvscope.trace import TRACE_SUFFIX

    src = Path(args.trace)
    default = src.with_name(src.name.removesuffix(TRACE_SUFFIX) + ".perfetto.json")
    # Checked before loading: `-o ''` is a mistake, not "the default" (a falsy test used to make it one).
    out = check_output(args.output if args.output is not None else default, "-o", [args.trace], make_parents=True)
    trace = load_traces([args.trace])[0]
    with writing(out):  # a full disk names the export
        result = export_perfetto(trace, out, clock=args.clock)
    print(f"wrote {out} ({result['events']:,} trace events); open it at https://ui.perfetto.dev")
    for note in result["aggregated"]:
        print(f"  note: {note}", file=sys.stderr)
    return 0
