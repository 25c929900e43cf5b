"""Engine steps on a clock: when each step started and ended, and which clock a run has.

Clocks: "sim" is the simulated clock of a --device sim run (every STEP event carries it); "host" is host time since
the run started (t_ns). `clock=None` everywhere means the run's own clock: "sim" on simulated runs, "host" otherwise
(the clock of every `t_s` in kvscope.analysis). Asking a run without a simulated clock for "sim" is a ValueError.

step_durations(trace, clock=None) -> one row per step that recorded anything, ascending:
    step
    start_s   when the step started: its end minus its duration, never before the previous step's end (a trace
              re-stamped by a copy can skew host times) nor before 0
    end_s     when the step's state was recorded: host time of its last ACCT_* sample (of its last event when it
              has none); on the simulated clock, the clock at the end of the step
    dur_s     the step's recorded duration: STEP dur_ns on host time (0 without a STEP event); on the simulated
              clock the time the cost model gave it (an idle engine's jump to the next arrival excluded)
    clock     "sim" or "host"
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached, column, select, step_clock, step_cuts
from kvscope.events import Kind

STEP_COLUMNS = ["step", "start_s", "end_s", "dur_s", "clock"]
CLOCKS = ("host", "sim")


def run_clock(trace) -> str:
    """The run's own clock: "sim" when every STEP event carries the simulated clock, else "host"."""
    clock = step_clock(trace)
    return "sim" if len(clock) and clock["clock"].iloc[0] == "sim" else "host"


def resolve_clock(trace, clock: str | None) -> str:
    """`clock`, checked against the trace ("host", "sim", or None for the run's own)."""
    if clock is None:
        return run_clock(trace)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be 'host' or 'sim', got {clock!r}")
    if clock == "sim" and run_clock(trace) != "sim":
        raise ValueError(f"{trace.name!r} has no simulated clock (not a sim run); use clock='host'")
    return clock


def step_durations(trace, clock: str | None = None) -> pd.DataFrame:
    """Every recorded step's start, end and duration on a clock (see the module docstring)."""
    chosen = resolve_clock(trace, clock)
    return cached(trace, f"step_durations.{chosen}", lambda: _build(trace, chosen)).copy()


def run_end_s(trace, clock: str | None = None) -> float:
    """When the trace ends on a clock: its last event's host time, or the simulated clock at its last step's end."""
    chosen = resolve_clock(trace, clock)
    if chosen == "sim":
        steps = step_durations(trace, "sim")
        return float(steps["end_s"].max()) if len(steps) else 0.0
    t_ns = column(trace, "t_ns")
    return float(t_ns.max()) / 1e9 if len(t_ns) else 0.0


def _build(trace, clock: str) -> pd.DataFrame:
    steps, cut = step_cuts(trace)
    if clock == "sim":
        clk = step_clock(trace).set_index("step")
        end = clk["t_s"].reindex(steps).ffill().fillna(0.0).to_numpy(np.float64)
        dur = clk["dur_s"].reindex(steps).fillna(0.0).to_numpy(np.float64)
    else:
        t_ns = column(trace, "t_ns")
        end = t_ns[np.maximum(cut - 1, 0)] / 1e9 if len(cut) else np.zeros(0)
        st = select(trace, Kind.STEP).drop_duplicates("step", keep="last").set_index("step")
        dur = st["dur_ns"].reindex(steps).fillna(0).to_numpy(np.float64) / 1e9
    previous_end = np.r_[0.0, end[:-1]] if len(end) else end
    start = np.maximum(end - dur, np.maximum(previous_end, 0.0))
    start = np.minimum(start, end)
    return pd.DataFrame(
        {"step": steps.astype(np.int64), "start_s": start, "end_s": end, "dur_s": dur, "clock": clock},
        columns=STEP_COLUMNS,
    )
