"""throughput_timeline, request_lifetimes, driver_calls / driver_stats and compare_runs."""

from __future__ import annotations

import numpy as np
import pytest
from test_analysis_tracegen import CAP, PAGED4, Script, make_requests, record, scenario_fork, scenario_prefix

from kvscope.analysis.compare import compare_runs
from kvscope.analysis.driver import driver_calls, driver_stats
from kvscope.analysis.requests import request_lifetimes
from kvscope.analysis.summary import summarize
from kvscope.analysis.throughput import throughput_timeline
from kvscope.events import Kind

THROUGHPUT_CONTRACT = [
    "step",
    "t_s",
    "dur_s",
    "batch",
    "prefill_tokens",
    "decode_tokens",
    "tokens_per_s",
    "kernel_ms",
    "kv_bytes_read",
    "achieved_tbps",
    "preemptions",
    "driver_ms",
]
LIFETIME_CONTRACT = [
    "seq",
    "request_id",
    "parent",
    "arrival_s",
    "arrive_step",
    "admit_step",
    "finish_step",
    "prompt_len",
    "output_len",
    "preemptions",
    "prefix_hit_tokens",
]


def test_throughput_on_the_fork_scenario():
    th = throughput_timeline(scenario_fork())
    assert [c for c in THROUGHPUT_CONTRACT if c not in th.columns] == []
    assert th["batch"].tolist() == [2, 2, 2]
    assert th["prefill_tokens"].tolist() == [8, 0, 0] and th["decode_tokens"].tolist() == [0, 2, 2]
    assert th["dur_s"].tolist() == pytest.approx([0.001] * 3)
    assert th["tokens_per_s"].tolist() == pytest.approx([8000.0, 2000.0, 2000.0])
    assert th["kernel_ms"].isna().all() and th["achieved_tbps"].isna().all()
    assert (th["preemptions"] == 0).all() and (th["driver_ms"] == 0).all()


def test_kernel_time_gives_achieved_bandwidth_and_host_clock_durations():
    s = Script("paged", PAGED4, simulated=False)
    s.at(0).emit(Kind.STEP_KERNEL, dur_ns=2_000_000, bytes=4_000_000_000).emit(Kind.PREEMPT, seq=3, n=5, aux=0)
    s.step_end(batch=3, decode=3, capacity=CAP, free=CAP)
    th = throughput_timeline(s.trace())
    assert th["kernel_ms"].tolist() == [2.0]
    assert th["kv_bytes_read"].tolist() == [4_000_000_000]
    assert th["achieved_tbps"].tolist() == pytest.approx([2.0])
    assert th["dur_s"].tolist() == pytest.approx([1e-6])  # STEP dur_ns on a measured (host) clock
    assert th["tokens_per_s"].tolist() == pytest.approx([3e6])
    assert th["preemptions"].tolist() == [1]


def test_sim_clock_steps_exclude_idle_jumps():
    # Requests arriving far apart: the engine idles and jumps its clock; step durations stay the modelled ones.
    requests = make_requests(4, seed=0, rate=2.0)
    trace = record("paged", requests)
    th = throughput_timeline(trace)
    gaps = np.diff(np.r_[0.0, th["t_s"].to_numpy()])
    assert gaps.max() > 0.05  # an idle jump happened
    assert th["dur_s"].max() < 0.05
    assert (th["dur_s"] <= gaps + 1e-12).all()
    assert summarize(trace)["run_time_s"] == pytest.approx(th["t_s"].iloc[-1])


def test_request_lifetimes_on_the_prefix_scenario():
    lt = request_lifetimes(scenario_prefix())
    assert [c for c in LIFETIME_CONTRACT if c not in lt.columns] == []
    lt = lt.set_index("seq")
    assert lt["request_id"].tolist() == ["q0", "q1"]
    assert lt["prompt_len"].tolist() == [9, 10] and lt["output_len"].tolist() == [4, 2]
    assert lt["arrive_step"].tolist() == [0, 1]
    assert lt["admit_step"].tolist() == [0, 1]
    assert lt["first_token_step"].tolist() == [0, 1]
    assert lt["finish_step"].tolist() == [3, 3]
    assert lt["status"].tolist() == ["finished", "finished"]
    assert lt["parent"].tolist() == [-1, -1]


