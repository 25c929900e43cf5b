"""How fast the policy lab replays: every registered policy x 30 capacities on Mooncake's conversation trace.

    python benchmarks/bench_lab.py --out benchmarks/results/lab.json       # full run (about a minute on 2 cores)
    python benchmarks/bench_lab.py --requests 2000 --capacities 5          # smoke run

Measures wall time (perf_counter) of `kvscope.lab.sweep.run_lab` end to end (the accesses loaded once beforehand;
their load is timed apart), once per --jobs value, the CPU seconds it used (this process and its worker processes,
from getrusage: less sensitive than wall time to other processes sharing the cores) and the replay seconds per
policy summed over capacities. It asserts nothing about time: it reports what it measured, with the machine's core
count and load average before and after (other processes share the CPU: the numbers say so). The rows themselves
(hit rates) go to --rows as Parquet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "data" / "mooncake" / "conversation_trace.jsonl"


def _cpu_s() -> float:
    """User + system CPU seconds of this process and of its finished children (the sweep's worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--requests", type=int, default=None, help="only the first N requests (default: all)")
    ap.add_argument("--capacities", type=int, default=30, help="log-spaced capacities (default 30)")
    ap.add_argument("--lo", type=int, default=100, help="smallest capacity in blocks")
    ap.add_argument("--hi", type=int, default=120_000, help="largest capacity in blocks")
    ap.add_argument("--jobs", default="1,2", help="process counts to time, comma-separated (default 1,2)")
    ap.add_argument("--out", default=None, help="JSON results")
    ap.add_argument("--rows", default=None, help="the lab rows (hit rates) as Parquet")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from kvscope.lab.accesses import load_accesses
    from kvscope.lab.options import parse_capacities
    from kvscope.lab.sweep import run_lab
    from kvscope.policies import registry

    if not Path(args.trace).is_file():
        print(f"bench_lab: {args.trace}: no such trace (the shared Mooncake data)", file=sys.stderr)
        return 1
    policies = list(registry.names())
    capacities = parse_capacities(f"{args.lo}:{args.hi}:{args.capacities}")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    acc = load_accesses(args.trace, requests=args.requests)
    acc.chains, acc.first_use, acc.next_use, acc.cum_fill  # noqa: B018  (built once, as the sweep would)
    load_s = time.perf_counter() - t0
    runs = []
    frame = None
    for jobs in [int(j) for j in args.jobs.split(",")]:
        t0 = time.perf_counter()
        cpu0 = _cpu_s()
        frame = run_lab(acc, policies, capacities, [0.0], jobs=jobs)
        wall = time.perf_counter() - t0
        cpu = _cpu_s() - cpu0
        per_policy = frame.groupby("policy", sort=False)["seconds"].sum().round(3).to_dict()
        runs.append(
            {
                "jobs": jobs,
                "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 2),
                "replay_s_by_policy": per_policy,
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            }
        )
        print(
            f"jobs={jobs}: {len(policies)} policies x {len(capacities)} capacities = {len(frame)} runs in {wall:.1f} s "
            f"({cpu:.1f} CPU s)"
        )
    result = {
        "what": "kvscope lab: every policy x capacities on the Mooncake conversation trace (p = 0 for predictions)",
        "trace": Path(args.trace).name,
        "workload": acc.describe(),
        "policies": policies,
        "capacities": capacities,
        "load_s": round(load_s, 2),
        "runs": runs,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_before": [round(x, 2) for x in load_before],
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.rows and frame is not None:
        frame.to_parquet(args.rows, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
