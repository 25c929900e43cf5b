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
