"""sharing: sharing_edges, fork_tree, prefix_tree (rebuilt from cache hashes + block tables) and prefix_stats."""

from __future__ import annotations

import pytest
from test_analysis_tracegen import make_requests, record, scenario_fork, scenario_prefix

from kvscope.analysis.fragmentation import block_states
from kvscope.analysis.memory import memory_timeline
from kvscope.analysis.requests import request_lifetimes
from kvscope.analysis.sharing import fork_tree, prefix_stats, prefix_tree, sharing_edges
from kvscope.analysis.summary import summarize
from kvscope.events import Kind


def test_sharing_edges_and_fork_tree_on_the_fork_scenario():
    trace = scenario_fork()
    edges = sharing_edges(trace, 1)
    assert list(edges.columns) == ["seq", "block", "ref_count", "table_index"]
    assert list(edges.itertuples(index=False, name=None)) == [(0, 0, 2, 0), (2, 0, 2, 0), (0, 1, 2, 1), (2, 1, 2, 1)]
    assert sharing_edges(trace, 0).empty and sharing_edges(trace, 2).empty

    tree = fork_tree(trace)
    assert len(tree) == 1
    row = tree.iloc[0]
    assert (row["child"], row["parent"], row["step"], row["tokens"], row["root"], row["depth"]) == (2, 0, 1, 6, 0, 1)
    assert row["t_s"] == pytest.approx(0.002)


def test_prefix_tree_on_the_prefix_scenario():
    tree = prefix_tree(scenario_prefix()).set_index("hash")
    assert sorted(tree.index) == [100, 101, 102]
    node = tree["node"]
    assert tree.loc[100, "parent"] == -1
    assert tree.loc[101, "parent"] == node[100] and tree.loc[102, "parent"] == node[101]
    assert tree["depth"].to_dict() == {100: 1, 101: 2, 102: 3}
    assert tree["tokens"].to_dict() == {100: 4, 101: 8, 102: 12}
    # seq 1 was served b0, b1 twice: at admission and at its re-admission after the preemption.
    assert tree["hits"].to_dict() == {100: 2, 101: 2, 102: 0}
    assert tree["block"].to_dict() == {100: 0, 101: 1, 102: 2}
    assert tree["cached"].all() and (tree["evictions"] == 0).all() and (tree["stores"] == 1).all()
    assert tree["first_step"].to_dict() == {100: 0, 101: 0, 102: 3}


def test_prefix_stats_on_the_prefix_scenario():
    trace = scenario_prefix()
    s = prefix_stats(trace)
    assert s["enabled"] is True and s["block_size"] == 4
    assert s["prompt_tokens"] == 19
    assert s["hit_tokens"] == 8 and s["readmission_hit_tokens"] == 8
    assert s["hit_rate"] == pytest.approx(8 / 19)
    assert s["requests_with_hits"] == 1
    assert s["cacheable_tokens"] == 8 + 8  # floor((9-1)/4)*4 + floor((10-1)/4)*4
    assert s["floor_lost_tokens"] == 0 + 1
    assert s["shared_prefix_floor_lost_tokens"] is None
    assert s["nodes"] == 3 and s["hit_nodes"] == 2 and s["peak_cached_blocks"] == 3 and s["evictions"] == 0
    assert s["hit_tokens"] == summarize(trace)["prefix_hit_tokens"]


def test_shared_prefix_floor_loss_uses_declared_prefix_lengths():
    trace = scenario_prefix()
    trace.meta["requests"]["shared_prefix_len"] = [0, 9]  # seq 1 shares 9 tokens: 8 servable in 4-token blocks
    assert prefix_stats(trace)["shared_prefix_floor_lost_tokens"] == 1


