"""`kvscope sweep` and `kvscope plan` on this machine: how long one grid takes inline, in the local process pool and
on a local Ray instance, whether the three give the same table, and how long a plan takes.

    python benchmarks/bench_sweep.py --out benchmarks/results/sweep.json     # also writes sweep.md beside it

Measures, never asserts: wall time of each execution of the same grid (host clock, including pool start-up or Ray's
start and stop), the mean host time of one run inside the workers, and whether the tables agree once the host-clock
columns are dropped. The load average at the start is recorded because the 2-core machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30


def grid(requests: int):
    from kvscope.sweep import SweepGrid

    return SweepGrid(
        allocators=("paged", "vmm", "static"),
        workloads=("sharegpt",),
        kv_memory=(2 * GiB, 4 * GiB, 8 * GiB),
        seeds=(0, 1),
        options={"block_size": (16, 32)},
        requests=requests,
    )


def timed(label: str, fn) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    print(f"{label}: {wall:.1f} s")
    return out, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/sweep.json")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()

    import importlib.util

    from kvscope.plan import PlanInputs, plan
    from kvscope.runmeta import cpu_name
    from kvscope.sweep import HOST_CLOCK_COLUMNS, run_sweep

    g = grid(args.requests)
    results: dict[str, Any] = {
        "host": {"cpus": os.cpu_count(), "cpu": cpu_name(), "load_average_at_start": os.getloadavg()},
        "grid": g.axes(),
        "runs": g.size(),
        "executions": {},
    }
    tables = {}
    executions = [("inline (--jobs 1)", dict(jobs=1)), ("process pool (--jobs 2)", dict(jobs=2))]
    if not args.no_ray and importlib.util.find_spec("ray") is not None:
        executions.append(("ray, local instance, 2 CPUs (--ray)", dict(ray="", jobs=2)))
    for label, kwargs in executions:
        load = os.getloadavg()[0]
        result, wall = timed(label, lambda kw=kwargs: run_sweep(g, **kw))
        df = result.table.to_pandas()
        tables[label] = df.drop(columns=[c for c in HOST_CLOCK_COLUMNS if c in df.columns])
        results["executions"][label] = {
            "wall_s": wall,
            "runs_per_s": len(df) / wall,
            "mean_run_host_s": float(df["run_wall_s"].mean()),
            "mean_run_cpu_s": float(df["run_cpu_s"].mean()),
            "load_average_1min_before": load,
            "failed": int(df["error"].notna().sum()),
        }
    first = next(iter(tables.values()))
    results["tables_equal_without_host_clock_columns"] = {k: bool(v.equals(first)) for k, v in tables.items()}

    plans = {}
    for label, inputs in (
        ("llama-3-70b TP 4 on 80 GiB (4 configurations, no workload)", PlanInputs("llama-3-70b", 80 * GiB, tp=4)),
        (
            "llama-3-8b on 24 GiB with sharegpt, 200 requests (4 simulated runs)",
            PlanInputs("llama-3-8b", 24 * GiB, workload="sharegpt", requests=200),
        ),
    ):
        p, wall = timed(label, lambda i=inputs: plan(i))
        plans[label] = {"wall_s": wall, "rows": {r.label: r.requests for r in p.rows}}
    results["plan"] = plans

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def markdown(r: dict[str, Any]) -> str:
    host = r["host"]
    load = ", ".join(f"{x:.2f}" for x in host["load_average_at_start"])
    lines = [
        "# kvscope sweep / plan timings",
        "",
        f"Measured by `benchmarks/bench_sweep.py` on {host['cpus']} CPUs ({host['cpu']}), load average {load} at "
        "the start (the machine is shared). Simulated runs (`--device sim`).",
        "",
        f"Grid: {r['runs']} runs ({json.dumps(r['grid'])}).",
        "",
        "| execution | load before | wall s | runs/s | per run: host s / CPU s | failed | same table |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, e in r["executions"].items():
        same = r["tables_equal_without_host_clock_columns"][label]
        lines.append(
            f"| {label} | {e['load_average_1min_before']:.1f} | {e['wall_s']:.1f} | {e['runs_per_s']:.2f} | "
            f"{e['mean_run_host_s']:.2f} / {e['mean_run_cpu_s']:.2f} | {e['failed']} | "
            f"{'yes' if same else 'NO'} |"
        )
    lines += ["", "| plan | wall s | requests held per configuration |", "|---|---|---|"]
    for label, p in r["plan"].items():
        lines.append(f"| {label} | {p['wall_s']:.1f} | {', '.join(f'{k}: {v}' for k, v in p['rows'].items())} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
