"""request_phases / request_occupancy / request_timestamps, step_durations and incidents: the one definition of
waiting / running / swapped on hand-written traces, and cross-checks against the engine's own batch on real runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_analysis_tracegen import PAGED4, Script, make_requests, record, scenario_prefix

from kvscope import analysis
from kvscope.analysis.pressure import INCIDENT_COLUMNS, incidents
from kvscope.analysis.requests import (
    OCCUPANCY_COLUMNS,
    PHASE_COLUMNS,
    TIMESTAMP_COLUMNS,
    lifetime_phases,
    request_lifetimes,
    request_occupancy,
    request_phases,
    request_timestamps,
)
from kvscope.analysis.steps import STEP_COLUMNS, run_clock, run_end_s, step_durations
from kvscope.analysis.throughput import throughput_timeline
from kvscope.events import Kind


def phases_of(trace) -> dict[int, list[tuple[str, int, int]]]:
    out: dict[int, list[tuple[str, int, int]]] = {}
    for row in request_phases(trace).itertuples(index=False):
        out.setdefault(row.seq, []).append((str(row.phase), row.start_step, row.end_step))
    return out


def occupancy_of(trace) -> list[tuple[int, int, int]]:
    occ = request_occupancy(trace)
    return list(zip(occ["waiting"], occ["running"], occ["swapped"], strict=True))


def test_recompute_preemption_waits_again_and_a_finish_step_counts_as_running():
    trace = scenario_prefix()  # seq 1: admitted step 1, preempted (recompute) step 2, back and finished step 3
    assert phases_of(trace) == {
        0: [("running", 0, 4)],
        1: [("running", 1, 2), ("waiting", 2, 3), ("running", 3, 4)],
    }
    occ = request_occupancy(trace)
    assert list(occ.columns) == OCCUPANCY_COLUMNS and occ["step"].tolist() == [0, 1, 2, 3]
    assert occupancy_of(trace) == [(0, 1, 0), (0, 2, 0), (1, 1, 0), (0, 2, 0)]
    assert occ["t_s"].tolist() == pytest.approx([0.001, 0.002, 0.003, 0.004])
    assert list(request_phases(trace).columns) == PHASE_COLUMNS and not request_phases(trace)["open"].any()


def lifecycle_script() -> Script:
    """seq 0 runs, is swapped out in step 1 and back in step 3, finishes in step 4; seq 1 is rejected on arrival;
    seq 2 waits from step 0 and is rejected in step 2; seq 3 (forked from 0 without memory in step 0) waits until
    step 2; seq 4 (forked with memory in step 0) runs and is still running when the trace ends."""
    s = Script("paged", PAGED4, requests=[(4, 6), (99, 2), (4, 9)])
    s.at(0).emit(Kind.ARRIVE, seq=0, n=4, aux=6).emit(Kind.ARRIVE, seq=1, n=99, aux=2).emit(Kind.REJECT, seq=1, n=100)
    s.emit(Kind.ARRIVE, seq=2, n=4, aux=9).emit(Kind.ADMIT, seq=0, n=4, aux=0).emit(Kind.APPEND, seq=0, n=4, aux=4)
    s.emit(Kind.FORK, seq=3, n=0, aux=0).emit(Kind.FORK, seq=4, n=4, aux=0).step_end(batch=1, prefill=4)
    s.at(1).emit(Kind.PREEMPT, seq=0, n=4, aux=1).emit(Kind.SWAP_OUT, seq=0, n=1, bytes=10).step_end(batch=1)
    s.at(2).emit(Kind.REJECT, seq=2, n=12).emit(Kind.ADMIT, seq=3, n=5, aux=0).step_end(batch=2)
    s.at(3).emit(Kind.SWAP_IN, seq=0, n=1, bytes=10).step_end(batch=3)
    s.at(4).emit(Kind.APPEND, seq=0, n=1, aux=9).emit(Kind.FINISH, seq=0, n=9).step_end(batch=3)
    s.at(5).step_end(batch=2)
    return s


def test_swaps_rejections_and_forks():
    trace = lifecycle_script().trace()
    assert phases_of(trace) == {
        0: [("running", 0, 1), ("swapped", 1, 3), ("running", 3, 5)],
        2: [("waiting", 0, 2)],  # rejected while waiting: it waited until its rejection
        3: [("waiting", 0, 2), ("running", 2, 6)],  # a fork without memory waits for its admission
        4: [("running", 0, 6)],  # a fork with memory runs from its fork step
    }  # seq 1, rejected on arrival, never waited
    phases = request_phases(trace).set_index(["seq", "start_step"])
    assert phases["open"].to_dict() == {(0, 0): False, (0, 1): False, (0, 3): False, (2, 0): False, (3, 0): False,
                                        (3, 2): True, (4, 0): True}  # fmt: skip
    assert occupancy_of(trace) == [(2, 2, 0), (2, 1, 1), (0, 2, 1), (0, 3, 0), (0, 3, 0), (0, 2, 0)]
    lt = request_lifetimes(trace).set_index("seq")
    assert lt["reject_step"].tolist() == [-1, 0, 2, -1, -1]


def test_events_outside_steps_count_with_the_step_before():
    s = lifecycle_script()
    s.at(-1).emit(Kind.FINISH, seq=4, n=6)  # after step 5
    trace = s.trace()
    assert phases_of(trace)[4] == [("running", 0, 6)]  # it finished "in" step 5: it ran through step 5
    assert not request_phases(trace).set_index("seq").loc[4, "open"]


def test_timestamps_on_both_clocks():
    trace = lifecycle_script().trace()
    sim = request_timestamps(trace).set_index("seq")
    assert list(request_timestamps(trace).columns) == TIMESTAMP_COLUMNS and set(sim["clock"]) == {"sim"}
    ms = 1e-3
    assert sim.loc[0, ["arrive_s", "admit_s", "first_token_s", "end_s"]].tolist() == pytest.approx(
        [1 * ms, 1 * ms, 1 * ms, 5 * ms]
    )
    assert sim.loc[3, "arrive_s"] == pytest.approx(ms) and sim.loc[3, "admit_s"] == pytest.approx(3 * ms)
    assert sim.loc[4, "admit_s"] == pytest.approx(ms) and np.isnan(sim.loc[4, "end_s"])
    assert sim.loc[2, "end_s"] == pytest.approx(3 * ms) and np.isnan(sim.loc[2, "admit_s"])  # its REJECT
    host = request_timestamps(trace, "host").set_index("seq")
    t_ns = trace.events["t_ns"]
    first = {k: t_ns[(trace.events["kind"] == k) & (trace.events["seq"] == 3)].iloc[0] / 1e9 for k in ("fork", "admit")}
    assert host.loc[3, "arrive_s"] == pytest.approx(first["fork"]) and host.loc[3, "admit_s"] == first["admit"]
    assert set(host["clock"]) == {"host"}


def test_step_durations_and_clocks():
    trace = lifecycle_script().trace()
    assert run_clock(trace) == "sim"
    sim = step_durations(trace)
    assert list(sim.columns) == STEP_COLUMNS and sim["step"].tolist() == [0, 1, 2, 3, 4, 5]
    assert sim["end_s"].tolist() == pytest.approx([0.001 * (i + 1) for i in range(6)])
    assert sim["start_s"].tolist() == pytest.approx([0.001 * i for i in range(6)])
    assert run_end_s(trace) == pytest.approx(0.006)
    host = step_durations(trace, "host")
    assert (host["dur_s"] == 1e-6).all() and (host["start_s"] <= host["end_s"]).all()
    assert (host["start_s"].to_numpy()[1:] >= host["end_s"].to_numpy()[:-1]).all()
    assert run_end_s(trace, "host") == trace.events["t_ns"].max() / 1e9
    with pytest.raises(ValueError, match="clock must be"):
        step_durations(trace, "gpu")


def test_incidents_name_every_kind():
    trace = lifecycle_script().trace()
    inc = incidents(trace)
    assert list(inc.columns) == INCIDENT_COLUMNS
    assert inc["kind"].astype(str).tolist() == ["reject", "preempt", "swap_out", "reject", "swap_in"]
    pre = inc[inc["kind"] == "preempt"].iloc[0]
    assert (pre["seq"], pre["tokens"], pre["mode"]) == (0, 4, "swap")
    swap = inc[inc["kind"] == "swap_out"].iloc[0]
    assert (swap["blocks"], swap["bytes"], swap["block"]) == (1, 10, -1)


@pytest.mark.parametrize(
    "kind, cfg",
    [
        ("paged", {"kv_memory": 16 * 1024, "prefix_caching": True}),
        ("paged", {"kv_memory": 16 * 1024, "swap_space": 64 * 1024, "preemption": "swap"}),
        ("vmm", {"kv_memory": 32 * 1024}),
        ("static", {"kv_memory": 48 * 1024}),
    ],
)
def test_running_is_the_batch_plus_the_samples_forked_in_the_step(kind, cfg):
    """The scheduler's running queue is its batch, plus the samples forked at the end of the step (their first token
    came from it); the engine's own STEP n counts the batch alone."""
    trace = record(kind, make_requests(25, seed=7, n_max=2), **cfg)
    occ = request_occupancy(trace).set_index("step")
    thr = throughput_timeline(trace).set_index("step")
    ev = trace.events
    forked = ev[(ev["kind"] == "fork") & (ev["n"] > 0)].groupby("step").size()
    expected = thr["batch"] + forked.reindex(thr.index).fillna(0).astype(int)
    running = occ["running"].reindex(thr.index)
    if "swap_space" in cfg:  # a sequence swapped back in without budget for a token left is running, not batched
        assert (running >= expected).all() and (running == expected).mean() > 0.9
    else:
        assert (running == expected).all()
    # Every sequence is in at most one phase at a time, and the phases cover each lifetime without gaps.
    phases = request_phases(trace)
    for _, rows in phases.groupby("seq"):
        assert (rows["start_step"].to_numpy()[1:] == rows["end_step"].to_numpy()[:-1]).all()
    if "swap_space" in cfg:
        assert occ["swapped"].max() > 0


def test_lifetime_phases_match_when_nothing_was_preempted():
    trace = record("paged", make_requests(20, seed=1, n_max=2), kv_memory=1024 * 1024)
    lt = request_lifetimes(trace)
    assert lt["preemptions"].sum() == 0
    exact = request_phases(trace)
    approx = lifetime_phases(lt, int(request_occupancy(trace)["step"].max()))
    pd.testing.assert_frame_equal(exact, approx)


def test_the_package_exports_the_api():
    for name in ("request_occupancy", "request_timestamps", "request_phases", "step_durations", "incidents"):
        assert callable(getattr(analysis, name)) and name in analysis.__all__ and name in analysis.__doc__