def test_real_prefix_caching_run():
    trace = record(
        "paged", make_requests(30, seed=8, shared_prefix=20), prefix_caching=True, kv_memory=20 * 1024, block_size=4
    )
    s = prefix_stats(trace)
    assert s["hit_tokens"] > 0 and s["nodes"] > 0
    assert s["hit_tokens"] == summarize(trace)["prefix_hit_tokens"]
    # First admissions' ADMIT aux (hit tokens) add up to the same number.
    ev = trace.events
    admits = ev[ev["kind"] == "admit"]
    preempt_pos = ev[ev["kind"] == "preempt"].groupby("seq").apply(lambda g: g.index.min())
    first = admits[~admits.apply(lambda r: r.name > preempt_pos.get(r["seq"], float("inf")), axis=1)]
    assert int(first["aux"].sum()) == s["hit_tokens"]
    assert s["hit_tokens"] + s["readmission_hit_tokens"] == int(admits["aux"].sum())
    assert s["hit_tokens"] <= s["cacheable_tokens"] <= s["prompt_tokens"]

    tree = prefix_tree(trace).set_index("node")
    roots = tree["parent"] == -1
    assert roots.any()
    children = tree[~roots]
    assert children["parent"].isin(tree.index).all()
    assert (children["depth"].to_numpy() == tree.loc[children["parent"], "depth"].to_numpy() + 1).all()
    # Each hit serves whole blocks: total hits over nodes x block size = hit tokens incl. re-admissions.
    assert int(tree["hits"].sum()) * 4 == s["hit_tokens"] + s["readmission_hit_tokens"]
    assert int(tree["evictions"].sum()) == int((ev["kind"] == "block_evict").sum())
    lt = request_lifetimes(trace)
    assert int(lt["prefix_hit_tokens"].sum()) == s["hit_tokens"]


def test_parallel_sampling_run_shares_blocks():
    trace = record("paged", make_requests(12, seed=4, n_max=4), kv_memory=64 * 1024)
    forks = fork_tree(trace)
    assert len(forks) == int(trace.events.loc[trace.events["kind"] == "fork", "seq"].nunique()) > 0
    assert (forks["depth"] == 1).all() and (forks["root"] == forks["parent"]).all()
    steps = memory_timeline(trace)
    busiest = int(steps.loc[steps["sharing_saved"].idxmax(), "step"])
    edges = sharing_edges(trace, busiest)
    assert not edges.empty and (edges["ref_count"] > 1).all()
    states = block_states(trace, busiest).set_index("unit")
    per_block = edges.groupby("block")["seq"].count()
    assert (per_block == states.loc[per_block.index, "ref_count"]).all()


@pytest.mark.parametrize("kind", ["static", "vmm"])
def test_no_block_sharing_outside_paged(kind):
    trace = record(kind, make_requests(6, seed=1, n_max=2), kv_memory=64 * 1024)
    assert sharing_edges(trace, 3).empty
    assert prefix_tree(trace).empty
    assert prefix_stats(trace)["hit_tokens"] == 0
    assert len(fork_tree(trace)) == int(
        trace.events.loc[trace.events["kind"] == Kind.FORK.name.lower(), "seq"].nunique()
    )


# ---- the PagedAttention paper's saving (issue 11) ------------------------------------------------------------------
def _sim_trace(requests, **options):
    from kvscope.engine import RunConfig, record_run

    options.setdefault("model", "tiny")
    options.setdefault("kv_memory", 1 << 20)
    return record_run(requests, RunConfig(max_len=64, check_invariants=True, **options)).trace()


def _parallel():
    from kvscope.workload import Request

    return [Request("a", 0.0, 20, 3, n=2)]


@pytest.mark.parametrize(
    ("allocator", "options", "by_step", "mean"),
    [
        # 16-token blocks: step 0 the two samples hold 20 tokens each in 2 + 2 blocks, shared: 2 held; step 1 the
        # first writer copies the shared half block: 3 held of 4; step 2 they finish (nothing held at its end).
        ("paged", {}, [(0, 2, 4), (1, 3, 4)], 1 - 5 / 8),
        # 32-token pages per layer buffer (4 KiB, tiny's 128-byte rows): one page-group each, shared until the
        # first write copies it (the whole prompt sits in one partly filled page).
        ("vmm", {"page_size": 4096}, [(0, 1, 2), (1, 2, 2)], 1 - 3 / 4),
        # megacache pages hold 8 tokens: 3 pages each, then the two full ones stay shared.
        ("vmm", {"page_size": 4096, "megacache": True}, [(0, 3, 6), (1, 4, 6)], 1 - 7 / 12),
        ("static", {}, [(0, 40, 40), (1, 42, 42)], 0.0),
    ],
    ids=["paged", "vmm", "vmm-megacache", "static"],
)
def test_sharing_saving_by_hand(allocator, options, by_step, mean):
    from kvscope.analysis.sharing import sharing_saving_mean, sharing_savings

    trace = _sim_trace(_parallel(), allocator=allocator, **options)
    frame = sharing_savings(trace)
    assert list(frame[["step", "units_with", "units_without"]].itertuples(index=False, name=None)) == by_step
    assert sharing_saving_mean(trace) == pytest.approx(mean)
    assert summarize(trace)["sharing_saving_mean"] == pytest.approx(mean)


