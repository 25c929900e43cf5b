"""`kvscope summary TRACE... [--json]`: the headline numbers of one or more traces.

People get a table (one column per trace); --json prints one JSON object (a list of objects for several traces)
with exactly the keys of kvscope.analysis.summary.summarize.
"""

from __future__ import annotations

import argparse

# The rows and their formats are the presentation layer's: every surface shows the same.
from kvscope.present.rows import summary_columns

__all__ = ["add_parser", "add_salvage_flag", "load_traces", "run", "summary_table"]


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("traces", nargs="+", metavar="TRACE", help="trace file(s) (.kvtrace)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_salvage_flag(p)


def add_salvage_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--salvage",
        action="store_true",
        help="load a damaged trace's verified batches before the damage (warns) instead of failing",
    )


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from kvscope.analysis.summary import summarize

    summaries = [summarize(trace) for trace in load_traces(args.traces, salvage=args.salvage)]
    if args.json:
        payload = summaries[0] if len(summaries) == 1 else summaries
        print(json.dumps(payload, indent=2, allow_nan=False, default=_json_default))
        return 0
    from pathlib import Path

    from rich.console import Console

    from kvscope.parallel.files import expand

    Console(file=sys.stdout).print(summary_table(summaries, [Path(p).name for p in expand(list(args.traces))]))
    return 0


def load_traces(paths: list[str], *, salvage: bool = False) -> list:
    """Load traces, turning the cut-off (or, with salvage, damaged) warning into one line on stderr (a warning,
    not an error)."""
    import sys
    import warnings

    from kvscope.parallel.files import expand
    from kvscope.trace import TruncatedTraceWarning, load_trace

    traces = []
    for path in expand(list(paths)):  # a parallel run's NAME (or NAME.kvtrace): its rank files
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TruncatedTraceWarning)
            traces.append(load_trace(path, salvage=salvage))
        for w in caught:
            if issubclass(w.category, TruncatedTraceWarning):
                print(f"kvscope: warning: {w.message}", file=sys.stderr)
    return traces


def _json_default(value):
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def summary_table(summaries: list[dict], names: list[str]):
    from rich.table import Table
    from rich.text import Text

    # Text, not str: Rich reads markup in plain strings, and file names and metadata are the user's ("[/]" in a
    # name crashed the table, "[bold]" was applied). Text is printed literally.
    table = Table(title="kvscope summary", show_lines=False)
    table.add_column("", style="bold")
    for name in names:
        table.add_column(Text(name), justify="right")
    for row in summary_columns(summaries):
        if row is None:
            table.add_section()
            continue
        label, values = row
        table.add_row(Text(label), *(Text(value) for value in values))
    return table
