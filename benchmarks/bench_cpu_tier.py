"""The prefix cache's CPU tier (Pensieve's two tiers, `--cpu-cache`) on a multi-turn workload, simulated: the same
requests with no prefix caching (vLLM as Pensieve measured it), prefix caching on the GPU only, and prefix caching
with a CPU tier; generated tokens per simulated second, hit rates per tier, prompt tokens computed again.

    python benchmarks/bench_cpu_tier.py                       # writes benchmarks/results/cpu_tier.json
    python benchmarks/bench_cpu_tier.py --kv-memory 16GiB -o benchmarks/results/cpu_tier_16g.json

Simulated H100 (kvscope.engine.costmodel: roofline, PCIe 5.0 x16 at 80% for tier copies, not overlapped with
compute), Llama-3-8B shapes. Wall times are this machine's (2 cores, shared).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from kvscope.analysis.summary import summarize
from kvscope.engine.api import RunConfig, record_run
from kvscope.units import parse_size
from kvscope.workload_gen import resolve_workload

KEYS = (
    "tokens_per_s",
    "run_time_s",
    "generated_tokens",
    "prompt_tokens",
    "prefill_tokens_computed",
    "prefix_hit_tokens",
    "prefix_hit_rate",
    "cpu_tier_hit_tokens",
    "cpu_tier_hit_blocks",
    "cpu_tier_offloaded_blocks",
    "cpu_tier_dropped_blocks",
    "pcie_bytes",
    "miss_cold_tokens",
    "miss_evicted_tokens",
    "miss_gap_tokens",
    "miss_floor_tokens",
    "preemptions",
    "recomputed_tokens",
    "ttft_p50_s",
    "ttft_p99_s",
    "mean_batch",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--think-time", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=50.0, help="conversations started per second")
    ap.add_argument("--kv-memory", default="8GiB")
    ap.add_argument("--cpu-cache", default="128GiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", default=str(Path(__file__).parent / "results" / "cpu_tier.json"))
    args = ap.parse_args()
    reqs, desc = resolve_workload(
        "multiturn",
        requests=args.requests,
        seed=args.seed,
        turns=args.turns,
        think_time=args.think_time,
        rate=args.rate,
    )
    runs: dict[str, dict[str, Any]] = {
        "no prefix caching": {},
        "prefix caching, GPU only": {"prefix_caching": True},
        f"prefix caching + {args.cpu_cache} CPU tier": {
            "prefix_caching": True,
            "cpu_cache": parse_size(args.cpu_cache),
        },
    }
    out: dict[str, Any] = {
        "workload": desc,
        "kv_memory": args.kv_memory,
        "cpu_cache": args.cpu_cache,
        "command": vars(args),
        "runs": {},
    }
    for name, opts in runs.items():
        cfg = RunConfig(device="sim", kv_memory=parse_size(args.kv_memory), max_len=4096, **opts)
        t0 = time.perf_counter()
        res = record_run(reqs, cfg)
        wall = time.perf_counter() - t0
        s = summarize(res.trace())
        row = {k: s.get(k) for k in KEYS} | {"wall_s": round(wall, 1)}
        out["runs"][name] = row
        print(
            f"{name}: {row['tokens_per_s']:,.0f} tok/s over {row['run_time_s']:,.1f} s simulated, hit "
            f"{row['prefix_hit_rate']:.1%} (CPU tier {row['cpu_tier_hit_tokens']:,} tokens), prefill computed "
            f"{row['prefill_tokens_computed']:,}, evicted-miss {row['miss_evicted_tokens']:,}, wall {wall:.0f} s",
            flush=True,
        )
    base = out["runs"]["no prefix caching"]["tokens_per_s"]
    for row in out["runs"].values():
        row["throughput_vs_no_caching"] = row["tokens_per_s"] / base if base else None
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
