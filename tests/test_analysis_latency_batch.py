"""Latency (queueing, TTFT, TPOT), batch size and what limited it, the comparison verdict, block tables and the fill
level of the fragmentation map, on small simulated runs through the real engine, scheduler and allocators."""

from __future__ import annotations

import numpy as np
import pytest

from kvscope.analysis.batch import batch_limits, batch_summary
from kvscope.analysis.block_tables import block_tables
from kvscope.analysis.compare import comparison_verdict, setup_differences
from kvscope.analysis.fragmentation import fill_matrix, state_matrix
from kvscope.analysis.latency import latency_summary, request_latency
from kvscope.analysis.requests import request_lifetimes
from kvscope.analysis.steps import step_durations
from kvscope.analysis.summary import summarize
from kvscope.workload import Request


def run(kind: str, requests, **cfg):
    from kvscope.engine.api import RunConfig, record_run

    opts = dict(device="sim", model="tiny", kv_memory=1 << 20, max_len=256, max_batch=64, max_tokens_per_step=4096)
    opts.update(cfg)
    if kind == "vmm":
        opts.setdefault("page_size", 4096)
    return record_run(requests, RunConfig(allocator=kind, **opts), progress=False).trace()


def burst(count: int, prompt: int = 20, output: int = 10, *, gap: float = 0.0) -> list[Request]:
    return [Request(f"r{i}", i * gap, prompt + i % 5, output + i % 7) for i in range(count)]


@pytest.fixture(scope="module")
def paged():
    return run("paged", burst(24))


# ---- latency ---------------------------------------------------------------------------------------------------
def test_admission_and_first_token_are_distinct_times(paged):
    lat = request_latency(paged)
    assert len(lat) == 24 and (lat["clock"] == "sim").all()
    # Admission is the start of the admission step, the first token the end of the prefill step: never equal.
    assert (lat["first_token_s"] > lat["admit_s"]).all()
    assert (lat["ttft_s"] >= lat["queue_s"]).all() and (lat["ttft_s"] > 0).all()


def test_tpot_is_the_mean_duration_of_a_requests_decode_steps(paged):
    lat = request_latency(paged).set_index("seq")
    lt = request_lifetimes(paged).set_index("seq")
    steps = step_durations(paged).set_index("step")["dur_s"]
    for seq in lat.index[:6]:
        first, last = int(lt.at[seq, "first_token_step"]), int(lt.at[seq, "finish_step"])
        if lt.at[seq, "preemptions"] or last <= first:
            continue
        expected = steps.loc[first + 1 : last].sum() / (lt.at[seq, "generated"] - 1)
        assert lat.at[seq, "tpot_s"] == pytest.approx(expected, rel=1e-9)


def test_latency_percentiles_in_the_summary(paged):
    s = summarize(paged)
    lat = request_latency(paged)
    for prefix, column in (("ttft", "ttft_s"), ("tpot", "tpot_s"), ("queue", "queue_s")):
        for p in (50, 90, 99):
            assert s[f"{prefix}_p{p}_s"] == pytest.approx(np.percentile(lat[column].dropna(), p))
    assert s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"]
    assert latency_summary(paged)["latency_requests"] == 24


def test_queueing_grows_when_the_batch_is_capped():
    wide, narrow = run("paged", burst(24), max_batch=64), run("paged", burst(24), max_batch=2)
    assert summarize(narrow)["queue_p90_s"] > 5 * max(summarize(wide)["queue_p90_s"], 1e-6)


# ---- batch and its limit -----------------------------------------------------------------------------------------
def test_a_full_batch_is_limited_by_max_batch():
    trace = run("paged", burst(30), max_batch=4)
    s = summarize(trace)
    assert s["max_batch"] == 4 and s["batch_limited_by"] == "max-batch" and s["batch_limited_share"] > 0.9
    assert s["engine_max_batch"] == 4


def test_a_small_pool_is_limited_by_memory():
    trace = run("paged", burst(30, prompt=100, output=60), kv_memory=40 * 16 * 64 * 32, max_batch=64)
    s = summarize(trace)
    assert s["max_batch"] < 30 and s["batch_limited_by"] == "memory"


