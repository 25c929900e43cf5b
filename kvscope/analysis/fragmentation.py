"""Fragmentation: the state of every block / page / arena segment at a step, and the whole run as a binned map.

States (per addressing family, e.g. the paged, vmm and static allocators; `unit_states(trace)` lists them in order):
    blocks  free, active (ref 1), shared (ref > 1), cached_idle (ref 0, hashed: in the prefix cache)
    pages   pool (unmapped), mapped_used (on a slot with a live request), mapped_idle (deferred reclamation)
    rows    free, used (rows holding tokens), reservation (rows for tokens not generated yet, up to the final
            length P + O - 1), internal (rows beyond the final length: never to be filled)

The state is rebuilt by replaying the allocator's events (kvscope.analysis.replay, chosen by the addressing the trace
declares): checkpoints make any step cheap to reach after the first pass, which is cached on the Trace.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis._events import recorded_steps
from kvscope.analysis.replay import STATE_COLUMNS, Timeline, replay_class, timeline

__all__ = ["MATRIX_COLUMNS", "STATE_COLUMNS", "block_states", "state_matrix", "unit_states"]

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
    return timeline(trace).at_step(int(step), lambda replay: replay.frame())


def state_matrix(trace, max_units: int = 256, max_steps: int = 200) -> pd.DataFrame:
    """The fragmentation map in long form: step_bin (first step of the bin), step_end (last step), unit_bin (first
    unit of the bin: block / page id or arena row), unit_end (one past the last), state, fraction (share of the
    bin's units in that state, averaged over the bin's sampled steps; rows with fraction 0 are left out, so the
    fractions of one cell add up to 1).

    At most max_units x max_steps cells: the units are cut into max_units equal ranges and the recorded steps into
    max_steps runs of consecutive steps. A bin's state is sampled at the end of up to a few of its steps (the last
    one always), as many as SAMPLE_BUDGET allows for the pool's size."""
    for name, value in (("max_units", max_units), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"state_matrix: {name} must be a positive integer, got {value!r}")
    tl = timeline(trace)
    states = list(tl.cls.states)
    steps = recorded_steps(trace)
    steps = steps[steps >= 0]
    n_units = _unit_count(tl)
    if not len(steps) or n_units == 0:
        return _empty(states)

    step_chunks = np.array_split(steps, min(max_steps, len(steps)))
    per_bin = int(max(1, min(SAMPLE_BUDGET // (n_units * len(step_chunks)), max(len(c) for c in step_chunks))))
    samples: list[int] = []  # sampled steps, ascending
    sample_bin: list[int] = []
    for b, chunk in enumerate(step_chunks):
        k = min(per_bin, len(chunk))
        picks = chunk[np.unique(np.linspace(len(chunk) - 1, 0, k).round().astype(int))]
        samples.extend(sorted(picks.tolist()))
        sample_bin.extend([b] * len(picks))

    unit_edges = np.linspace(0, n_units, min(max_units, n_units) + 1).round().astype(np.int64)
    unit_edges = np.unique(unit_edges)
    n_ubins = len(unit_edges) - 1
    unit_bin_of = np.repeat(np.arange(n_ubins), np.diff(unit_edges))
    n_states = len(states)
    counts = np.zeros((len(step_chunks), n_ubins, n_states), np.float64)
    indices = [tl.index_of_step(s) for s in samples]

    def accumulate(codes: np.ndarray) -> np.ndarray:
        c = np.zeros(n_units, np.int64)
        m = min(len(codes), n_units)
        c[:m] = codes[:m]
        return np.bincount(unit_bin_of * n_states + c, minlength=n_ubins * n_states).reshape(n_ubins, n_states)

    for b, hist in zip(sample_bin, tl.scan(indices, lambda replay: accumulate(replay.codes())), strict=True):
        counts[b] += hist
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


def _unit_count(tl: Timeline) -> int:
    return int(tl.live.units)


def _empty(states: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series([], dtype="int64") for c in MATRIX_COLUMNS})
    frame["state"] = pd.Categorical([], categories=states)
    frame["fraction"] = frame["fraction"].astype("float64")
    return frame
