"""The prefix cache's CPU tier (`--cpu-cache`, Pensieve's two tiers) and `kvscope run --eviction`: blocks evicted
from the GPU go to the CPU and come back on a hit (with real copies on cpu, checked against the shadow K/V), the sim
clock pays PCIe time for the copies, the books stay right, and the CLI, the summary and the sweep take both."""

from __future__ import annotations

import numpy as np
import pytest

from kvscope import cli
from kvscope.alloc.paged import PagedAllocator
from kvscope.analysis.prefix_misses import missed_blocks, request_misses
from kvscope.analysis.summary import summarize
from kvscope.engine.api import RunConfig, record_run
from kvscope.engine.costmodel import GPUCostModel, pcie_time_ns
from kvscope.recorder import Recorder
from kvscope.spec import get_spec
from kvscope.trace import load_trace, trace_from_recorder
from kvscope.workload import Request, stream_tokens

SPEC = get_spec("tiny")
BS = 4
BLOCK = BS * SPEC.bytes_per_token


def drive(prompts: list[np.ndarray], blocks: int, tier_blocks: int, eviction: str | None = None):
    """Prompts one at a time (admit, prefill, free): (hit tokens per prompt, copy kinds queued, events)."""
    rec = Recorder(None)
    alloc = PagedAllocator(
        SPEC,
        blocks * BLOCK,
        rec,
        block_size=BS,
        enable_prefix_caching=True,
        cpu_cache_bytes=tier_blocks * BLOCK,
        eviction=eviction,
    )
    hits, copies = [], []
    for i, p in enumerate(prompts):
        h = alloc.admit(i, p, len(p) + 1)
        alloc.append(i, p[h:])
        alloc.check_invariants()
        hits.append(h)
        copies.append([c.kind for c in alloc.pending_copies])
        alloc.pending_copies.clear()
        alloc.free(i)
        alloc.check_invariants()
    return hits, copies, trace_from_recorder(rec).events


def chain(name: str, blocks: int = 2) -> np.ndarray:
    return stream_tokens(name, 0, blocks * BS + 1).astype(np.int64)


def test_an_evicted_chain_comes_back_from_the_cpu_tier():
    a, b, c = chain("a"), chain("b"), chain("c")
    seq = [a, b, c, a]  # room for two chains: a is evicted by c
    no_tier, _, _ = drive(seq, blocks=5, tier_blocks=0)
    hits, copies, ev = drive(seq, blocks=5, tier_blocks=8)
    assert no_tier[3] == 0 and hits[3] == 2 * BS
    assert copies[2].count("swap_out") == 2  # c evicts a's two blocks: both offloaded
    assert copies[3].count("swap_in") == 2  # and both copied back for the hit
    kinds = ev["kind"].astype(str)
    assert (kinds == "block_offload").sum() >= 2 and (kinds == "block_reload").sum() == 2
    reload = ev[kinds == "block_reload"]
    assert (reload["seq"] == 3).all() and (reload["bytes"] == BLOCK).all()


def test_a_full_tier_drops_its_least_recently_used_block():
    prompts = [chain(f"p{i}") for i in range(6)] + [chain("p0")]
    hits, _, ev = drive(prompts, blocks=5, tier_blocks=2)
    kinds = ev["kind"].astype(str)
    assert (kinds == "block_tier_drop").sum() > 0
    assert hits[-1] == 0  # p0 left the GPU long ago and the tier (2 blocks) kept only the latest evictions


def test_random_traffic_keeps_the_books_and_never_hits_less_with_a_large_tier():
    rng = np.random.default_rng(0)
    heads = [stream_tokens(f"h{i}", 0, 6 * BS) for i in range(8)]
    prompts = []
    for i in range(150):
        head = heads[int(rng.integers(0, 8))][: BS * int(rng.integers(1, 7))]
        tail = stream_tokens(f"t{i % 11}", 0, int(rng.integers(1, 3 * BS)))
        prompts.append(np.concatenate([head, tail]).astype(np.int64))
    for eviction in (None, "arc"):
        base, _, _ = drive(prompts, blocks=12, tier_blocks=0, eviction=eviction)
        tiered, copies, _ = drive(prompts, blocks=12, tier_blocks=1000, eviction=eviction)
        assert sum(tiered) > sum(base)
        # with a tier that never fills, every block that ever was cached is found again
        assert all(h >= b for h, b in zip(tiered, base, strict=True))
        assert any("swap_in" in c for c in copies)


def test_cpu_tier_needs_prefix_caching_and_one_block():
    with pytest.raises(ValueError, match="--cpu-cache needs --prefix-caching"):
        PagedAllocator(SPEC, 8 * BLOCK, block_size=BS, cpu_cache_bytes=4 * BLOCK)
    with pytest.raises(ValueError, match="less than one block"):
        PagedAllocator(SPEC, 8 * BLOCK, block_size=BS, enable_prefix_caching=True, cpu_cache_bytes=BLOCK - 1)


def turns(conversations: int, n_turns: int, first: int = 3 * 16 + 5, grow: int = 2 * 16) -> list[Request]:
    """Multi-turn conversations: turn k's prompt is turn k-1's prompt and answer plus more tokens."""
    reqs = [
        Request(f"c{c}t{k}", float(k * 5 + c * 0.01), first + k * grow, 4, conversation=f"conv{c}")
        for c in range(conversations)
        for k in range(n_turns)
    ]
    return sorted(reqs, key=lambda r: r.arrival)


