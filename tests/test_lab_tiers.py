"""The lab's CPU tier (`kvscope lab --cpu-cache BLOCKS`) and its HTML page (`--report`): victims of the GPU policy
go to an LRU tier and come back on a hit, hits per tier add up, an unbounded tier reaches the workload's maximum,
and the page holds every lab view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvscope import cli
from kvscope.lab.accesses import load_accesses
from kvscope.lab.causes import CAUSES, request_causes
from kvscope.lab.sweep import COLUMNS, run_lab, run_one
from kvscope.present.lab import LAB_VIEWS

DATA = Path(__file__).parent / "data" / "mooncake" / "conversation_head2000.jsonl"


@pytest.fixture(scope="module")
def acc():
    return load_accesses(str(DATA), None, 800)


def test_no_tier_is_the_one_tier_replay(acc):
    for policy in ("lru", "arc", "belady"):
        plain, _ = run_one(acc, policy, 300)
        zero, _ = run_one(acc, policy, 300, cpu_cache=0)
        assert plain == zero or (plain.hit_blocks, plain.evictions) == (zero.hit_blocks, zero.evictions)
        assert plain.cpu_hit_blocks == 0 and plain.cpu_cache_blocks == 0


def test_an_unbounded_tier_hits_everything_but_cold_and_too_deep_blocks(acc):
    row, rep = run_one(acc, "lru", 200, cpu_cache=10**7)
    assert row.miss_evicted == 0 and row.miss_gap == 0 and rep.cpu_drops == 0
    assert row.hit_blocks == row.total_blocks - row.miss_cold - row.miss_capacity
    gpu_only, _ = run_one(acc, "lru", 200)
    assert row.cpu_hit_blocks > 0 and row.hit_blocks > gpu_only.hit_blocks


@pytest.mark.parametrize("policy", ["lru", "fifo", "s3fifo", "phase"])
def test_tiered_misses_still_sum_and_explain(acc, policy):
    row, rep = run_one(acc, policy, 150, 0.0, cpu_cache=2500, explain=True)
    misses = row.total_blocks - row.hit_blocks
    assert row.miss_cold + row.miss_evicted + row.miss_gap + row.miss_capacity == misses
    assert 0 < row.cpu_hit_blocks <= row.hit_blocks and rep.cpu_drops > 0
    per = request_causes(acc, rep)
    assert (per[list(CAUSES)].sum(axis=1) == per["blocks"]).all()
    assert per["hit"].sum() == row.hit_blocks and per["evicted"].sum() == row.miss_evicted


def test_a_chain_evicted_from_the_gpu_is_found_in_the_tier():
    from kvscope.lab.accesses import from_chains
    from kvscope.lab.replay import replay
    from kvscope.policies.lru import LRU

    acc = from_chains([[0, 1], [2, 3], [4, 5], [0, 1]])  # room for two chains: the third evicts the first
    for cpu, want, from_cpu in ((0, 0, 0), (2, 2, 2), (1, 1, 1)):  # LRU evicts tails first: a 1-block tier keeps 0
        rep = replay(acc, LRU(), 4, cpu_capacity=cpu)
        assert int(rep.hits[3]) == want
        assert rep.cpu_hits is None if not cpu else int(rep.cpu_hits[3]) == from_cpu


def test_lab_command_takes_a_cpu_tier_and_writes_a_report(tmp_path, capsys):
    page = tmp_path / "lab.html"
    argv = ["lab", "-w", str(DATA), "-n", "400", "-p", "lru,arc", "-c", "100,400", "--cpu-cache", "2500"]
    assert cli.main([*argv, "--json", "--report", str(page)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(r["cpu_cache_blocks"] == 2500 and r["cpu_hit_blocks"] > 0 for r in rows)
    text = page.read_text()
    assert text.count("Plotly.newPlot") == 1 and all(f"id='lab{i}'" in text for i in range(len(LAB_VIEWS)))
    assert "CPU-tier hits" in text and "<script>" in text and len(text) > 1_000_000  # plotly.js inline


def test_lab_command_refuses_a_negative_tier(capsys):
    assert cli.main(["lab", "-w", str(DATA), "-c", "100", "--cpu-cache", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--cpu-cache: must be a number of blocks >= 0" in err and err.count("\n") == 1


def test_run_lab_columns_with_a_tier(acc):
    frame = run_lab(acc, ["lru"], [100, 1000], cpu_cache=300)
    assert list(frame.columns) == list(COLUMNS)
    assert (frame["cpu_cache_blocks"] == 300).all() and np.all(frame["cpu_hit_blocks"] <= frame["hit_blocks"])
