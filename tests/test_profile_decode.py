"""benchmarks/profile_decode.py --summarize: ncu's text report, one table row per profiled kernel."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import profile_decode  # noqa: E402


def test_summary_has_a_row_per_profiled_kernel_named_by_its_nvtx_range():
    text = (ROOT / "benchmarks/results/ncu_decode_h200_16x1k.txt").read_text()
    table = profile_decode.summarize(text).splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    assert len(rows) == text.count("==PROF== Profiling")  # every kernel ncu profiled, in launch order
    sdpa, split, merge = rows[:3]
    assert sdpa[0] == "sdpa-default" and sdpa[1].startswith("cudnn") and sdpa[2] == "1,8,16"
    assert split[:3] == ["paged-16 default", "_decode_split_kernel", "8,3,16"]
    assert merge[:3] == ["paged-16 default", "_decode_reduce_kernel", "32,16,1"]
    assert [r[3] for r in rows[:3]] == ["21.09", "22.05", "4.74"]  # Duration, us
    assert sdpa[4] == "3.31" and merge[4] == "0.17"  # TB/s, from ncu's Tbyte/s and Gbyte/s (170.11)
    assert split[7] == "38.14"  # dynamic shared memory, KiB