def test_cpu_runs_copy_the_blocks_back_exactly():
    """--device cpu: the reloaded K/V are the real data (attention checked against the shadow, which recomputes
    every prefix hit from the token ids)."""
    pytest.importorskip("torch")
    reqs = turns(6, 4)
    got = {}
    cfg = RunConfig(
        device="cpu",
        prefix_caching=True,
        cpu_cache=4 << 20,
        kv_memory=24 * 16 * SPEC.bytes_per_token,
        shadow=True,
        check_invariants=True,
    )
    res = record_run(reqs, cfg, setup=lambda e: got.setdefault("engine", e))
    ex = got["engine"].executor
    s = summarize(res.trace())
    assert s["cpu_tier_hit_blocks"] > 0 and s["cpu_tier_offloaded_blocks"] > 0
    assert ex.shadow_checks > 0 and ex.max_shadow_error < 1e-3


def test_sim_clock_pays_pcie_time_for_the_tier_copies():
    reqs = turns(12, 5)
    common = {"device": "sim", "prefix_caching": True, "kv_memory": 64 * 16 * get_spec("llama-3-8b").bytes_per_token}
    got = {}
    res = record_run(reqs, RunConfig(cpu_cache=1 << 30, **common), setup=lambda e: got.setdefault("e", e))
    clock = got["e"].executor
    alloc = got["e"].allocator
    assert alloc.tier_in_bytes > 0 and clock.pcie_ns > 0
    # never more than both directions one after the other, never less than the larger one alone, in one go
    model = GPUCostModel()
    assert clock.pcie_ns <= pcie_time_ns(model, alloc.tier_in_bytes, 0) + pcie_time_ns(model, alloc.tier_out_bytes, 0)
    trace = res.trace()
    s = summarize(trace)
    f = request_misses(trace)
    parts = ["hit_gpu", "hit_cpu", "cold", "evicted", "gap", "floor", "pending"]
    assert (f[parts].sum(axis=1) == f["prompt_tokens"]).all() and f["hit_cpu"].sum() == s["cpu_tier_hit_tokens"]
    assert s["pcie_bytes"] == alloc.tier_in_bytes + alloc.tier_out_bytes
    assert s["cpu_tier_hit_tokens"] > 0
    base = summarize(record_run(reqs, RunConfig(**common)).trace())
    assert s["prefill_tokens_computed"] < base["prefill_tokens_computed"]
    assert s["miss_evicted_tokens"] < base["miss_evicted_tokens"]
    assert res.meta["allocator_config"]["cpu_cache_blocks"] == (1 << 30) // alloc.block_bytes
    assert res.meta["engine_config"]["cost_model"]["pcie_bandwidth"] == 64e9


def test_miss_causes_sum_to_the_prompt_and_name_the_eviction():
    reqs = turns(12, 5)
    kv = 64 * 16 * get_spec("llama-3-8b").bytes_per_token
    trace = record_run(reqs, RunConfig(device="sim", prefix_caching=True, kv_memory=kv)).trace()
    f = request_misses(trace)
    parts = ["hit_gpu", "hit_cpu", "cold", "evicted", "gap", "floor", "pending"]
    assert len(f) == len(reqs) and (f[parts].sum(axis=1) == f["prompt_tokens"]).all()
    assert f["evicted"].sum() > 0 and f["cold"].sum() > 0 and f["pending"].sum() == 0
    blocks = missed_blocks(trace)
    evicted = blocks[blocks["cause"] == "evicted"]
    assert (evicted["evicted_step"] >= 0).all() and (evicted["evicted_s_before"] >= 0).all()
    s = summarize(trace)
    assert s["miss_evicted_tokens"] == f["evicted"].sum() and s["cpu_tier_hit_tokens"] == 0


@pytest.fixture
def only_run(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"run": cli.COMMANDS["run"]})


def test_run_cli_takes_eviction_and_cpu_cache(tmp_path, capsys, only_run):
    out = tmp_path / "t.kvtrace"
    argv = ["run", "-w", "multiturn", "-n", "40", "--prefix-caching", "--kv-memory", "256MiB", "-q", "-o", str(out)]
    assert cli.main([*argv, "--eviction", "s3fifo", "--cpu-cache", "1GiB"]) == 0
    config = load_trace(out).meta["allocator_config"]
    assert config["eviction"] == "s3fifo" and config["cpu_cache_blocks"] == (1 << 30) // config["block_bytes"]
    capsys.readouterr()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prefix-caching", "--eviction", "belady"], "--eviction belady: needs future"),
        (["--prefix-caching", "--eviction", "nope"], "unknown eviction policy 'nope'"),
        (["--eviction", "fifo"], "--eviction needs --prefix-caching"),
        (["--allocator", "vmm", "--cpu-cache", "1GiB"], "--cpu-cache applies to --allocator paged"),
        (["--prefix-caching", "--cpu-cache", "0"], "--cpu-cache: must be positive"),
    ],
)
def test_run_cli_refuses_bad_eviction_and_cpu_cache_in_one_line(extra, message, capsys, only_run, tmp_path):
    rc = cli.main(["run", "-w", "sharegpt", "-n", "4", "-q", "-o", str(tmp_path / "x.kvtrace"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_sweep_crosses_eviction_policies():
    from kvscope.sweep.grid import SweepGrid

    grid = SweepGrid(options={"eviction": ("lru", "fifo")}, base={"prefix_caching": True}, requests=10)
    points = grid.points()
    assert sorted(p.config.eviction for p in points) == ["fifo", "lru"]
