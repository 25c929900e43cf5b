"""memory.memory_timeline / waste_breakdown: the books per step, the derived fractions, and their identities."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_analysis_tracegen import BLOCK, BPT, CAP, PAGED4, Script, make_requests, record, scenario_fork

from kvscope.alloc.base import Usage
from kvscope.analysis.memory import (
    FIELDS,
    TIMELINE_COLUMNS,
    memory_at,
    memory_timeline,
    peak_step,
    step_range,
    waste_breakdown,
)
from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.trace import trace_from_recorder

CONTRACT = [
    "step",
    "t_s",
    "capacity",
    "reserved",
    "used",
    "logical",
    "internal",
    "reservation",
    "mapped_idle",
    "cached_idle",
    "free",
    "waste",
    "waste_frac",
    "block_usage_frac",
    "token_usage_frac",
]


def test_fork_scenario_timeline():
    tl = memory_timeline(scenario_fork())
    assert [c for c in CONTRACT if c not in tl.columns] == []
    assert tl["step"].tolist() == [0, 1, 2]
    assert tl["reserved"].tolist() == [3 * BLOCK, 2 * BLOCK, 0]
    assert tl["used"].tolist() == [8 * BPT, 6 * BPT, 0]
    assert tl["waste"].tolist() == [4 * BPT, 2 * BPT, 0]
    assert tl["waste_frac"].tolist() == pytest.approx([4 / 12, 2 / 8, 0.0])
    assert tl["block_usage_frac"].tolist() == pytest.approx([3 / 8, 2 / 8, 0.0])
    assert tl["token_usage_frac"].tolist() == pytest.approx([8 / 32, 6 / 32, 0.0])
    assert tl["sharing_saved"].tolist() == [0, 6 * BPT, 0]
    assert tl["t_s"].tolist() == pytest.approx([0.001, 0.002, 0.003])  # the simulated clock at each step's end
    assert (tl["capacity"] == CAP).all()
    assert tl["nvml_bytes"].isna().all()


@pytest.mark.parametrize("kind", ["paged", "static", "vmm"])
def test_identities_hold_on_real_runs(kind):
    trace = record(kind, make_requests(15, seed=2, n_max=2), kv_memory=32 * 1024)
    tl = memory_timeline(trace)
    assert len(tl) == trace._stats.steps and tl["step"].is_monotonic_increasing
    for row in tl[FIELDS].to_dict("records"):
        Usage(**{k: int(v) for k, v in row.items()}).check()
    assert (tl["waste"] == tl["internal"] + tl["reservation"] + tl["mapped_idle"]).all()
    assert tl["t_s"].is_monotonic_increasing
    wb = waste_breakdown(trace)
    per_step = wb.groupby("step")["bytes"].sum()
    assert (per_step.to_numpy() == tl.set_index("step").loc[per_step.index, "capacity"].to_numpy()).all()
    assert list(wb["category"].cat.categories) == [
        "used",
        "internal",
        "reservation",
        "mapped_idle",
        "cached_idle",
        "free",
    ]


def test_missing_samples_carry_forward_and_device_samples_align():
    s = Script("paged", PAGED4, simulated=False)
    s.at(0).emit(Kind.MEM_NVML, bytes=1000).emit(Kind.MEM_TORCH, bytes=700)
    s.step_end(capacity=CAP, reserved=BLOCK, used=2 * BPT, logical=2 * BPT, internal=BLOCK - 2 * BPT, free=CAP - BLOCK)
    s.at(1).emit(Kind.MEM_NVML, bytes=2000)
    # Step 1 records only two of the nine samples (say, a cut-off write): the others carry forward.
    s.emit(Kind.ACCT_RESERVED, bytes=2 * BLOCK).emit(Kind.ACCT_USED, bytes=5 * BPT)
    s.at(2).emit(Kind.STEP, n=0)
    tl = memory_timeline(s.trace())
    assert tl["step"].tolist() == [0, 1]
    assert tl["reserved"].tolist() == [BLOCK, 2 * BLOCK]
    assert tl["used"].tolist() == [2 * BPT, 5 * BPT]
    assert tl["capacity"].tolist() == [CAP, CAP]
    assert tl["internal"].tolist() == [BLOCK - 2 * BPT] * 2
    assert tl["nvml_bytes"].tolist() == [1000, 2000]
    assert tl["torch_bytes"].tolist() == [700, 700]
    # Host clock: t_s is the time of the step's last book sample, in seconds.
    ev = s.trace().events
    assert tl["t_s"].iloc[1] > tl["t_s"].iloc[0] > 0
    assert tl["t_s"].iloc[0] <= ev["t_ns"].max() / 1e9


def test_empty_trace_has_the_columns():
    tl = memory_timeline(trace_from_recorder(Recorder(None, {"allocator": "vmm"})))
    assert tl.empty and list(tl.columns) == TIMELINE_COLUMNS
    assert waste_breakdown(trace_from_recorder(Recorder(None))).empty


def test_returned_frames_are_copies():
    trace = scenario_fork()
    tl = memory_timeline(trace)
    tl.loc[:, "reserved"] = -1
    tl["extra"] = 1
    again = memory_timeline(trace)
    assert (again["reserved"] >= 0).all() and "extra" not in again.columns
    assert isinstance(again, pd.DataFrame) and np.issubdtype(again["reserved"].dtype, np.integer)


def test_snapshot_steps_and_rows_come_from_the_timeline():
    trace = scenario_fork()  # reserved 3, 2, 0 blocks; used 8, 6, 0 tokens; sharing saves 6 tokens at step 1
    assert step_range(trace) == (0, 2)
    assert peak_step(trace, "reserved") == 0
    assert peak_step(trace) == 0  # reserved is the default
    assert peak_step(trace, "used") == 0
    assert peak_step(trace, "sharing_saved") == 1
    assert peak_step(trace, "mapped_idle") is None  # never above zero: no snapshot worth taking
    assert peak_step(trace, "no_such_column") is None
    row = memory_at(trace, 1)
    assert row is not None and row["reserved"] == 2 * BLOCK and row["sharing_saved"] == 6 * BPT
    assert memory_at(trace, 99) is None


def test_snapshot_helpers_on_a_trace_without_samples():
    empty = trace_from_recorder(Recorder(None, {"allocator": "paged"}))
    assert step_range(empty) == (0, 0)
    assert peak_step(empty, "used") is None
    assert memory_at(empty, 0) is None


def _pivot_books(trace) -> pd.DataFrame:
    """memory_timeline's per-step books and peaks as first written, with pandas pivot tables (the reference)."""
    from kvscope.analysis._events import select
    from kvscope.events import ACCT_FIELDS, PEAK_FIELDS

    acct = select(trace, *ACCT_FIELDS, columns=["step", "bytes"])
    acct = acct[acct["step"] >= 0]
    acct["field"] = acct["code"].map({int(k): v for k, v in ACCT_FIELDS.items()})
    wide = acct.pivot_table(index="step", columns="field", values="bytes", aggfunc="last")
    frame = wide.reindex(columns=FIELDS).ffill().fillna(0).astype("int64").reset_index()
    frame.columns.name = None
    frame["step"] = frame["step"].astype("int64")
    samples = select(trace, *PEAK_FIELDS, columns=["step", "bytes"])
    samples = samples[samples["step"] >= 0]
    peaks = pd.DataFrame(index=frame["step"])
    if not samples.empty:
        samples = samples.assign(field=samples["code"].map({int(k): v for k, v in PEAK_FIELDS.items()}))
        peaks = samples.pivot_table(index="step", columns="field", values="bytes", aggfunc="max")
        peaks = peaks.reindex(frame["step"])
    live = frame["used"] > 0
    for name in PEAK_FIELDS.values():
        end = frame[name] if name in frame else frame["reserved"] - frame["used"]
        if name in ("waste", "internal", "reservation", "mapped_idle"):
            end = end.where(live, 0)
        got = peaks[name].to_numpy(np.float64) if name in peaks.columns else np.full(len(frame), np.nan)
        end = end.to_numpy(np.int64)
        frame[f"peak_{name}"] = np.where(np.isnan(got), end, np.maximum(np.nan_to_num(got), end)).astype(np.int64)
    return frame


