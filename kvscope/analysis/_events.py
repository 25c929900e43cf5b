"""Shared, cached views of a trace's events for the analysis modules (not public API).

Everything here is derived once per Trace and kept in `trace._cache` under keys starting with "analysis.", so that
the many analyses a report or dashboard runs on one trace do not each re-scan a million-row DataFrame. The events
DataFrame is never modified.

Time: `t_s` everywhere in kvscope.analysis is the end of a step on the run's clock. A simulated run (every STEP
event carries the simulated clock in `aux`) uses the simulated clock, so that times and tokens/s mean what the
simulation models; other runs use host time (`t_ns`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from kvscope.events import Kind

T = TypeVar("T")

# VMM driver/OS calls, each timed by the allocator (dur_ns): what driver_calls and the throughput timeline add up.
DRIVER_KINDS: tuple[Kind, ...] = (
    Kind.VMM_RESERVE,
    Kind.PAGE_CREATE,
    Kind.PAGE_MAP,
    Kind.PAGE_ACCESS,
    Kind.PAGE_UNMAP,
    Kind.PAGE_RELEASE,
)


def cached(trace, key: str, build: Callable[[], T]) -> T:
    """trace._cache[key], built on first use. Keys are namespaced 'analysis.*' by the callers."""
    cache = trace._cache
    full_key = f"analysis.{key}"
    if full_key not in cache:
        cache[full_key] = build()
    return cache[full_key]


def kind_codes(trace) -> np.ndarray:
    """Kind value (int16) of every event row; -1 for a kind this kvscope does not know."""
    return trace.store.codes


def column(trace, name: str) -> np.ndarray:
    """A whole int column as a numpy array, one value per event row. The store holds events by kind, so this builds
    n_rows values: prefer `values(trace, name, *kinds)`, which reads only the rows of some kinds."""
    return cached(trace, f"col.{name}", lambda: trace.store.column(name))


def values(trace, name: str, *kinds: Kind, dtype=None) -> np.ndarray:
    """column(trace, name)[mask(trace, *kinds)], without building the whole column: the rows of these kinds, in
    row order (as `dtype`, default the column's own)."""
    return trace.store.values(name, [int(k) for k in kinds], dtype)


def rows(trace, *kinds: Kind) -> np.ndarray:
    """np.flatnonzero(mask(trace, *kinds)): the row positions of the events of these kinds."""
    return trace.store.rows([int(k) for k in kinds])


def codes(trace, *kinds: Kind) -> np.ndarray:
    """kind_codes(trace)[mask(trace, *kinds)]: the Kind value of each row of these kinds, in row order."""
    store = trace.store
    ks = [int(k) for k in kinds]
    return _codes_of(store, ks, store.count(ks))


def mask(trace, *kinds: Kind) -> np.ndarray:
    store = trace.store
    if len(kinds) == 1:
        return kind_codes(trace) == int(kinds[0])
    return store.member(store.positions([int(k) for k in kinds]))


_SELECT_COLUMNS = ["t_ns", "step", "seq", "block", "n", "bytes", "addr", "aux", "dur_ns"]


def select(trace, *kinds: Kind, columns: list[str] | None = None) -> pd.DataFrame:
    """Rows of the given kinds (a new DataFrame; original row order), with a `code` column holding the Kind value.
    With `columns`, only those (and `code`), read for this call and not cached: for a caller that reads a few
    columns of many rows once (memory_timeline's hundreds of thousands of samples)."""

    def build(names: list[str]) -> pd.DataFrame:
        ks = [int(k) for k in kinds]
        store = trace.store
        df = pd.DataFrame({c: store.values(c, ks) for c in names})
        df["code"] = _codes_of(store, ks, len(df))
        return df

    if columns is not None:
        return build([c for c in _SELECT_COLUMNS if c in columns])
    key = "select." + ",".join(str(int(k)) for k in sorted(set(kinds)))
    return cached(trace, key, lambda: build(_SELECT_COLUMNS)).copy()


def _codes_of(store, ks: list[int], n: int) -> np.ndarray:
    positions = store.positions(ks)
    if len(positions) <= 1:
        value = int(store.lookup[positions[0]]) if positions else -1
        return np.full(n, value, np.int16)
    return store.lookup[store.selection(positions)]


def count(trace, kind: Kind) -> int:
    return trace.count_of([int(kind)])  # (a trace with a digest answers before its events are read)


STEP_PIECE_ROWS = 1 << 21  # step_runs looks up the rows of a big kind this many index entries at a time


def running_step(trace) -> np.ndarray:
    """Per row, the step it belongs to for 'state at the end of step s' purposes: rows recorded outside a step
    (step -1) after the first step count with the step before them. (The `step` column's dtype: int32 as read.)
    One value per row: the analysis reads step_runs / step_of_rows instead, which hold one entry per step."""
    starts, values = step_runs(trace)
    return np.repeat(values, np.diff(np.r_[starts, len(trace.store)]))


def step_runs(trace) -> tuple[np.ndarray, np.ndarray]:
    """running_step as runs: (starts, values): the row where each run of one running step starts (ascending, the
    first at row 0) and that step (strictly increasing: the running step never decreases). From each kind's own
    rows (EventStore.running_max), so that no per-row array of the whole trace is held or scattered."""

    def build() -> tuple[np.ndarray, np.ndarray]:
        store = trace.store
        starts, values = store.running_max("step", STEP_PIECE_ROWS)
        return starts.astype(np.int64), values.astype(store.dtypes["step"])

    return cached(trace, "step_runs", build)


def step_of_rows(trace, rows: np.ndarray) -> np.ndarray:
    """running_step(trace)[rows], from the runs."""
    starts, values = step_runs(trace)
    return values[np.searchsorted(starts, np.asarray(rows, np.int64), side="right") - 1]


def _rows_before(trace, step: int) -> int:
    """How many rows have a running step <= step (np.searchsorted(running_step, step, side="right"))."""
    starts, values = step_runs(trace)
    i = int(np.searchsorted(values, step, side="right"))
    return int(starts[i]) if i < len(starts) else len(trace.store)


def _step_ends(trace) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, the last row of each, the first row of step 0 or later) for the runs of steps >= 0."""
    starts, values = step_runs(trace)
    i = int(np.searchsorted(values, 0, side="left"))
    if i >= len(starts):
        return values[:0], np.zeros(0, np.int64), len(trace.store)
    first = int(starts[i])
    last_pos = np.r_[starts[i + 1 :], len(trace.store)].astype(np.int64) - 1
    return values[i:], last_pos, first


def step_cuts(trace) -> tuple[np.ndarray, np.ndarray]:
    """(steps, cut): for every step that recorded anything, the row position where its state ends.

    The state at the end of step s is what the allocator's books describe: the ACCT_* samples the engine records
    last in every step. So the cut is just after the step's last ACCT row; a step without samples ends after its
    last row. Rows after the last step's samples (allocator teardown at the end of the run) belong to no step."""

    def build() -> tuple[np.ndarray, np.ndarray]:
        # the running step never decreases: the rows of no step are a prefix, and each step's rows are one run
        run_steps, last_pos, first = _step_ends(trace)
        if first >= len(trace.store):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        steps = run_steps.astype(np.int64)
        cut = last_pos + 1
        acct = rows(trace, *(k for k in Kind if int(Kind.ACCT_CAPACITY) <= int(k) <= int(Kind.ACCT_FREE)))
        acct = acct[acct >= first]
        if len(acct):
            acct_steps = step_of_rows(trace, acct)
            last_acct = np.r_[acct_steps[1:] != acct_steps[:-1], True]
            at = np.searchsorted(steps, acct_steps[last_acct])
            cut[at] = acct[last_acct] + 1
        return steps, cut.astype(np.int64)

    return cached(trace, "step_cuts", build)


