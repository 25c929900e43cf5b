"""`kvscope summary TRACE... [--json]`: the headline numbers of one or more traces.

People get a table (one column per trace); --json prints one JSON object (a list of objects for several traces)
with exactly the keys of kvscope.analysis.summary.summarize.
"""

from __future__ import annotations

import argparse


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

    Console(file=sys.stdout).print(summary_table(summaries, [Path(p).name for p in args.traces]))
    return 0


def load_traces(paths: list[str], *, salvage: bool = False) -> list:
    """Load traces, turning the cut-off (or, with salvage, damaged) warning into one line on stderr (a warning,
    not an error)."""
    import sys
    import warnings

    from kvscope.trace import TruncatedTraceWarning, load_trace

    traces = []
    for path in paths:
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


# (key, label, how to show it); None rows are section rules. The HTML report shows the same rows (kvscope.report).
SUMMARY_ROWS: list[tuple[str, str, str] | None] = [
    ("label", "run", "str"),
    ("device", "device", "device"),
    ("model", "model", "str"),
    ("bytes_per_token", "KV bytes / token", "bytes"),
    ("capacity_bytes", "KV capacity", "bytes"),
    None,
    ("requests", "requests", "int"),
    ("finished", "finished", "int"),
    ("rejected", "rejected", "int"),
    ("unfinished", "unfinished at end", "int"),
    ("forks", "forked sequences", "int"),
    ("steps", "steps", "int"),
    ("generated_tokens", "generated tokens", "int"),
    ("tokens_per_s", "generated tokens / s", "rate"),
    ("run_time_s", "run time", "time"),
    None,
    ("peak_used_bytes", "peak used", "bytes"),
    ("peak_reserved_bytes", "peak reserved", "bytes"),
    ("peak_waste_bytes", "peak waste", "bytes"),
    ("retained_end_bytes", "retained after the last step", "bytes"),
    ("peaks", "peaks taken", "str"),
    ("mean_waste_fraction", "mean waste / reserved", "pct"),
    ("peak_cached_idle_bytes", "peak cached-idle", "bytes"),
    ("sharing_saved_bytes_peak", "peak sharing savings", "bytes"),
    ("prefix_hit_tokens", "prefix-cache hit tokens", "int"),
    ("prefix_hit_rate", "prefix-cache hit rate", "pct"),
    None,
    ("preemptions", "preemptions", "int"),
    ("recomputed_tokens", "recomputed tokens", "int"),
    ("ooms", "allocation failures (OOM)", "int"),
    ("evictions", "prefix-cache evictions", "int"),
    ("driver_calls", "VMM driver calls", "int"),
    ("driver_ms", "VMM driver time", "ms"),
    ("events", "events", "int"),
    ("truncated", "cut off", "bool"),
]


def format_value(summary: dict, key: str, how: str) -> str:
    from kvscope.units import format_bytes

    value = summary.get(key)
    if value is None:
        return "-"
    if how == "bytes":
        return format_bytes(value)
    if how == "int":
        return f"{int(value):,}"
    if how == "pct":
        return f"{100 * float(value):.1f}%"
    if how == "rate":
        return f"{float(value):,.1f}"
    if how == "time":
        clock = " (simulated)" if summary.get("clock") == "sim" else ""
        return f"{float(value):.3f} s{clock}"
    if how == "ms":
        return f"{float(value):.2f} ms"
    if how == "bool":
        return "yes" if value else "no"
    if how == "device":
        name = summary.get("device_name")
        return f"{value} ({name})" if name and name != value else str(value)
    return str(value)


def summary_table(summaries: list[dict], names: list[str]):
    from rich.table import Table
    from rich.text import Text

    # Text, not str: Rich reads markup in plain strings, and file names and metadata are the user's ("[/]" in a
    # name crashed the table, "[bold]" was applied). Text is printed literally.
    table = Table(title="kvscope summary", show_lines=False)
    table.add_column("", style="bold")
    for name in names:
        table.add_column(Text(name), justify="right")
    for row in SUMMARY_ROWS:
        if row is None:
            table.add_section()
            continue
        key, label, how = row
        table.add_row(Text(label), *(Text(format_value(s, key, how)) for s in summaries))
    return table
