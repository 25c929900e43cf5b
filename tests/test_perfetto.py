"""Perfetto / Chrome trace-event export: valid JSON, matched async slices, monotone counters, names, caps, CLI."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from test_analysis_tracegen import CAP, PAGED4, Script, make_requests, record, scenario_prefix, write_trace_file

from kvscope import cli
from kvscope.analysis.driver import driver_calls
from kvscope.analysis.memory import memory_timeline
from kvscope.analysis.requests import request_lifetimes, request_occupancy, request_phases
from kvscope.analysis.summary import summarize
from kvscope.events import Kind
from kvscope.export_perfetto import export_perfetto, trace_events
from kvscope.trace import Trace, load_trace
from kvscope.viz import request_lifetimes_figure
from kvscope.viz.palette import state_label
from kvscope.viz.requests import SWAPPED_LABEL

PHASES = {"M", "C", "X", "i", "b", "e"}


def check_structure(events: list[dict]) -> dict[str, list[dict]]:
    """Assert the trace-event invariants every viewer relies on; return the counter events by name."""
    open_slices: dict[tuple, list[float]] = defaultdict(list)
    counters: dict[str, list[dict]] = defaultdict(list)
    for ev in events:
        assert ev["ph"] in PHASES, ev
        assert isinstance(ev["name"], str) and ev["name"]
        assert isinstance(ev["pid"], int)
        if ev["ph"] == "M":
            continue
        assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0
        if ev["ph"] == "C":
            counters[ev["name"]].append(ev)
            assert ev["args"] and all(isinstance(v, (int, float)) for v in ev["args"].values())
        elif ev["ph"] == "X":
            assert ev["dur"] >= 0
        elif ev["ph"] == "b":
            open_slices[(ev["cat"], ev["id"], ev["name"])].append(ev["ts"])
        elif ev["ph"] == "e":
            starts = open_slices[(ev["cat"], ev["id"], ev["name"])]
            assert starts, f"'e' without 'b': {ev}"
            assert ev["ts"] >= starts.pop()
    assert all(not v for v in open_slices.values()), "every 'b' needs its 'e'"
    for name, evs in counters.items():
        ts = [e["ts"] for e in evs]
        assert ts == sorted(ts), f"counter {name} goes back in time"
    return counters


@pytest.fixture(scope="module")
def paged_trace():
    return record(
        "paged", make_requests(25, seed=7, n_max=2, shared_prefix=16), prefix_caching=True, kv_memory=16 * 1024
    )


def test_paged_export_structure(paged_trace, tmp_path):
    out = tmp_path / "paged.json"
    result = export_perfetto(paged_trace, out)
    doc = json.loads(out.read_text())
    events = doc["traceEvents"]
    assert result["events"] == len(events)
    assert doc["otherData"]["allocator"] == "paged" and all(isinstance(v, str) for v in doc["otherData"].values())
    counters = check_structure(events)
    assert {"KV memory", "KV totals", "throughput", "batch", "requests"} <= set(counters)

    tl = memory_timeline(paged_trace)
    mem = counters["KV memory"]
    assert len(mem) == len(tl)
    for ev, cap in zip(mem, tl["capacity"], strict=True):
        assert sum(ev["args"].values()) == cap  # the bands stack up to the capacity
    assert max(e["args"]["reserved"] for e in counters["KV totals"]) == summarize(paged_trace)["peak_reserved_bytes"]

    names = {(e["name"], e["args"].get("name")) for e in events if e["ph"] == "M"}
    pool = "paged b16: KV pool 16 KiB (2 blocks of 16 tokens) and engine"  # tiny model: 8 KiB per block
    assert ("process_name", pool) in names
    assert ("process_name", "paged b16: requests") in names
    assert ("thread_name", "engine steps") in names

    begins = [e for e in events if e["ph"] == "b"]
    assert len(begins) == len(paged_trace.events.query("kind == 'arrive' or kind == 'fork'")["seq"].unique())
    assert {e["args"]["status"] for e in begins} <= {"finished", "rejected", "unfinished"}
    steps = [e for e in events if e["ph"] == "X" and e["cat"] == "step"]
    assert len(steps) == summarize(paged_trace)["steps"]
    preempts = [e for e in events if e["ph"] == "i" and e["name"] == "preempt"]
    assert len(preempts) == summarize(paged_trace)["preemptions"]
    evicts = [e for e in events if e["ph"] == "i" and e["name"] == "evict"]
    assert len(evicts) == summarize(paged_trace)["evictions"]


def test_vmm_export_has_driver_slices():
    trace = record("vmm", make_requests(10, seed=2), kv_memory=32 * 1024)
    events = trace_events(trace)
    check_structure(events)
    driver = [e for e in events if e["ph"] == "X" and e["cat"] == "driver"]
    assert len(driver) == len(driver_calls(trace)) > 0
    assert {e["name"] for e in driver} <= {
        "vmm_reserve",
        "page_create",
        "page_map",
        "page_access",
        "page_unmap",
        "page_release",
    }


def test_caps_sample_and_aggregate(paged_trace):
    steps = len(memory_timeline(paged_trace))
    events = trace_events(paged_trace, max_counter_points=10, max_step_slices=5, max_requests=3, max_instants=4)
    counters = check_structure(events)
    assert 10 <= len(counters["KV memory"]) <= 11 < steps
    peak = summarize(paged_trace)["peak_reserved_bytes"]
    assert max(e["args"]["reserved"] for e in counters["KV totals"]) == peak  # the peak step is always kept
    assert not [e for e in events if e["ph"] == "X" and e["cat"] == "step"]
    assert len([e for e in events if e["ph"] == "b"]) == 3
    assert "prefix-cache evictions" in counters
    assert len([e for e in events if e["ph"] == "i"]) <= 4


def test_sim_clock_option():
    trace = scenario_prefix()
    events = trace_events(trace, clock="sim")
    counters = check_structure(events)
    assert [e["ts"] for e in counters["KV memory"]] == pytest.approx([1000.0, 2000.0, 3000.0, 4000.0])
    host = load_like_host(trace)
    with pytest.raises(ValueError, match="no simulated clock"):
        trace_events(host, clock="sim")
    with pytest.raises(ValueError, match="clock must be"):
        trace_events(trace, clock="gpu")


def load_like_host(trace):
    events = trace.events.copy()
    events.loc[events["kind"] == "step", "aux"] = -1
    return Trace(meta=trace.meta, events=events)


def test_cut_off_trace_closes_every_slice(paged_trace, tmp_path):
    full = tmp_path / "full.kvtrace"
    write_trace_file(paged_trace, full, flush_events=64)
    data = full.read_bytes()
    cut = tmp_path / "cut.kvtrace"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning):
        trace = load_trace(cut)
    events = trace_events(trace)
    check_structure(events)
    unfinished = [e for e in events if e["ph"] == "b" and e["args"]["status"] == "unfinished"]
    assert unfinished


@pytest.fixture
def only_our_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"summary": cli.COMMANDS["summary"], "export": cli.COMMANDS["export"]})


def test_cli_export(paged_trace, tmp_path, capsys, only_our_commands):
    src = tmp_path / "run.kvtrace"
    write_trace_file(paged_trace, src, flush_events=1 << 16)
    out = tmp_path / "out" / "trace.json"
    assert cli.main(["export", str(src), "--format", "perfetto", "-o", str(out)]) == 0
    assert "ui.perfetto.dev" in capsys.readouterr().out
    check_structure(json.loads(out.read_text())["traceEvents"])

    assert cli.main(["export", str(src)]) == 0  # default name next to the trace
    assert (tmp_path / "run.perfetto.json").exists()

    assert cli.main(["export", str(src), "-o", str(src)]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err, err

    assert cli.main(["export", str(tmp_path / "missing.kvtrace")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.kvtrace" in err[0], err


def test_slices_never_start_before_zero():
    # A step whose recorded duration exceeds the time since the recorder started (say a trace re-stamped by a copy).
    s = Script("paged", PAGED4, simulated=False)
    s.at(0).emit(Kind.STEP, n=1, dur_ns=10**12, aux=-1)
    for kind in (Kind.ACCT_CAPACITY, Kind.ACCT_FREE):
        s.emit(kind, bytes=CAP)
    events = trace_events(s.trace())
    check_structure(events)
    step = [e for e in events if e["ph"] == "X"]
    assert len(step) == 1 and step[0]["ts"] == 0.0


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_perfetto_and_the_lifetimes_figure_show_the_same_waiting_and_running(preemption):
    """One definition of waiting / running (kvscope.analysis.requests): the export's "requests" counter, the Gantt's
    bars and the aggregated heat map all count the same sequences in every step."""
    swap = {"swap_space": 64 * 1024} if preemption == "swap" else {}
    trace = record("paged", make_requests(25, seed=7, n_max=2), kv_memory=16 * 1024, preemption=preemption, **swap)
    occ = request_occupancy(trace)
    assert occ["waiting"].max() > 0 and summarize(trace)["preemptions"] > 0
    counters = check_structure(trace_events(trace))["requests"]
    assert len(counters) == len(occ)
    for name in ("waiting", "running"):
        assert [e["args"][name] for e in counters] == occ[name].tolist(), name
    if preemption == "swap":
        assert [e["args"]["swapped"] for e in counters] == occ["swapped"].tolist() and occ["swapped"].max() > 0

    lt, phases = request_lifetimes(trace), request_phases(trace)
    steps = occ["step"].to_numpy()
    fig = request_lifetimes_figure(lt, phases, max_requests=len(lt))
    names = {
        "waiting": [state_label("waiting")],
        "running": [state_label("running"), "running, preempted at least once", state_label("unfinished")],
        "swapped": [SWAPPED_LABEL],
    }
    for phase, labels in names.items():
        covered = np.zeros(len(steps), int)
        for bars in (t for t in fig.data if t.name in labels):
            base, width = np.asarray(bars.base, float), np.asarray(bars.x, float)
            covered += ((base[:, None] <= steps) & (steps < (base + width)[:, None])).sum(axis=0)
        assert covered.tolist() == occ[phase].tolist(), phase

    heat = request_lifetimes_figure(lt, phases, max_requests=5).data[0]
    assert heat.type == "heatmap" and np.isin(np.asarray(heat.x), steps).all() and len(heat.x) > 100
    sizes = np.diff(np.r_[np.asarray(heat.y), len(lt)])
    running = (np.asarray(heat.z, float) * sizes[:, None]).sum(axis=0)
    assert np.allclose(running, occ.set_index("step")["running"].reindex(heat.x).to_numpy())