def _ragged_books_trace():
    """Books with holes: a field never sampled in a step, a field sampled twice in one step (the last counts),
    samples of no step, peaks twice in a step, a peak in a step without books, huge byte counts."""
    s = Script("paged", {"block_size": BLOCK})
    s.at(-1).emit(Kind.ACCT_USED, bytes=7).emit(Kind.ACCT_PEAK_USED, bytes=99)
    s.at(0).step_end(capacity=CAP, reserved=64, used=32, logical=32, free=CAP - 64)
    s.at(1).emit(Kind.ACCT_USED, bytes=48).emit(Kind.ACCT_USED, bytes=40).emit(Kind.ACCT_RESERVED, bytes=2**62)
    s.emit(Kind.ACCT_PEAK_USED, bytes=50).emit(Kind.ACCT_PEAK_USED, bytes=70).emit(Kind.ACCT_PEAK_WASTE, bytes=3)
    s.at(3).emit(Kind.ACCT_PEAK_RESERVED, bytes=5)  # a peak alone: no books in step 3
    s.at(2).step_end(capacity=CAP, reserved=16, used=0, free=CAP - 16).emit(Kind.ACCT_PEAK_LOGICAL, bytes=2**61)
    s.at(5).emit(Kind.ACCT_FREE, bytes=1)
    return s.trace()


def _recorded():
    return record("paged", make_requests(9, seed=3))


@pytest.mark.parametrize("build", [_ragged_books_trace, scenario_fork, _recorded])
def test_the_books_and_peaks_equal_the_pivot_tables_of_the_samples(build):
    trace = build()
    expected = _pivot_books(trace)
    got = memory_timeline(trace)[expected.columns.tolist()]
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True))