def test_a_small_token_budget_is_limited_by_the_budget():
    trace = run("paged", burst(30, prompt=60, output=30), max_tokens_per_step=64, max_batch=64)
    frame = batch_limits(trace)
    assert (frame["tokens"] <= 64 + frame["batch"]).all()
    assert summarize(trace)["batch_limited_by"] == "token budget"


def test_requests_that_never_wait_are_limited_by_arrivals():
    trace = run("paged", burst(10, gap=5.0), max_batch=64)  # one request every 5 s of simulated time
    s = batch_summary(trace)
    assert s["batch_limited_by"] == "arrivals" and s["batch_waiting_share"] == 0.0 and s["max_batch"] == 1


# ---- the verdict ---------------------------------------------------------------------------------------------------
def test_verdict_names_the_run_that_fits_more(paged):
    vmm = run("vmm", burst(24), page_size=64 << 10)  # big pages: more internal fragmentation per request
    verdict = comparison_verdict({"paged": paged, "vmm": vmm})
    sp, sv = summarize(paged), summarize(vmm)
    better = "paged" if sp["mean_waste_fraction"] < sv["mean_waste_fraction"] else "vmm"
    assert verdict.memory.startswith(f"Memory: {better} is better")
    assert f"{100 * sp['mean_waste_fraction']:.1f}%" in verdict.memory
    assert f"{sp['max_batch']:,}" in verdict.memory and "limited the batch" in verdict.memory
    faster = "paged" if sp["tokens_per_s"] > sv["tokens_per_s"] else "vmm"
    assert verdict.throughput.startswith(f"Throughput: {faster}")
    assert verdict.latency.startswith("Latency: ") and not verdict.warnings  # same workload, budget, model


def test_verdict_warns_when_setups_differ(paged):
    other = run("paged", burst(12), kv_memory=2 << 20)
    warnings = setup_differences({"a": paged, "b": other})
    assert any("different workloads" in w for w in warnings)
    assert any("different KV budgets" in w and "a: 1 MiB" in w and "b: 2 MiB" in w for w in warnings)
    assert comparison_verdict({"a": paged, "b": other}).warnings == warnings
    assert comparison_verdict({"a": paged}).sentences == []


# ---- block tables and fill -------------------------------------------------------------------------------------
def test_block_tables_mark_shared_and_copied_blocks():
    reqs = [Request(f"r{i}", 0.0, 40, 12, n=3) for i in range(4)]  # parallel sampling: forks share the prompt
    trace = run("paged", reqs, block_size=16)
    lt = request_lifetimes(trace)
    fork_step = int(lt.loc[lt["parent"] >= 0, "admit_step"].min())
    tables = block_tables(trace, fork_step + 1)
    assert set(tables["kind"]) <= {"own", "shared", "cow"}
    shared = tables[tables["kind"] == "shared"]
    assert len(shared) and (shared["ref_count"] > 1).all()
    # The two full prompt blocks (40 tokens: blocks 0 and 1) are shared by the 3 samples of each request.
    assert (shared.groupby("unit")["seq"].nunique() == 3).all()
    # Samples append to the shared partial third block: each gets its own copy (copy-on-write) or keeps it alone.
    cows = tables[tables["kind"] == "cow"]
    assert len(cows) and (cows["cow_source"] >= 0).all() and (cows["ref_count"] == 1).all()
    # One group per request: its samples share a prefix.
    assert tables.groupby("group")["seq"].nunique().max() == 3


def test_fill_matrix_counts_tokens_in_reserved_units(paged):
    fill = fill_matrix(paged, 8, 20)
    states = state_matrix(paged, 8, 20)
    assert len(fill) == len(states.drop_duplicates(["step_bin", "unit_bin"]))
    assert (fill["tokens"] <= fill["slots"]).all() and fill["fill"].dropna().between(0, 1).all()
    zoomed = fill_matrix(paged, 8, 20, steps=(2, 5), units=(0, 3))
    assert zoomed["step_bin"].min() >= 2 and zoomed["step_end"].max() <= 5 and zoomed["unit_end"].max() <= 4
    with pytest.raises(ValueError, match="holds nothing"):
        state_matrix(paged, 8, 20, units=(10**9, 10**9 + 5))
