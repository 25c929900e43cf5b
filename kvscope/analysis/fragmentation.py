"""Fragmentation: the state of every block / page / arena segment at a step, and the whole run as a binned map.

States (per addressing family, e.g. the paged, vmm and static allocators; `unit_states(trace)` lists them in order):
    blocks  free, active (ref 1), shared (ref > 1), cached_idle (ref 0, hashed: in the prefix cache)
    pages   pool (unmapped), mapped_used (on a slot with a live request), mapped_idle (deferred reclamation)
    rows    free, used (rows holding tokens), reservation (rows for tokens not generated yet, up to the final
            length P + O - 1), internal (rows beyond the final length: never to be filled)

The state is rebuilt by replaying the allocator's events (kvscope.analysis.replay, chosen by the addressing the trace
declares): checkpoints make any step cheap to reach after the first pass, which is cached on the Trace. The map
(state_matrix, fill_matrix) of a block-addressed trace takes the vectorised replay (replay.sweep: the same states, in
numpy, at every sampled step in one pass) where the trace's events allow it; each map is cached on the Trace.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kvscope.analysis._events import end_of_step, recorded_steps
from kvscope.analysis.replay import STATE_COLUMNS, replay_class, timeline
from kvscope.analysis.replay.sweep import block_sweep

__all__ = [
    "FILL_COLUMNS",
    "MATRIX_COLUMNS",
    "STATE_COLUMNS",
    "block_states",
    "fill_matrix",
    "state_matrix",
    "unit_states",
]

MATRIX_COLUMNS = ["step_bin", "step_end", "unit_bin", "unit_end", "state", "fraction"]
# state_matrix samples at most this many unit-states in all (each sample converts the whole pool once).
SAMPLE_BUDGET = 4_000_000


def unit_states(trace) -> list[str]:
    """The states block_states / state_matrix use for this trace's allocator, in order (a ReplayError for a trace
    that cannot be replayed: kvscope.analysis.replay)."""
    return list(replay_class(trace).states)


def block_states(trace, step: int) -> pd.DataFrame:
    """One row per block (paged), page (vmm) or arena segment (static) at the end of `step`:

    unit (block id, page id, or first row of the segment), state (categorical, see the module docstring), fill
    (tokens held in it), capacity_tokens (tokens it can hold: block size, rows of the page in its buffer, segment
    length), ref_count (holders: sequences for paged blocks; 1 for a page in use or a reserved segment), seqs
    (comma-separated sequence ids holding it, '' if none), slot (VMM slot or the segment's reservation start;
    -1 otherwise). Extra columns: paged table_index, hashed, hash; vmm buffer, offset.

    A step before the first recorded one gives the state after setup; a step past the end gives the final state.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ValueError(f"block_states: step must be an integer, got {step!r}")
    seeded = trace._cache.get(AT_STEP_STATES, {}).get(int(step))  # from the trace's digest (kvscope.digest)
    if seeded is not None:
        return seeded.copy()
    sweep = block_sweep(trace)
    if sweep is not None:
        cut = end_of_step(trace, int(step))  # (steps that end at one row share a frame)
        return _memo(trace, ("block_states", cut), lambda: sweep.frame_at(cut))
    return timeline(trace).at_step(int(step), lambda replay: replay.frame())


