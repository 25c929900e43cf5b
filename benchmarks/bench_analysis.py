"""Issue 13, item 2: how much memory and time `summary` and `report` take on a large trace, against the targets
(the 50,000-request trace in at most 1 GB peak and 5 s each).

    python benchmarks/bench_analysis.py --requests 50000 --out benchmarks/results/analysis.json   # also .md
    python benchmarks/bench_analysis.py --trace out/big.kvtrace ...                               # reuse a trace

Each step runs in a fresh Python process (this script re-run with --child), which reports its own wall time, CPU
time and peak resident memory (getrusage ru_maxrss), so one step's caches and allocations never inflate another's.
Steps: record the trace (`kvscope run --device sim`, paged, ShareGPT-like; the run writes its digest into it when it
closes: kvscope.digest), load it, summarize it, build the HTML report; the same without the digest (KVSCOPE_NO_DIGEST:
every result computed from every event, as for a trace recorded without one); what the digest costs at the run's
close (load every event, compute its results); and, as the floor any projected reader starts from, read three event
columns with pyarrow's streaming reader. Measures and compares with the targets; asserts nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGET_PEAK_BYTES = 1 << 30  # 1 GB (GiB) peak
TARGET_WALL_S = 5.0


def _stage(stages: list[dict[str, Any]], name: str, fn: Any) -> None:
    """Run fn, then note its wall time and the peak RSS so far (cumulative: ru_maxrss) under `name`."""
    t = time.perf_counter()
    fn()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stages.append({"stage": name, "wall_s": time.perf_counter() - t, "peak_rss_bytes_after": rss})


def child(step: str, trace: str, requests: int) -> None:
    """One step, in this process; prints {wall_s, cpu_s, peak_rss_bytes, ...} as JSON on the last line."""
    t0, c0 = time.perf_counter(), time.process_time()
    extra: dict[str, Any] = {}
    if step == "record":
        from kvscope.engine.api import RunConfig, record_run
        from kvscope.workload_gen import resolve_workload

        reqs, desc = resolve_workload("sharegpt", requests=requests, seed=0)
        result = record_run(reqs, RunConfig(allocator="paged", device="sim"), path=trace, workload=desc)
        extra = {"events": result.stats.events, "finished": result.stats.finished_requests}
    elif step == "load":
        from kvscope.trace import load_trace

        extra = {"events": load_trace(trace).num_events}  # the store only: .events would build the whole frame
    elif step == "summary":
        from kvscope.analysis.summary import summarize
        from kvscope.trace import load_trace

        s = summarize(load_trace(trace))
        extra = {"events": s["events"], "peak_used_bytes": s["peak_used_bytes"]}
    elif step == "summary-stages":
        # Where summarize's time and memory go: each stage's own functions, called in summarize's order (their
        # results are cached on the trace, as summarize caches them), with the peak RSS after each.
        from kvscope.analysis import _events, batch, latency, memory, summary
        from kvscope.analysis import requests as lifetimes
        from kvscope.trace import load_trace

        stages: list[dict[str, Any]] = []
        loaded: list[Any] = [None]

        stage = functools.partial(_stage, stages)
        stage("load_trace", lambda: loaded.__setitem__(0, load_trace(trace)))
        tr = loaded[0]
        stage("memory_timeline", lambda: memory.memory_timeline(tr))
        stage("request_lifetimes", lambda: lifetimes.request_lifetimes(tr))
        stage("step_clock", lambda: _events.step_clock(tr))
        stage("rest of summary", lambda: summary._build(tr))
        stage("latency_summary", lambda: latency.latency_summary(tr))
        stage("batch_summary", lambda: batch.batch_summary(tr))
        extra = {"stages": stages}
    elif step == "report-stages":
        # Where build_report's time goes: load, the summary, each view's figure (in the report's order), then the
        # page itself (the views' results are cached on the trace by then, so that is templating and JSON).
        from kvscope.analysis.summary import summarize
        from kvscope.present.views import split
        from kvscope.report import build_report
        from kvscope.trace import load_trace

        stages = []
        loaded = [None]

        stage = functools.partial(_stage, stages)
        stage("load_trace", lambda: loaded.__setitem__(0, load_trace(trace)))
        tr = loaded[0]
        stage("summarize", lambda: summarize(tr))
        for view in split(tr)[0]:
            stage(f"view {view.key}", lambda view=view: view.figure(tr))
        stage("build_report (the rest)", lambda: build_report([tr]))
        extra = {"stages": stages}
    elif step == "report":
        from kvscope.report import build_report
        from kvscope.trace import load_trace

        html = build_report([load_trace(trace)])
        extra = {"html_bytes": len(html.encode())}
    elif step == "digest":
        # What record_run adds when the run closes (kvscope.digest_write.write_digest less the few-byte append): every
        # event loaded, then the digest's results computed (run with KVSCOPE_NO_DIGEST, so nothing comes from one).
        from kvscope import digest_write
        from kvscope.trace import load_trace

        results = digest_write.results(load_trace(trace))
        extra = {"digest_json_bytes": len(json.dumps(results, default=digest_write._json_value))}
    elif step == "pyarrow-3-columns":
        import pyarrow as pa

        rows = 0
        with pa.OSFile(trace, "rb") as f:
            reader = pa.ipc.open_stream(f)
            for batch in reader:
                rows += batch.select(["kind", "seq", "n"]).num_rows
        extra = {"rows": rows}
    else:
        raise SystemExit(f"unknown step {step}")
    out = {
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        **extra,
    }
    print(json.dumps(out))


NO_DIGEST = " (no digest)"  # a step run with KVSCOPE_NO_DIGEST=1: the trace read and analysed as if it had none


def measure(label: str, trace: str, requests: int) -> dict[str, Any]:
    step = label.removesuffix(NO_DIGEST)
    cmd = [sys.executable, __file__, "--child", step, "--trace", trace, "--requests", str(requests)]
    env = dict(os.environ)
    env.pop("KVSCOPE_NO_DIGEST", None)
    if label.endswith(NO_DIGEST):
        env["KVSCOPE_NO_DIGEST"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], "wall_s": time.perf_counter() - t0}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peak_mib = result["peak_rss_bytes"] / 2**20
    print(f"{label}: {result['wall_s']:.1f} s wall, {result['cpu_s']:.1f} s CPU, {peak_mib:,.0f} MiB peak")
    return result


STEPS = (
    "load",
    "summary",
    "report",
    "report-stages",
    "load" + NO_DIGEST,
    "summary" + NO_DIGEST,
    "summary-stages" + NO_DIGEST,
    "report" + NO_DIGEST,
    "report-stages" + NO_DIGEST,
    "digest" + NO_DIGEST,
    "pyarrow-3-columns",
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--trace", help="trace to analyse (recorded first when missing)")
    ap.add_argument("--out", default="benchmarks/results/analysis.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    trace = args.trace or f"out/bench-analysis-{args.requests}.kvtrace"
    if args.child:
        child(args.child, trace, args.requests)
        return 0

    Path(trace).parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "host": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "requests": args.requests,
        "trace": trace,
        "steps": {},
    }
    if not Path(trace).exists():
        results["steps"]["record"] = measure("record", trace, args.requests)
    results["trace_bytes"] = Path(trace).stat().st_size
    for step in STEPS:
        results["steps"][step] = measure(step, trace, args.requests)
    results["host"]["load_average_at_end"] = os.getloadavg()
    for step in ("summary", "report", "summary" + NO_DIGEST, "report" + NO_DIGEST):
        r = results["steps"][step]
        if "error" not in r:
            r["target_peak_met"] = r["peak_rss_bytes"] <= TARGET_PEAK_BYTES
            r["target_wall_met"] = r["wall_s"] <= TARGET_WALL_S
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def markdown(r: dict[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in r["host"]["load_average_at_start"])
    load_end = ", ".join(f"{x:.2f}" for x in r["host"].get("load_average_at_end", ()))
    lines = [
        "# Analysis memory and time (issue 13, item 2)",
        "",
        f"`benchmarks/bench_analysis.py --requests {r['requests']}` on {r['host']['cpus']} CPUs (shared with other "
        f"people's jobs), load average (1, 5, 15 min) {load} at the start and {load_end} at the end. "
        f"Trace: {r['requests']:,} ShareGPT-like requests, paged, --device sim, "
        f"{r['trace_bytes'] / 2**20:,.1f} MiB on disk, its digest included. Each step in a fresh process; "
        f"peak = ru_maxrss. '(no digest)': run with KVSCOPE_NO_DIGEST=1 (every result computed from the events, as "
        "for a trace without a digest); 'digest (no digest)': what writing the digest costs when the run closes.",
        "",
        "| step | wall s | CPU s | peak MiB | target (1 GiB, 5 s; set for the 50,000-request trace) |",
        "|---|---|---|---|---|",
    ]
    for step, s in r["steps"].items():
        if "error" in s:
            lines.append(f"| {step} | failed: {s['error']} | | | |")
            continue
        target = ""
        if "target_peak_met" in s:
            peak = "met" if s["target_peak_met"] else f"{s['peak_rss_bytes'] / TARGET_PEAK_BYTES:.1f}x over"
            wall = "met" if s["target_wall_met"] else f"{s['wall_s'] / TARGET_WALL_S:.1f}x over"
            target = f"memory {peak}, time {wall}"
        lines.append(
            f"| {step} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {s['peak_rss_bytes'] / 2**20:,.0f} | {target} |"
        )
    for key, what in (
        ("report-stages", "Inside the report, the trace read with its digest"),
        ("summary-stages" + NO_DIGEST, "Inside summarize, without the digest"),
        ("report-stages" + NO_DIGEST, "Inside the report, without the digest"),
    ):
        stages = r["steps"].get(key, {}).get("stages")
        if stages:
            lines += ["", f"{what}, in one process (peak RSS is cumulative):", "",
                      "| stage | wall s | peak MiB after |", "|---|---|---|"]  # fmt: skip
            for st in stages:
                lines.append(f"| {st['stage']} | {st['wall_s']:.1f} | {st['peak_rss_bytes_after'] / 2**20:,.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