def end_of_step(trace, step: int) -> int:
    """Row position just after the state of the end of `step` (events [0, pos) make that state). A step that
    recorded nothing ends where the step before it ended."""
    steps, cut = step_cuts(trace)
    i = int(np.searchsorted(steps, step, side="right")) - 1
    return int(cut[i]) if i >= 0 else _rows_before(trace, -1)


def recorded_steps(trace) -> np.ndarray:
    """Steps that recorded at least one event, ascending."""
    return step_cuts(trace)[0]


def step_clock(trace) -> pd.DataFrame:
    """One row per step that recorded anything: step, t_s (end of the step on the run's clock: simulated, or host
    time since the first event of step 0), dur_s (the step's
    duration: STEP dur_ns on host time, successive differences of the simulated clock on simulated runs),
    wall_s (host time at the end of the step), clock ('sim' or 'host')."""

    def build() -> pd.DataFrame:
        _, values = step_runs(trace)
        if not len(values) or values[-1] < 0:
            return pd.DataFrame(
                {"step": pd.Series([], dtype="int64"), "t_s": [], "dur_s": [], "wall_s": [], "clock": []}
            )
        steps, last_pos, first = _step_ends(trace)  # the running step never decreases: rows of no step first
        wall_s = trace.store.take("t_ns", last_pos) / 1e9
        frame = pd.DataFrame({"step": steps.astype(np.int64), "wall_s": wall_s})
        st = select(trace, Kind.STEP).drop_duplicates("step", keep="last")
        st = st[st["step"] >= 0]
        frame = frame.merge(
            st[["step", "dur_ns", "aux"]].astype({"step": "int64"}), on="step", how="left", validate="one_to_one"
        )
        simulated = len(st) > 0 and bool((st["aux"] >= 0).all())
        if simulated:
            # aux is the simulated clock at the end of the step. An idle engine jumps the clock to the next arrival
            # before a step, so a step starts at the later of the previous step's end and the earliest arrival
            # among the requests that arrived in it (arrivals in a step are never later than its start otherwise).
            end_ns = frame["aux"].astype("float64").ffill().fillna(0.0).to_numpy()
            start_ns = np.r_[0.0, end_ns[:-1]]
            first_arrival = _arrival_ns_by_step(trace)
            if first_arrival is not None:
                arr = first_arrival.reindex(frame["step"]).to_numpy(dtype=np.float64)
                start_ns = np.where(np.isnan(arr), start_ns, np.maximum(start_ns, np.minimum(arr, end_ns)))
            frame["t_s"] = end_ns / 1e9
            frame["dur_s"] = np.maximum(end_ns - start_ns, 0.0) / 1e9
            frame["clock"] = "sim"
        else:
            # The run's clock starts with its first step: what the recorder saw before it (building the allocator,
            # a GPU run's warm-up: copy ceiling, kernel compiles, graph capture) is not part of the run's time.
            origin = float(trace.store.take("t_ns", np.array([first]))[0]) / 1e9
            frame["t_s"] = frame["wall_s"] - origin
            dur = frame["dur_ns"].astype("float64") / 1e9
            frame["dur_s"] = dur.fillna(0.0)
            frame["clock"] = "host"
        return frame[["step", "t_s", "dur_s", "wall_s", "clock"]]

    return cached(trace, "step_clock", build).copy()