def _check_bins(fn: str, max_units: int, max_steps: int) -> None:
    for name, value in (("max_units", max_units), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{fn}: {name} must be a positive integer, got {value!r}")


def _window(fn: str, window: tuple[int, int] | None, lo: int, hi: int, what: str) -> tuple[int, int]:
    """[a, b] (inclusive) of `window` clipped to [lo, hi]; the whole range when None; a ValueError when empty."""
    if window is None:
        return lo, hi
    a, b = (int(v) for v in window)
    a, b = max(a, lo), min(b, hi)
    if a > b:
        raise ValueError(f"{fn}: {what} {tuple(window)} holds nothing (the trace has {lo}..{hi})")
    return a, b


@dataclass(frozen=True)
class _Bins:
    step_chunks: list[np.ndarray]  # recorded steps of each step bin
    unit_edges: np.ndarray  # unit bin edges (absolute unit ids)
    unit_bin_of: np.ndarray  # per unit of the pool: its bin, -1 outside the window
    n_units: int


def _bins(fn: str, trace, n_units: int, max_units: int, max_steps: int, steps_window, units_window) -> _Bins | None:
    steps = recorded_steps(trace)
    steps = steps[steps >= 0]
    if not len(steps) or n_units == 0:
        return None
    s0, s1 = _window(fn, steps_window, int(steps[0]), int(steps[-1]), "steps")
    u0, u1 = _window(fn, units_window, 0, n_units - 1, "units")
    steps = steps[(steps >= s0) & (steps <= s1)]
    if not len(steps):
        raise ValueError(f"{fn}: no step recorded in steps {s0}..{s1}")
    width = u1 - u0 + 1
    edges = np.unique(np.linspace(u0, u1 + 1, min(max_units, width) + 1).round().astype(np.int64))
    bin_of = np.full(n_units, -1, np.int64)
    bin_of[u0 : u1 + 1] = np.repeat(np.arange(len(edges) - 1), np.diff(edges))
    return _Bins(np.array_split(steps, min(max_steps, len(steps))), edges, bin_of, n_units)


def state_matrix(
    trace,
    max_units: int = 256,
    max_steps: int = 200,
    *,
    steps: tuple[int, int] | None = None,
    units: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """The fragmentation map in long form: step_bin (first step of the bin), step_end (last step), unit_bin (first
    unit of the bin: block / page id or arena row), unit_end (one past the last), state, fraction (share of the
    bin's units in that state, averaged over the bin's sampled steps; rows with fraction 0 are left out, so the
    fractions of one cell add up to 1).

    At most max_units x max_steps cells: the units are cut into max_units equal ranges and the recorded steps into
    max_steps runs of consecutive steps. A bin's state is sampled at the end of up to a few of its steps (the last
    one always), as many as SAMPLE_BUDGET allows for the pool's size. `steps` and `units` (inclusive (first, last)
    pairs) zoom in: only that window is binned, so a zoomed map has finer cells."""
    _check_bins("state_matrix", max_units, max_steps)
    key = ("state_matrix", max_units, max_steps, _pair(steps), _pair(units))
    return _memo(trace, key, lambda: _state_matrix(trace, max_units, max_steps, steps, units))


def _state_matrix(trace, max_units: int, max_steps: int, steps, units) -> pd.DataFrame:
    states = unit_states(trace)
    bins = _bins("state_matrix", trace, _units(trace), max_units, max_steps, steps, units)
    if bins is None:
        return _empty(states)
    step_chunks, unit_edges, n_units = bins.step_chunks, bins.unit_edges, bins.n_units
    per_bin = int(max(1, min(SAMPLE_BUDGET // (n_units * len(step_chunks)), max(len(c) for c in step_chunks))))
    samples: list[int] = []  # sampled steps, ascending
    sample_bin: list[int] = []
    for b, chunk in enumerate(step_chunks):
        k = min(per_bin, len(chunk))
        picks = chunk[np.unique(np.linspace(len(chunk) - 1, 0, k).round().astype(int))]
        samples.extend(sorted(picks.tolist()))
        sample_bin.extend([b] * len(picks))

    n_ubins = len(unit_edges) - 1
    inside = bins.unit_bin_of >= 0
    unit_bin_of = bins.unit_bin_of[inside]
    n_states = len(states)
    counts = np.zeros((len(step_chunks), n_ubins, n_states), np.float64)

    def accumulate(codes: np.ndarray) -> np.ndarray:
        c = np.zeros(n_units, np.int64)
        m = min(len(codes), n_units)
        c[:m] = codes[:m]
        c = c[inside]
        return np.bincount(unit_bin_of * n_states + c, minlength=n_ubins * n_states).reshape(n_ubins, n_states)

    for b, codes in zip(sample_bin, _codes_at(trace, samples), strict=True):
        counts[b] += accumulate(codes)
    samples_per_bin = np.bincount(np.array(sample_bin), minlength=len(step_chunks)).astype(np.float64)
    sizes = np.diff(unit_edges).astype(np.float64)
    fraction = counts / samples_per_bin[:, None, None] / sizes[None, :, None]

    sb, ub, st = np.nonzero(fraction > 0)
    frame = pd.DataFrame(
        {
            "step_bin": np.array([c[0] for c in step_chunks], np.int64)[sb],
            "step_end": np.array([c[-1] for c in step_chunks], np.int64)[sb],
            "unit_bin": unit_edges[:-1][ub],
            "unit_end": unit_edges[1:][ub],
            "state": pd.Categorical(np.array(states, dtype=object)[st], categories=states),
            "fraction": fraction[sb, ub, st],
        }
    )
    return frame[MATRIX_COLUMNS]


def _codes_at(trace, samples: list[int]) -> Iterable[np.ndarray]:
    """The state code of every unit at the end of each sampled step (ascending): vectorised where the trace allows
    it (replay.sweep), else by the checkpointed event-by-event replay."""
    sweep = block_sweep(trace)
    if sweep is not None:
        cuts = [end_of_step(trace, s) for s in samples]
        return (codes for codes, _ in sweep.states_at(cuts, with_fill=False))
    tl = timeline(trace)
    return tl.scan([tl.index_of_step(s) for s in samples], lambda replay: replay.codes())


AT_STEP_STATES = "analysis.at_step.block_states"  # trace._cache: step -> block_states frame, seeded by a digest
# States that hold no memory reserved for a sequence: left out of the fill level (cached-idle prefix blocks are
# neither waste nor free, and are reported apart).
UNRESERVED_STATES = ("free", "pool", "cached_idle")
FILL_COLUMNS = ["step_bin", "step_end", "unit_bin", "unit_end", "tokens", "slots", "fill"]


def fill_matrix(
    trace,
    max_units: int = 256,
    max_steps: int = 200,
    *,
    steps: tuple[int, int] | None = None,
    units: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """How full the reserved units of each cell of the map are, with the same bins as state_matrix (same arguments):
    step_bin, step_end, unit_bin, unit_end, tokens (tokens held in the cell's reserved units at the end of the
    bin's last step), slots (token slots of those units), fill (tokens / slots; NaN when nothing in the cell is
    reserved). Reserved units are the states not in UNRESERVED_STATES: a partly filled last block, a page mapped
    for tokens not generated yet and a mapped-idle page lower the fill; free units do not count. One row per cell."""
    _check_bins("fill_matrix", max_units, max_steps)
    key = ("fill_matrix", max_units, max_steps, _pair(steps), _pair(units))
    return _memo(trace, key, lambda: _fill_matrix(trace, max_units, max_steps, steps, units))


def _fill_matrix(trace, max_units: int, max_steps: int, steps, units) -> pd.DataFrame:
    bins = _bins("fill_matrix", trace, _units(trace), max_units, max_steps, steps, units)
    if bins is None:
        return pd.DataFrame({c: pd.Series([], dtype="int64") for c in FILL_COLUMNS}).astype({"fill": "float64"})
    n_ubins = len(bins.unit_edges) - 1
    cls = replay_class(trace)
    rows = cls.addressing == "rows"  # arena rows: a row is one token slot, filled when it is `used`
    states = list(cls.states)
    skip = np.array([states.index(s) for s in UNRESERVED_STATES if s in states], np.int64)
    used_code = states.index("used") if "used" in states else -1

    def measure_rows(codes: np.ndarray) -> np.ndarray:
        out = np.zeros((2, n_ubins), np.float64)
        codes = np.asarray(codes, np.int64)[: bins.n_units]
        bin_of = bins.unit_bin_of[: len(codes)]
        keep = (bin_of >= 0) & ~np.isin(codes, skip)
        out[0] = np.bincount(bin_of[keep & (codes == used_code)], minlength=n_ubins)
        out[1] = np.bincount(bin_of[keep], minlength=n_ubins)
        return out

    def measure_units(unit: np.ndarray, codes: np.ndarray, fill: np.ndarray, capacity: np.ndarray) -> np.ndarray:
        """Tokens and token slots of the reserved units, per unit bin (units: block or page ids)."""
        out = np.zeros((2, n_ubins), np.float64)
        ok = unit < bins.n_units
        unit = unit[ok]
        bin_of = bins.unit_bin_of[unit]
        codes = codes[ok]
        keep = (bin_of >= 0) & ~np.isin(codes, skip)
        out[0] = np.bincount(bin_of[keep], weights=fill.astype(np.float64)[ok][keep], minlength=n_ubins)
        out[1] = np.bincount(bin_of[keep], weights=capacity.astype(np.float64)[ok][keep], minlength=n_ubins)
        return out

    def measure(replay) -> np.ndarray:
        if rows:
            return measure_rows(replay.codes())
        f = replay.frame()
        return measure_units(
            f["unit"].to_numpy(np.int64),
            f["state"].cat.codes.to_numpy(np.int64),
            f["fill"].to_numpy(np.float64),
            f["capacity_tokens"].to_numpy(np.float64),
        )

    last_steps = [int(c[-1]) for c in bins.step_chunks]
    sweep = block_sweep(trace)
    if sweep is not None:
        unit = np.arange(sweep.n, dtype=np.int64)
        capacity = np.full(sweep.n, sweep.block_size, np.int64)
        cuts = [end_of_step(trace, s) for s in last_steps]
        measured_list = [
            measure_units(unit, codes.astype(np.int64), fill, capacity)
            for codes, fill in sweep.states_at(cuts, with_fill=True)
            if fill is not None
        ]
    else:
        tl = timeline(trace)
        measured_list = tl.scan([tl.index_of_step(s) for s in last_steps], measure)
    measured = np.stack(measured_list)  # (step bins, 2, unit bins)
    tokens, slots = measured[:, 0, :], measured[:, 1, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        fill = np.where(slots > 0, tokens / slots, np.nan)
    grid_sb, grid_ub = np.meshgrid(np.arange(len(bins.step_chunks)), np.arange(n_ubins), indexing="ij")
    sb, ub = grid_sb.ravel(), grid_ub.ravel()
    frame = pd.DataFrame(
        {
            "step_bin": np.array([c[0] for c in bins.step_chunks], np.int64)[sb],
            "step_end": np.array([c[-1] for c in bins.step_chunks], np.int64)[sb],
            "unit_bin": bins.unit_edges[:-1][ub],
            "unit_end": bins.unit_edges[1:][ub],
            "tokens": tokens.ravel().astype(np.int64),
            "slots": slots.ravel().astype(np.int64),
            "fill": fill.ravel(),
        }
    )
    return frame[FILL_COLUMNS]


def _units(trace) -> int:
    """Units of the pool (the map's height), as the allocator's config (or the events) size it."""
    sweep = block_sweep(trace)
    return sweep.n if sweep is not None else int(timeline(trace).units)


# Maps cached per trace: a dashboard's zooms ask for many windows, so only the latest few are kept.
MEMO_SIZE = 16


def _pair(window: tuple[int, int] | None) -> tuple[int, ...] | None:
    """A window as a cache key (a malformed one is refused by _window, as ever)."""
    return None if window is None else tuple(int(v) for v in window)


def _memo(trace, key: tuple, build: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """build() cached on the trace under `key` (a copy is returned: callers may change theirs)."""
    memo: dict = trace._cache.setdefault("analysis.fragmentation_maps", {})
    if key not in memo:
        memo[key] = build()
        while len(memo) > MEMO_SIZE:
            memo.pop(next(iter(memo)))
    return memo[key].copy()


def _empty(states: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series([], dtype="int64") for c in MATRIX_COLUMNS})
    frame["state"] = pd.Categorical([], categories=states)
    frame["fraction"] = frame["fraction"].astype("float64")
    return frame
