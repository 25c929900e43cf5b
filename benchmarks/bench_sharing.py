"""What KV sharing saves, as the PagedAttention paper measures it: parallel sampling and beam search on the Alpaca-
and ShareGPT-like workloads, paged blocks against VMM pages, and shared system prompts.

    python benchmarks/bench_sharing.py --out benchmarks/results/sharing.json          # the README table (sim)
    python benchmarks/bench_sharing.py --requests 20 --out /tmp/s.json               # a smoke run

Every run is `record_run` on --device sim (no compute; the roofline clock of the default cost model) with
llama-3-8b's KV geometry (128 KiB a token), 16 GiB of KV and the engine's defaults; the numbers are the trace's
own summary (kvscope.analysis.summary): `sharing_saving_mean` (1 - units held with sharing / units the same
sequences would hold without it, summed over steps: blocks for paged, page-groups for vmm) and
`sharing_saved_bytes_peak` (the most bytes sharing saved at a step's end). Allocators:

    paged            16-token blocks (vLLM's default), prefix caching only in the system-prompt runs
    vmm 2 MiB        per-layer K and V buffers, 2 MiB pages (1024 tokens of one buffer), page sharing on
    vmm megacache    one buffer for all layers, 2 MiB pages (16 tokens), page sharing on

The system-prompt runs turn on `prefix_caching` for both allocators (`--prefix-caching`: paged caches prompt
blocks, vmm maps the full pages of a live sequence with the same prompt prefix).

Writes one JSON file (--out) with every run's summary numbers and the workload it ran, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ALLOCATORS: dict[str, dict[str, Any]] = {
    "paged": {"allocator": "paged"},
    "vmm 2 MiB": {"allocator": "vmm"},
    "vmm megacache": {"allocator": "vmm", "megacache": True},
}
# (label, workload name, generator options): the paper's Figure 15 settings on both length models.
SHARING_RUNS = [(f"parallel n={n}", {"n": n}) for n in (2, 4, 6)] + [(f"beam K={k}", {"beam": k}) for k in (2, 4, 6)]
PAPER = {  # PagedAttention (SOSP'23) section 6.3, Figure 15: memory saving from sharing
    ("alpaca", "parallel"): "6.1-9.8%",
    ("sharegpt", "parallel"): "16.2-30.5%",
    ("alpaca", "beam"): "37.6-55.2%",
    ("sharegpt", "beam"): "44.3-66.3%",
}


def run_one(workload: str, requests: int, opts: dict[str, Any], allocator: dict[str, Any]) -> dict[str, Any]:
    from kvscope.analysis.summary import summarize
    from kvscope.engine import RunConfig, record_run
    from kvscope.workload_gen import resolve_workload

    reqs, desc = resolve_workload(workload, requests=requests, seed=0, **opts)
    t0 = time.perf_counter()
    result = record_run(reqs, RunConfig(**allocator), workload=desc)
    wall = time.perf_counter() - t0
    s = summarize(result.trace())
    keys = (
        "sharing_saving_mean",
        "sharing_saved_bytes_peak",
        "peak_used_bytes",
        "peak_logical_bytes",
        "peak_reserved_bytes",
        "prefix_hit_rate",
        "forks",
        "finished",
        "requests",
        "preemptions",
        "steps",
        "driver_calls",
        "label",
    )
    out = {k: s[k] for k in keys}
    out.update(
        wall_s=round(wall, 2),
        workload=workload,
        options=opts,
        prompt_mean=desc["prompt_len"]["mean"],
        output_mean=desc["output_len"]["mean"],
    )
    return out


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="requests per workload (default 200)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--system-prompt-len", type=int, default=256, help="shared system prompt tokens (default 256)")
    args = ap.parse_args(argv)
    runs: list[dict[str, Any]] = []
    for workload in ("alpaca", "sharegpt"):
        for label, opts in SHARING_RUNS:
            for name, alloc in ALLOCATORS.items():
                r = run_one(workload, args.requests, opts, alloc)
                r.update(setting=label, allocator_label=name)
                runs.append(r)
                print(f"{workload:9} {label:13} {name:14} saving {pct(r['sharing_saving_mean']):>6}  {r['wall_s']}s",
                      file=sys.stderr)  # fmt: skip
    prefix_opts = {"system_prompt_len": args.system_prompt_len}
    for name, alloc in ALLOCATORS.items():
        cfg = dict(alloc, prefix_caching=True)
        r = run_one("sharegpt", args.requests, prefix_opts, cfg)
        r.update(setting=f"system prompt {args.system_prompt_len}", allocator_label=name)
        runs.append(r)
        print(f"sharegpt  system prompt  {name:14} saving {pct(r['sharing_saving_mean']):>6}", file=sys.stderr)
    meta = {
        "what": "kvscope sharing savings on --device sim (llama-3-8b KV geometry, 16 GiB KV, engine defaults)",
        "requests_per_workload": args.requests,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "paper": {f"{w} {k}": v for (w, k), v in PAPER.items()},
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    print(table(runs))
    return 0


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per (workload, setting), the saving per allocator, the paper's range beside it."""
    names = list(ALLOCATORS)
    lines = [
        "| workload | setting | " + " | ".join(names) + " | paper (OPT-13B, vLLM) |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in runs:
        rows.setdefault((r["workload"], r["setting"]), {})[r["allocator_label"]] = r
    for (workload, setting), by in rows.items():
        kind = setting.split()[0]
        paper = PAPER.get((workload, kind), "-")
        cells = [pct(by[n]["sharing_saving_mean"]) if n in by else "-" for n in names]
        lines.append(f"| {workload} | {setting} | " + " | ".join(cells) + f" | {paper} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
