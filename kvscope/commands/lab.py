"""`kvscope lab`: replay a workload's prefix-cache accesses through eviction policies at many capacities.

    kvscope lab --workload ../shared/data/mooncake/conversation_trace.jsonl --policies lru,belady --capacity 1000,6000
    kvscope lab -w conv.jsonl --block-size 16 --policies all --capacity 256:65536:30 -o lab.parquet
    kvscope lab -w trace.jsonl --policies discard,phase --capacity 6000 --prediction-error 0,0.1,0.5,1 --json
    kvscope lab -w conv.jsonl --policies lru,arc --capacity 1000:20000:10 --cpu-cache 60000 --report lab.html

No engine runs: the lab follows its cache-only contract (kvscope.lab, docs/lab.md). A Mooncake trace file is read as
given (block size 512); any other workload (a kvscope .jsonl or a named generator) by its full blocks.
"""

from __future__ import annotations

import argparse
import math


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        "-w",
        required=True,
        metavar="FILE|NAME",
        help="a Mooncake trace, a .jsonl workload or a named workload",
    )
    p.add_argument("--policies", "-p", default="lru", metavar="P[,P...]", help="policies (default lru; all: every one)")
    p.add_argument(
        "--capacity",
        "-c",
        required=True,
        metavar="N[,N...]|LO:HI:COUNT",
        help="cache capacities in blocks; LO:HI:COUNT gives COUNT log-spaced ones",
    )
    p.add_argument(
        "--block-size", type=int, metavar="B", help="tokens per block (workloads: default 16; Mooncake: 512)"
    )
    p.add_argument(
        "--prediction-error",
        default="0",
        metavar="P[,P...]",
        help="flip probability of the oracle's predicted bits (discard, phase; default 0)",
    )
    p.add_argument(
        "--cpu-cache",
        type=int,
        default=0,
        metavar="BLOCKS",
        help="a CPU tier of BLOCKS blocks: the GPU cache's victims go there and come back on a hit (Pensieve)",
    )
    p.add_argument("--requests", "-n", type=int, metavar="N", help="only the first N requests")
    p.add_argument("--seed", type=int, default=0, help="seed of the prediction errors and the randomized policies")
    p.add_argument("--jobs", "-j", type=int, default=1, metavar="J", help="processes (capacities run in parallel)")
    p.add_argument("-o", "--output", metavar="RESULTS.parquet", help="write the rows as Parquet")
    p.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    p.add_argument("--report", metavar="FILE.html", help="write the lab's figures and rows as one offline HTML page")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def run_rows(args: argparse.Namespace):
    """Check the options, run the lab, write -o; the rows (a DataFrame, workload description in .attrs)."""
    from kvscope.commands.outputs import check_output, input_files, writing
    from kvscope.errors import UserError
    from kvscope.lab.accesses import load_accesses
    from kvscope.lab.options import parse_capacities, parse_errors
    from kvscope.lab.sweep import run_lab
    from kvscope.policies import registry

    policies = registry.parse_names(args.policies)
    capacities = parse_capacities(args.capacity)
    errors = parse_errors(args.prediction_error)
    if args.block_size is not None and args.block_size < 1:
        raise UserError(f"--block-size: must be a positive integer, got {args.block_size}")
    if args.requests is not None and args.requests < 1:
        raise UserError(f"--requests: must be a positive integer, got {args.requests}")
    if not 1 <= args.jobs <= 256:
        raise UserError(f"--jobs: must be in 1..256, got {args.jobs}")
    if not 0 <= args.cpu_cache <= 1 << 40:
        raise UserError(f"--cpu-cache: must be a number of blocks >= 0, got {args.cpu_cache}")
    if args.output is not None:
        check_output(args.output, "-o", input_files(args.workload))
    report = getattr(args, "report", None)
    if report is not None:
        check_output(report, "--report", input_files(args.workload))
    acc = load_accesses(args.workload, args.block_size, args.requests)
    if not acc.num_blocks:
        raise UserError(f"{args.workload}: no prompt has a full block of {acc.block_size} tokens; nothing to cache")
    quiet = args.quiet or getattr(args, "json", False)
    frame = run_lab(
        acc,
        policies,
        capacities,
        errors,
        seed=args.seed,
        jobs=args.jobs,
        progress=None if quiet else _progress(len(capacities)),
        cpu_cache=args.cpu_cache,
    )
    frame.attrs["workload"] = acc.describe()
    if args.output is not None:
        with writing(args.output):
            _write_parquet(frame, args.output, acc.describe())
    if report is not None:
        from pathlib import Path

        from kvscope.present.lab import lab_page

        with writing(report):
            Path(report).write_text(lab_page(frame, title=f"kvscope lab: {acc.describe()['source']}"))
    return frame


def run(args: argparse.Namespace) -> int:
    import json

    frame = run_rows(args)
    if args.json:
        rows = frame.drop(columns=["seconds"]).to_dict(orient="records")
        for row in rows:
            if row["prediction_error"] is not None and math.isnan(row["prediction_error"]):
                row["prediction_error"] = None
        print(json.dumps(rows))
        return 0
    from kvscope.present.lab import lab_table

    d = frame.attrs["workload"]
    print(
        f"{d['source']}: {d['requests']} requests, {d['blocks']} blocks of {d['block_size']} tokens, "
        f"{d['distinct_blocks']} distinct (an unbounded cache hits {d['max_hit_rate']:.1%})"
    )
    print(lab_table(frame))
    if args.output is not None:
        print(f"wrote {len(frame)} rows to {args.output}")
    if getattr(args, "report", None) is not None:
        print(f"wrote the lab's report to {args.report}")
    return 0


def _write_parquet(frame, path: str, workload: dict) -> None:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"kvscope.lab"] = json.dumps({"workload": workload}).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


def _progress(total: int):
    import sys

    if total < 2 or not sys.stderr.isatty():
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    task = bar.add_task("capacities", total=total)
    bar.start()

    def update(done: int, _total: int) -> None:
        bar.update(task, completed=done)
        if done >= total:
            bar.stop()

    return update
