"""fragmentation.block_states / state_matrix: exact states on hand-written traces, replayed totals equal to the
allocator's books at every step of real runs, checkpoints that change nothing, and binning caps."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_analysis_tracegen import (
    books_mismatches,
    make_requests,
    record,
    run_engine,
    scenario_fork,
    scenario_prefix,
)

from kvscope.analysis import replay as _replay
from kvscope.analysis.fragmentation import MATRIX_COLUMNS, block_states, state_matrix, unit_states
from kvscope.analysis.memory import memory_timeline
from kvscope.analysis.replay import base as replay_base

STATE_COLUMNS = ["unit", "state", "fill", "capacity_tokens", "ref_count", "seqs", "slot"]


def rows(df, *units):
    return df.set_index("unit").loc[list(units)]


def test_fork_scenario_states():
    trace = scenario_fork()
    s0 = block_states(trace, 0)
    assert list(s0.columns[:7]) == STATE_COLUMNS and len(s0) == 8
    assert s0["state"].astype(str).tolist() == ["active"] * 3 + ["free"] * 5
    assert s0["fill"].tolist() == [4, 1, 3, 0, 0, 0, 0, 0]
    assert s0["seqs"].tolist()[:3] == ["0", "0", "1"]
    assert (s0["capacity_tokens"] == 4).all()

    s1 = block_states(trace, 1)
    shared = rows(s1, 0, 1)
    assert shared["state"].astype(str).tolist() == ["shared", "shared"]
    assert shared["ref_count"].tolist() == [2, 2]
    assert shared["seqs"].tolist() == ["0,2", "0,2"]
    assert shared["fill"].tolist() == [4, 2]
    assert rows(s1, 2)["state"].astype(str).tolist() == ["free"]

    s2 = block_states(trace, 2)
    assert (s2["state"].astype(str) == "free").all() and (s2["ref_count"] == 0).all()


def test_prefix_scenario_states():
    trace = scenario_prefix()
    s1 = block_states(trace, 1)
    assert rows(s1, 0, 1, 2, 3)["state"].astype(str).tolist() == ["shared", "shared", "active", "active"]
    assert rows(s1, 0, 1, 2, 3)["fill"].tolist() == [4, 4, 2, 2]
    assert rows(s1, 0)["hashed"].tolist() == [True] and rows(s1, 0)["hash"].tolist() == [100]
    assert rows(s1, 3)["table_index"].tolist() == [2]
    s3 = block_states(trace, 3)
    assert rows(s3, 0, 1, 2)["state"].astype(str).tolist() == ["cached_idle"] * 3
    assert rows(s3, 0, 1, 2)["fill"].tolist() == [4, 4, 4]
    assert (s3.loc[s3["unit"] >= 3, "state"].astype(str) == "free").all()
    # Before the first step: nothing happened yet; past the last: the final state.
    assert (block_states(trace, -1)["state"].astype(str) == "free").all()
    assert block_states(trace, 10_000).equals(s3)


REAL_RUNS = [
    ("paged", {"prefix_caching": True, "kv_memory": 20 * 1024}),
    ("paged", {"preemption": "swap", "swap_space": 8 * 1024, "kv_memory": 16 * 1024, "block_size": 8}),
    ("paged", {"chunked_prefill": True, "max_tokens_per_step": 24, "kv_memory": 16 * 1024}),
    ("static", {"static_variant": "max", "kv_memory": 128 * 1024}),
    ("static", {"static_variant": "pow2", "kv_memory": 48 * 1024}),
    ("static", {"static_variant": "oracle", "kv_memory": 32 * 1024}),
    ("vmm", {"eager_pages": 1, "kv_memory": 32 * 1024}),
    ("vmm", {"deferred_reclaim": False, "kv_memory": 32 * 1024}),
    ("vmm", {"megacache": True, "page_size": 8192, "kv_memory": 64 * 1024}),
]


@pytest.mark.parametrize("kind,opts", REAL_RUNS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(REAL_RUNS)])
def test_replay_equals_books(kind, opts):
    trace = record(kind, make_requests(20, seed=11, n_max=3, shared_prefix=12), **opts)
    assert len(memory_timeline(trace)) == trace._stats.steps
    assert books_mismatches(trace, max_steps=30) == []
    assert block_states(trace, 0)["state"].astype(str).isin(unit_states(trace)).all()


@pytest.mark.parametrize("kind", ["paged", "static", "vmm"])
def test_replay_equals_books_at_every_step(kind):
    opts = {"paged": {"prefix_caching": True, "block_size": 4}, "static": {"static_variant": "pow2"}, "vmm": {}}
    trace = record(kind, make_requests(10, seed=21, n_max=2, shared_prefix=8), kv_memory=24 * 1024, **opts[kind])
    steps = memory_timeline(trace)["step"].tolist()
    assert books_mismatches(trace, steps=steps) == []


@settings(max_examples=10)
@given(
    kind=st.sampled_from(["paged", "static", "vmm"]),
    seed=st.integers(0, 10_000),
    capacity_kib=st.integers(16, 64),  # vmm needs one page-group: 4 buffers x 4 KiB
    n_max=st.integers(1, 3),
)
def test_replay_equals_books_property(kind, seed, capacity_kib, n_max):
    opts = {"paged": {"enable_prefix_caching": True, "block_size": 4}, "static": {"variant": "pow2"}, "vmm": {}}
    trace = run_engine(
        kind, make_requests(8, seed=seed, n_max=n_max, shared_prefix=8), capacity=capacity_kib * 1024, **opts[kind]
    )
    assert books_mismatches(trace, max_steps=15) == []


def test_checkpoints_change_nothing(monkeypatch):
    monkeypatch.setattr(replay_base, "MIN_INTERVAL", 64)
    trace = record(
        "paged", make_requests(30, seed=2, n_max=2, shared_prefix=12), prefix_caching=True, kv_memory=20 * 1024
    )
    steps = memory_timeline(trace)["step"].tolist()
    tl = _replay.timeline(trace)
    assert tl.interval == 64 and len(tl.events) > 5 * 64
    rng = random.Random(0)
    order = rng.sample(steps, len(steps))  # jump around: backwards needs a checkpoint, forwards extends the pass
    # the Timeline itself (block_states of a paged trace takes the vectorised replay: test_fragmentation_sweep.py)
    got = {s: tl.at_step(s, lambda replay: replay.frame()) for s in order}
    assert len(tl.checkpoints) > 5

    for s in steps[:: max(1, len(steps) // 25)]:
        replay = _replay.BlockReplay(trace)
        replay.apply(tl.events, 0, tl.index_of_step(s))
        assert replay.frame().equals(got[s]), f"step {s}"


def test_a_late_step_after_the_first_pass_replays_at_most_one_interval(monkeypatch):
    monkeypatch.setattr(replay_base, "MIN_INTERVAL", 32)
    trace = record("paged", make_requests(30, seed=3), kv_memory=20 * 1024)
    steps = memory_timeline(trace)["step"].tolist()
    tl = _replay.timeline(trace)  # the Timeline itself, as the replays of other addressings use it

    def replayed(step):
        return tl.at_step(step, lambda replay: replay.frame())

    replayed(steps[-1])  # the first pass
    applied = []
    original = _replay.BlockReplay.apply

    def counting(self, ev, lo, hi):
        applied.append(hi - lo)
        return original(self, ev, lo, hi)

    monkeypatch.setattr(_replay.BlockReplay, "apply", counting)
    for s in steps[:: max(1, len(steps) // 10)]:
        replayed(s)
    assert applied and max(applied) < 32


def test_state_matrix_exact_on_the_fork_scenario():
    m = state_matrix(scenario_fork(), max_units=8, max_steps=3)
    assert list(m.columns) == MATRIX_COLUMNS
    cell = m.set_index(["step_bin", "unit_bin", "state"])["fraction"]
    assert cell[(0, 0, "active")] == 1.0
    assert cell[(1, 0, "shared")] == 1.0 and cell[(1, 1, "shared")] == 1.0
    assert cell[(2, 0, "free")] == 1.0
    assert (m.groupby(["step_bin", "unit_bin"])["fraction"].sum() == 1.0).all()


def test_state_matrix_bins_units_and_steps():
    m = state_matrix(scenario_fork(), max_units=2, max_steps=1)
    assert set(m["unit_bin"]) == {0, 4} and set(m["unit_end"]) == {4, 8}
    assert set(m["step_bin"]) == {0} and set(m["step_end"]) == {2}
    # Blocks 0-3 over steps 0, 1, 2: active 3/4 at step 0, shared 2/4 at step 1, all free at step 2.
    cell = m.set_index(["unit_bin", "state"])["fraction"]
    assert cell[(0, "active")] == pytest.approx(3 / 4 / 3)
    assert cell[(0, "shared")] == pytest.approx(2 / 4 / 3)
    assert cell[(4, "free")] == pytest.approx(1.0)
    assert m.groupby(["step_bin", "unit_bin"])["fraction"].sum().to_numpy() == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("kind", ["paged", "static", "vmm"])
def test_state_matrix_caps_cells(kind):
    trace = record(kind, make_requests(20, seed=6), kv_memory=48 * 1024)
    steps = len(memory_timeline(trace))
    m = state_matrix(trace, max_units=5, max_steps=7)
    assert m.groupby(["step_bin", "unit_bin"]).ngroups <= 5 * 7
    assert m["step_bin"].nunique() == min(7, steps)
    sums = m.groupby(["step_bin", "unit_bin"])["fraction"].sum().to_numpy()
    assert np.allclose(sums, 1.0)
    assert set(m["state"].astype(str)) <= set(unit_states(trace))


def test_bad_arguments_are_one_line_value_errors():
    trace = scenario_fork()
    with pytest.raises(ValueError, match="step must be an integer"):
        block_states(trace, "3")
    with pytest.raises(ValueError, match="max_units must be a positive integer"):
        state_matrix(trace, max_units=0)
    with pytest.raises(ValueError, match="max_steps"):
        state_matrix(trace, max_steps=2.5)
