"""Engine runs with each eviction policy the paged allocator takes (`kvscope run --eviction`), GPU prefix cache only,
on the multi-turn workload of bench_cpu_tier.py at 8 GiB of KV memory (simulated H100, Llama-3-8B shapes).

    python benchmarks/bench_engine_eviction.py       # writes benchmarks/results/engine_eviction.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from kvscope.analysis.summary import summarize
from kvscope.engine.api import RunConfig, record_run
from kvscope.workload_gen import resolve_workload

KEYS = ("tokens_per_s", "prefix_hit_rate", "prefill_tokens_computed", "miss_evicted_tokens")


def main() -> None:
    reqs, _ = resolve_workload("multiturn", requests=4000, seed=0, turns=8, think_time=10.0, rate=50.0)
    out = {}
    for ev in (None, "fifo", "lfu", "arc", "s3fifo"):
        t = time.perf_counter()
        cfg = RunConfig(device="sim", kv_memory=8 << 30, max_len=4096, prefix_caching=True, eviction=ev)
        s = summarize(record_run(reqs, cfg).trace())
        name = ev or "lru (default)"
        out[name] = {k: s[k] for k in KEYS} | {"wall_s": round(time.perf_counter() - t, 1)}
        print(name, out[name], flush=True)
    path = Path(__file__).parent / "results" / "engine_eviction.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