def _arrival_ns_by_step(trace) -> pd.Series | None:
    """Earliest workload arrival time (ns) of the requests that arrived in each step; None without arrival times."""
    meta = requests_meta(trace)
    if meta.empty or "arrival" not in meta.columns:
        return None
    arrive = select(trace, Kind.ARRIVE)
    arrival = pd.to_numeric(meta.set_index("seq")["arrival"], errors="coerce") * 1e9
    ns = arrival.reindex(arrive["seq"]).to_numpy(dtype=np.float64)
    return pd.Series(ns).groupby(arrive["step"].to_numpy()).min()


def requests_meta(trace) -> pd.DataFrame:
    """meta['requests'] as a DataFrame (seq, id, arrival, prompt_len, output_len, n); empty when absent or unusable."""

    def build() -> pd.DataFrame:
        req = trace.meta.get("requests") or {}
        cols = {k: v for k, v in req.items() if isinstance(v, list)} if isinstance(req, dict) else {}
        lengths = {len(v) for v in cols.values()}
        if "seq" not in cols or len(lengths) != 1:
            return pd.DataFrame({"seq": pd.Series([], dtype="int64")})
        df = pd.DataFrame(cols)
        df["seq"] = df["seq"].astype("int64")
        return df.drop_duplicates("seq", keep="first").reset_index(drop=True)

    return cached(trace, "requests_meta", build).copy()


def config_value(trace, name: str, default: Any = None) -> Any:
    cfg = trace.meta.get("allocator_config") or {}
    return cfg.get(name, default) if isinstance(cfg, dict) else default


def acct_last(trace, kind: Kind) -> int:
    """The last ACCT sample of a kind (0 when there is none)."""

    def build() -> int:
        samples = values(trace, "bytes", kind)
        return int(samples[-1]) if len(samples) else 0

    return cached(trace, f"acct_last.{int(kind)}", build)  # (a digest holds the capacity's: kvscope.digest)