def test_request_lifetimes_on_a_real_run():
    requests = make_requests(20, seed=12, n_max=3)
    trace = record("paged", requests, kv_memory=16 * 1024)
    lt = request_lifetimes(trace)
    roots = lt[lt["parent"] < 0]
    assert len(roots) == 20 and roots["request_id"].tolist() == [r.id for r in requests]
    assert roots["arrival_s"].tolist() == pytest.approx([r.arrival for r in requests])
    kids = lt[lt["parent"] >= 0]
    assert (kids["root"] == kids["parent"]).all() and (kids["admit_step"] >= 0).all()
    assert kids["request_id"].isin(roots["request_id"]).all()
    done = lt[lt["status"] == "finished"]
    assert (done["admit_step"] >= done["arrive_step"].where(done["parent"] < 0, 0)).all()
    assert (done["first_token_step"] >= done["admit_step"]).all()
    assert (done["finish_step"] >= done["first_token_step"]).all()
    assert (done["finish_s"] >= done["admit_s"]).all()
    assert int(lt["preemptions"].sum()) == summarize(trace)["preemptions"]
    assert set(lt["status"]) <= {"finished", "rejected", "running", "waiting"}


def test_driver_calls_on_a_vmm_run():
    trace = record("vmm", make_requests(12, seed=3), kv_memory=32 * 1024, eager_pages=1)
    calls = driver_calls(trace)
    kinds = {"vmm_reserve", "page_create", "page_map", "page_access", "page_unmap", "page_release"}
    ev = trace.events
    assert len(calls) == int(ev["kind"].isin(kinds).sum()) > 0
    assert set(calls["kind"].astype(str)) <= kinds
    assert (calls["dur_us"] >= 0).all()
    assert (calls.loc[calls["kind"] == "page_create", "step"] == -1).all()  # pages are created at setup
    stats = driver_stats(trace).set_index("kind")
    assert stats.loc["page_map", "count"] == int((ev["kind"] == "page_map").sum())
    assert stats.loc["page_map", "median_us"] <= stats.loc["page_map", "max_us"]
    th = throughput_timeline(trace)
    in_steps = calls[calls["step"] >= 0]
    assert th["driver_ms"].sum() == pytest.approx(in_steps["dur_us"].sum() / 1e3)
    assert int(th["driver_calls"].sum()) == len(in_steps)
    assert summarize(trace)["driver_calls"] == len(calls)


def test_driver_call_names_follow_the_backend():
    trace = record("vmm", make_requests(3, seed=3), kv_memory=32 * 1024)
    trace.meta["allocator_config"]["backend"] = "cuda"
    names = dict(zip(driver_calls(trace)["kind"].astype(str), driver_calls(trace)["call"], strict=True))
    assert names["page_map"] == "cuMemMap" and names["page_access"] == "cuMemSetAccess"
    assert driver_calls(scenario_fork()).empty and driver_stats(scenario_fork()).empty


def test_compare_runs():
    requests = make_requests(10, seed=1)
    runs = [record(k, requests, kv_memory=32 * 1024) for k in ("static", "paged", "vmm")]
    table = compare_runs(runs)
    assert table["label"].tolist() == [t.label for t in runs]
    for col in (
        "peak_reserved_bytes",
        "peak_used_bytes",
        "mean_waste_fraction",
        "tokens_per_s",
        "generated_tokens",
        "finished",
        "preemptions",
        "sharing_saved_bytes_peak",
        "prefix_hit_tokens",
        "steps",
    ):
        assert table[col].tolist() == [summarize(t)[col] for t in runs]
    assert (table["waste_bytes_saved_vs_worst"] >= 0).all() and table["waste_bytes_saved_vs_worst"].min() == 0
    assert "allocator_config" not in table.columns
    same = compare_runs([runs[1], runs[1]])
    assert same["label"].tolist() == ["paged b16", "paged b16 (2)"]
    named = compare_runs({"A": runs[0], "B": runs[2]})
    assert named["label"].tolist() == ["A", "B"]
    assert compare_runs([]).empty