def test_sharing_saving_counts_swapped_out_sequences_as_holding_nothing_and_is_none_without_tokens():
    from kvscope.analysis.sharing import SharingUnit, _held_units, sharing_saving_mean
    from kvscope.workload import Request

    trace = _sim_trace([Request("a", 0.0, 5, 1)])  # finishes in its prefill step: nothing held at any step end
    assert sharing_saving_mean(trace) is None
    assert summarize(trace)["sharing_saving_mean"] is None
    # Swapping takes the tokens out of device memory until SWAP_IN: a forced run that swaps.
    requests = [Request(f"r{i}", 0.0, 30, 30) for i in range(4)]
    trace = _sim_trace(requests, preemption="swap", kv_memory=9 * 16 * 512, block_size=16)
    ev = trace.events
    assert (ev["kind"] == "swap_out").any()
    held = _held_units(trace, SharingUnit("token", 512, 1, 1), memory_timeline(trace)["step"].to_numpy())
    tl = memory_timeline(trace)
    assert held.tolist() == (tl["logical"] // 512).tolist()  # the allocator's own count of tokens on the device


def test_beam_search_saves_more_than_parallel_sampling_and_the_fork_tree_has_the_beams():
    from kvscope.analysis.sharing import sharing_saving_mean
    from kvscope.workload import Request

    beams = _sim_trace([Request("a", 0.0, 20, 30, beam=4)], block_size=8)
    samples = _sim_trace([Request("a", 0.0, 20, 30, n=4)], block_size=8)
    assert sharing_saving_mean(beams) > sharing_saving_mean(samples) > 0
    tree = fork_tree(beams)
    assert (tree["depth"] > 1).any()  # beams forked from beams forked from the request: a tree, not a star
    assert (tree["step"] > 0).any() and set(tree["root"]) == {0}


def test_pruned_beams_end_their_lifetime_and_hold_nothing_after():
    from kvscope.analysis.requests import request_occupancy
    from kvscope.workload import Request

    trace = _sim_trace([Request("a", 0.0, 12, 10, beam=3)], allocator="paged", block_size=4)
    lt = request_lifetimes(trace).set_index("seq")
    pruned = set(trace.events.loc[trace.events["kind"] == "prune", "seq"])
    assert pruned and set(lt.index[lt["status"] == "pruned"]) == pruned
    assert (lt["status"] == "finished").sum() == 3
    # In a step, the beams it pruned ran in it and the beams forked at its end count from it (their first token came
    # out of it), as parallel samples do: at most 2K - 1, never every beam ever forked; the last step has the K.
    running = request_occupancy(trace)["running"]
    assert running.max() <= 5 and running.iloc[-1] == 3 and len(lt) > 5
    states = block_states(trace, int(trace.events["step"].max()) - 1)
    assert not set(states["seqs"].str.split(",").explode()) & {str(s) for s in pruned}


@pytest.mark.parametrize(
    ("allocator", "options"), [("paged", {}), ("vmm", {"page_size": 4096, "kv_memory": 1 << 22}), ("static", {})]
)
def test_beams_count_the_tokens_they_generated_not_those_they_were_forked_with(allocator, options):
    """K beams of O output tokens generate K x O tokens: a beam forked mid-decode inherits its parent's generated
    tokens in its memory, but not in the run's output count (which once counted them again for every fork)."""
    from kvscope.workload import Request

    requests = [Request("a", 0.0, 20, 30, beam=4), Request("b", 0.0, 7, 12, beam=3)]
    trace = _sim_trace(requests, allocator=allocator, **options)
    assert (trace.events["kind"] == "fork").sum() > 7  # beams forked from beams, not only at the prefill
    assert summarize(trace)["generated_tokens"] == 4 * 30 + 3 * 12


@pytest.mark.slow
def test_bench_sharing_runs_every_setting_and_writes_its_table(tmp_path):
    import json
    import sys

    sys.path.insert(0, "benchmarks")
    import bench_sharing

    out = tmp_path / "s.json"
    assert bench_sharing.main(["--requests", "3", "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 * 6 * 3 + 3
    by = {(r["workload"], r["setting"], r["allocator_label"]): r["sharing_saving_mean"] for r in runs}
    assert by[("alpaca", "beam K=4", "paged")] == by[("alpaca", "beam K=4", "vmm megacache")]
