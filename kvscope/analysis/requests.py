"""Requests: lifetimes (one row per sequence: requests and the samples/beams forked from them), their phases, how
many wait / run / are swapped out in each step, and their timestamps on a clock.

request_lifetimes(trace)   one row per sequence: see its docstring (steps of arrival, admission, first token, finish;
                           lengths; preemptions; prefix hits; status)
request_phases(trace)      one row per phase of a sequence: seq, phase (waiting, running, swapped), start_step,
                           end_step (one past the phase's last step), open (still in that phase when the trace ends)
request_occupancy(trace)   one row per recorded step: step, t_s (end of the step, run clock), waiting, running,
                           swapped (sequences in each phase during that step)
request_timestamps(trace, clock=None)
                           one row per sequence: seq, arrive_s, admit_s, first_token_s, end_s, clock
lifetime_phases(lifetimes, last_step=None)
                           the phases a lifetimes frame alone implies (no preemptions or swaps), for callers with no
                           trace

Phases: ONE definition of waiting, running and swapped, used by every surface (the Perfetto export's "requests"
counter, the request lifetimes figure, the dashboard). They follow the scheduler's queues (vLLM's num_waiting /
num_running / num_swapped) and ARCHITECTURE.md's step semantics: a sequence's phase in step s is the queue it is in
while step s runs, after the step's scheduling and before its completions. So
    waiting   arrived (ARRIVE), or preempted by recompute (PREEMPT aux=0), or forked without memory (FORK n=0), and
              not (re-)admitted yet: from that step up to the step that admits it (ADMIT), exclusive
    running   admitted: from its ADMIT step (a forked sample: its FORK step, its first token came out of that
              step's prefill) through its FINISH step inclusive (a request that finishes in a step still holds its
              memory during that step), or up to a PREEMPT or REJECT step, exclusive (a preempted or rejected
              sequence is not in that step's batch)
    swapped   preempted by swap (PREEMPT aux=1): from that step up to its SWAP_IN step, exclusive
A request rejected on arrival never waits; one rejected while waiting waits until its REJECT step (exclusive).
Events recorded outside a step count with the step before them. Phases still open when the trace ends run through
its last recorded step. The lifecycle events are the scheduler's (kvscope.events); an admission the allocator undid
in the same step (its can_admit was optimistic) is not visible in them and counts as running.

Tokens generated per sequence are counted by semantics, not by summing events (see `generated_tokens`).
"""

# This module is longer than 400 lines: it is the one place that defines a request's lifetime, phases (waiting /
# running / swapped) and timestamps; split apart, the definitions that every surface shares could drift apart.

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis._events import (
    cached,
    recorded_steps,
    requests_meta,
    rows,
    select,
    step_clock,
    step_of_rows,
)
from kvscope.analysis.steps import resolve_clock, step_durations
from kvscope.events import Kind

LIFETIME_COLUMNS: list[str] = [
    "seq",
    "request_id",
    "parent",
    "root",
    "arrival_s",
    "arrive_step",
    "admit_step",
    "first_token_step",
    "finish_step",
    "reject_step",
    "admit_s",
    "first_token_s",
    "finish_s",
    "prompt_len",
    "output_len",
    "max_tokens_held",
    "generated",
    "preemptions",
    "swaps",
    "prefix_hit_tokens",
    "status",
]


def request_lifetimes(trace) -> pd.DataFrame:
    """One row per sequence, ordered by seq:

    seq; request_id (the workload's id of the request, shared by its forked samples; str(seq) if unknown);
    parent (the seq it was forked from, -1 for a request); root (the request's seq); arrival_s (workload arrival
    time when the workload recorded it, else the run-clock time of the ARRIVE step); arrive_step; admit_step (its
    first admission; for a fork its FORK step, or its ADMIT when it got no memory at the fork); first_token_step
    (the step it first held its whole prompt: its prefill finished and the first token was sampled);
    finish_step; reject_step (its REJECT; these steps are -1 when it never happened); admit_s, first_token_s,
    finish_s (run clock at the end of those steps; NaN if never); prompt_len, output_len (of its request; -1
    unknown); max_tokens_held; generated (tokens it generated: see generated_tokens); preemptions; swaps
    (swap-outs); prefix_hit_tokens (prompt tokens served from the prefix cache at a request's first admission:
    hits at re-admissions after a preemption, and at the late admission of a forked sample, serve work already
    done for the request, and are not counted); status (finished, rejected, pruned: a beam that beam search
    dropped, running: admitted and not finished when the trace ends, waiting: arrived and never admitted).
    """
    return cached(trace, "request_lifetimes", lambda: _build(trace)).copy()


def generated_tokens(trace) -> int:
    """Tokens the run generated, counted by semantics.

    A request with prompt length P holds P tokens once its prefill step has sampled the first output token and one
    more after each decode step, so a sequence that ever held H >= P tokens has generated H - P + 1 tokens (a
    sequence finishing after O tokens holds P + O - 1: it counts O). H is the most tokens the sequence ever held
    (APPEND aux, FINISH n, PREEMPT n, FORK n). Work recomputed after a preemption re-fills tokens the sequence had
    already held, so it does not raise H: nothing is counted twice. Forked samples count their own outputs: each
    of n parallel samples finishing after O tokens counts O (P being the request's prompt length); a sample counts
    at least its first token, sampled in the request's prefill step, even if it got no memory at the fork. A beam
    forked during decode (FORK n > P) counts only the tokens it held beyond those it was forked with."""
    lt = request_lifetimes(trace)
    return int(lt["generated"].sum()) if len(lt) else 0


def _build(trace) -> pd.DataFrame:
    clock = step_clock(trace)
    t_of_step = dict(zip(clock["step"].tolist(), clock["t_s"].tolist(), strict=True))
    life = select(
        trace,
        Kind.ARRIVE,
        Kind.ADMIT,
        Kind.FORK,
        Kind.PREEMPT,
        Kind.SWAP_OUT,
        Kind.FINISH,
        Kind.PREFIX_HIT,
        Kind.REJECT,
        Kind.PRUNE,
    )  # APPEND (one row per token: most of a trace) is read apart, a piece at a time (_AppendPass)
    life = life[life["seq"] >= 0]
    appends = _AppendPass(trace)
    seqs = np.union1d(np.unique(life["seq"].to_numpy()), appends.seqs())
    meta = requests_meta(trace)
    if len(meta):
        seqs = np.union1d(seqs, meta["seq"].to_numpy())
    frame = pd.DataFrame({"seq": seqs.astype(np.int64)})
    if frame.empty:
        return _empty()

    def by_seq(kind: Kind) -> pd.DataFrame:
        return life[life["code"] == int(kind)]

    def first(kind: Kind, col: str) -> pd.Series:
        return by_seq(kind).drop_duplicates("seq", keep="first").set_index("seq")[col]

    fork = by_seq(Kind.FORK).drop_duplicates("seq", keep="first").set_index("seq")
    parent = fork["aux"].reindex(frame["seq"]).fillna(-1).astype("int64").to_numpy()
    frame["parent"] = parent
    frame["root"] = _roots(frame["seq"].to_numpy(), parent)

    arrive = by_seq(Kind.ARRIVE).drop_duplicates("seq", keep="first").set_index("seq")
    root_idx = pd.Index(frame["root"])
    # np.array copies: pandas may hand out read-only views, and these are filled in below.
    prompt = np.array(arrive["n"].reindex(root_idx), dtype=np.float64)
    output = np.array(arrive["aux"].reindex(root_idx), dtype=np.float64)
    arrival = np.array([t_of_step.get(s, np.nan) for s in arrive["step"].reindex(root_idx).fillna(-1).astype(int)])
    request_id = np.array(frame["root"].astype(str), dtype=object)
    if len(meta):
        m = meta.set_index("seq")
        for col, target in (("prompt_len", prompt), ("output_len", output), ("arrival", arrival)):
            if col in m.columns:
                values = pd.to_numeric(m[col], errors="coerce").reindex(root_idx).to_numpy(dtype=np.float64)
                known = ~np.isnan(values)
                target[known] = values[known]
        if "id" in m.columns:
            ids = m["id"].astype(str).reindex(root_idx).to_numpy(dtype=object)
            known = pd.notna(ids)
            request_id[known] = ids[known]
    frame["request_id"] = request_id
    frame["arrival_s"] = arrival
    frame["arrive_step"] = _steps(first(Kind.ARRIVE, "step"), frame)
    admit = _steps(first(Kind.ADMIT, "step"), frame)
    fork_step = _steps(fork["step"], frame)
    # A fork holds memory from its fork step (a later ADMIT is a re-admission after a preemption), unless it got
    # none there (FORK n=0): then it waited until its ADMIT.
    fork_tokens = fork["n"].reindex(frame["seq"]).fillna(-1).to_numpy()
    late = (fork_tokens == 0) & (admit >= 0)
    frame["admit_step"] = np.where((fork_step >= 0) & ~late, fork_step, admit)
    frame["prompt_len"] = np.nan_to_num(prompt, nan=-1).astype(np.int64)
    frame["output_len"] = np.nan_to_num(output, nan=-1).astype(np.int64)

    held = life[life["code"].isin([int(Kind.FINISH), int(Kind.PREEMPT), int(Kind.FORK)])]
    held = pd.DataFrame({"seq": held["seq"].to_numpy(), "step": held["step"].to_numpy(), "held": held["n"].to_numpy()})
    max_small = held.groupby("seq")["held"].max().reindex(frame["seq"]).to_numpy(np.float64)
    prompt_len = frame["prompt_len"].to_numpy()
    max_append, first_append = appends.held(frame["seq"].to_numpy(np.int64), prompt_len)
    max_held = np.fmax(max_small, max_append)  # NaN: no such row
    max_held = np.nan_to_num(max_held, nan=0).astype(np.int64)
    frame["max_tokens_held"] = max_held
    p = frame["prompt_len"].to_numpy()
    generated = np.where((p >= 0) & (max_held >= p) & (max_held > 0), max_held - p + 1, 0)
    # A sample forks at the end of its request's prefill step with its first token already sampled, even when it
    # gets no memory of its own then (FORK n=0: it waits and is prefilled later, or is complete if O = 1).
    generated = np.where(frame["parent"].to_numpy() >= 0, np.maximum(generated, 1), generated)
    # A beam forked during decode starts with its parent's P + k tokens, k of them generated by the parent: it
    # generated only what it appended after the fork.
    decode_fork = (frame["parent"].to_numpy() >= 0) & (p >= 0) & (fork_tokens > p)
    generated = np.where(decode_fork, np.maximum(max_held - fork_tokens, 0), generated)
    frame["generated"] = generated.astype(np.int64)

    # First step at which the sequence held its whole prompt.
    held = held.merge(frame[["seq", "prompt_len"]], on="seq")
    reached = held[(held["prompt_len"] >= 0) & (held["held"] >= held["prompt_len"]) & (held["held"] > 0)]
    first_small = reached.groupby("seq")["step"].min().reindex(frame["seq"]).to_numpy(np.float64)
    frame["first_token_step"] = np.nan_to_num(np.fmin(first_small, first_append), nan=-1).astype(np.int64)
    frame["finish_step"] = _steps(first(Kind.FINISH, "step"), frame)
    frame["reject_step"] = _steps(first(Kind.REJECT, "step"), frame)
    for step_col, t_col in (
        ("admit_step", "admit_s"),
        ("first_token_step", "first_token_s"),
        ("finish_step", "finish_s"),
    ):
        frame[t_col] = [t_of_step.get(s, np.nan) if s >= 0 else np.nan for s in frame[step_col].tolist()]
    frame["preemptions"] = _counts(by_seq(Kind.PREEMPT), frame)
    frame["swaps"] = _counts(by_seq(Kind.SWAP_OUT), frame)
    frame["prefix_hit_tokens"] = first_admission_hits(life).reindex(frame["seq"]).fillna(0).astype("int64").to_numpy()

    rejected = frame["seq"].isin(by_seq(Kind.REJECT)["seq"])
    pruned = frame["seq"].isin(by_seq(Kind.PRUNE)["seq"])  # a beam that beam search dropped
    status = np.where(
        frame["finish_step"] >= 0,
        "finished",
        np.where(
            rejected,
            "rejected",
            np.where(pruned, "pruned", np.where(frame["admit_step"] >= 0, "running", "waiting")),
        ),
    )
    frame["status"] = status
    return frame[LIFETIME_COLUMNS]


PIECE_ROWS = 1 << 19  # _AppendPass reads the APPEND rows this many at a time


class _AppendPass:
    """What request_lifetimes needs of the APPEND rows (tokens held after each append, `aux`), read from the trace's
    store a piece at a time in row order, never as one frame: which sequences append, and per sequence the most
    tokens an append left it holding and the first step an append left it holding its whole prompt."""

    NAMES = ("seq", "aux", "step")

    def __init__(self, trace) -> None:
        self.trace = trace

    def _pieces(self, names: tuple[str, ...] = NAMES):
        # (pieces of PIECE_ROWS: a few int64 arrays of a piece are alive at once, beside the summary's other work)
        for piece in self.trace.store.pieces([int(Kind.APPEND)], names, size=PIECE_ROWS):
            keep = piece["seq"] >= 0
            if not keep.all():
                piece = {name: values[keep] for name, values in piece.items()}
            yield piece

    def seqs(self) -> np.ndarray:
        found = [_distinct(piece["seq"]) for piece in self._pieces(("seq",))]  # (only the seq column read)
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def held(self, seqs: np.ndarray, prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(most tokens held after an append, first step where an append left prompt[i] > 0 tokens or more held
        and prompt[i] >= 0) per sequence of `seqs` (sorted, every appending sequence among them); NaN for none."""
        most = np.full(len(seqs), np.iinfo(np.int64).min, np.int64)
        first = np.full(len(seqs), np.iinfo(np.int64).max, np.int64)
        lookup = _Lookup(seqs)
        for piece in self._pieces():
            at = lookup(piece["seq"])
            aux = piece["aux"].astype(np.int64)  # ufunc.at takes its fast path on matching dtypes
            np.maximum.at(most, at, aux)
            p = prompt[at]
            ok = (p >= 0) & (aux >= p) & (aux > 0)
            np.minimum.at(first, at[ok], piece["step"][ok].astype(np.int64))
        most_f = np.where(most == np.iinfo(np.int64).min, np.nan, most.astype(np.float64))
        first_f = np.where(first == np.iinfo(np.int64).max, np.nan, first.astype(np.float64))
        return most_f, first_f


class _Lookup:
    """Position of each value in a sorted array of distinct ints that holds them all: a dense table when their
    range is small, else a binary search."""

    def __init__(self, sorted_values: np.ndarray) -> None:
        self.values = sorted_values
        self.lo = int(sorted_values[0]) if len(sorted_values) else 0
        span = int(sorted_values[-1]) - self.lo + 1 if len(sorted_values) else 0
        self.table: np.ndarray | None = None
        if span <= 8 * len(sorted_values) + (1 << 20):
            self.table = np.zeros(span, np.int64)
            self.table[sorted_values - self.lo] = np.arange(len(sorted_values))

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.table is not None:
            return self.table[values.astype(np.int64) - self.lo]
        return np.searchsorted(self.values, values)


def _distinct(values: np.ndarray) -> np.ndarray:
    """np.unique(values) as int64, by a presence table when the values span a small range."""
    if not len(values):
        return np.zeros(0, np.int64)
    lo, hi = int(values.min()), int(values.max())
    if hi - lo <= 8 * len(values) + (1 << 20):
        seen = np.zeros(hi - lo + 1, bool)
        seen[values.astype(np.int64) - lo] = True
        return np.flatnonzero(seen) + lo
    return np.unique(values).astype(np.int64)


def first_admission_hits(life: pd.DataFrame) -> pd.Series:
    """Prefix-hit tokens per seq that count as hits: PREFIX_HIT events of a request's first admission. A hit after
    the sequence's first PREEMPT serves tokens the run had already computed for this very sequence; a forked
    sample (FORK) shares its request's prompt, counted once with the request: neither counts. `life` holds at
    least the PREFIX_HIT, PREEMPT and FORK rows, in row order."""
    rows = life[life["code"].isin([int(Kind.PREFIX_HIT), int(Kind.PREEMPT), int(Kind.FORK)])]
    if rows.empty:
        return pd.Series(dtype="int64")
    excluded_before = (rows["code"] != int(Kind.PREFIX_HIT)).groupby(rows["seq"]).cumsum() > 0
    hits = rows[(rows["code"] == int(Kind.PREFIX_HIT)) & ~excluded_before]
    return hits.groupby("seq")["n"].sum()


def _roots(seqs: np.ndarray, parent: np.ndarray) -> np.ndarray:
    parent_of = dict(zip(seqs.tolist(), parent.tolist(), strict=True))
    roots = []
    for s in seqs.tolist():
        r, hops = s, 0
        while parent_of.get(r, -1) >= 0 and hops <= len(parent_of):  # the bound guards a corrupt cyclic trace
            r, hops = parent_of[r], hops + 1
        roots.append(r)
    return np.array(roots, dtype=np.int64)


def _steps(series: pd.Series, frame: pd.DataFrame) -> np.ndarray:
    return series.reindex(frame["seq"]).fillna(-1).astype("int64").to_numpy()


def _counts(rows: pd.DataFrame, frame: pd.DataFrame) -> np.ndarray:
    return rows.groupby("seq").size().reindex(frame["seq"]).fillna(0).astype("int64").to_numpy()


def _empty() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series([], dtype="int64") for c in LIFETIME_COLUMNS})
    for c in ("arrival_s", "admit_s", "first_token_s", "finish_s"):
        frame[c] = frame[c].astype("float64")
    for c in ("request_id", "status"):
        frame[c] = frame[c].astype(object)
    return frame


# ---- phases and occupancy (the definitions are in the module docstring) ------------------------------------------
PHASES = ("waiting", "running", "swapped")
PHASE_COLUMNS = ["seq", "phase", "start_step", "end_step", "open"]
OCCUPANCY_COLUMNS = ["step", "t_s", "waiting", "running", "swapped"]
TIMESTAMP_COLUMNS = ["seq", "arrive_s", "admit_s", "first_token_s", "end_s", "clock"]
_WAITING, _RUNNING, _SWAPPED, _GONE = 0, 1, 2, 3
_LIFECYCLE = (Kind.ARRIVE, Kind.ADMIT, Kind.FORK, Kind.PREEMPT, Kind.SWAP_IN, Kind.FINISH, Kind.REJECT, Kind.PRUNE)
_SWAP_PREEMPTION = 1  # PREEMPT aux


def request_phases(trace) -> pd.DataFrame:
    """One row per phase of every sequence, ordered by seq then start_step: seq, phase (categorical: waiting,
    running, swapped; see the module docstring), start_step (the phase's first step), end_step (one past its last
    step), open (the sequence was still in that phase when the trace ended: end_step is then the last recorded
    step + 1)."""
    return cached(trace, "request_phases", lambda: _phases(trace)).copy()


def request_occupancy(trace) -> pd.DataFrame:
    """One row per recorded step: step, t_s (end of the step on the run's clock), waiting, running, swapped (how many
    sequences were in each phase during the step: the request_phases covering it)."""
    return cached(trace, "request_occupancy", lambda: _occupancy(trace)).copy()


def request_timestamps(trace, clock: str | None = None) -> pd.DataFrame:
    """One row per sequence, ordered by seq, on a clock ("host", "sim", or None: the run's own; see
    kvscope.analysis.steps): arrive_s (it entered the engine: its ARRIVE, a forked sample's FORK), admit_s (its
    admission as request_lifetimes counts it: its first ADMIT; a sample's FORK, or its ADMIT when it got no memory
    at the fork), first_token_s (end of its first_token_step), end_s (its FINISH, or its REJECT), clock. NaN for
    what never happened. On host time each is the event's own time; on the simulated clock, where events inside a
    step have no time of their own, the end of the event's step."""
    chosen = resolve_clock(trace, clock)
    return cached(trace, f"request_timestamps.{chosen}", lambda: _timestamps(trace, chosen)).copy()


def lifetime_phases(lifetimes: pd.DataFrame, last_step: int | None = None) -> pd.DataFrame:
    """The request_phases a request_lifetimes frame alone implies, for callers that have no trace (hand-made
    frames): waiting from arrive_step to admit_step, running from there through finish_step (or up to reject_step),
    by the same definitions; preemptions and swaps are not in a lifetimes frame, so a preempted sequence shows one
    running phase. Phases still open end at last_step + 1 (default: the frame's last step)."""
    steps = [_numeric(lifetimes[c]) for c in ("arrive_step", "admit_step", "finish_step")]
    reject = _numeric(lifetimes["reject_step"]) if "reject_step" in lifetimes.columns else np.full(len(lifetimes), -1.0)
    if last_step is None:
        known = np.concatenate([*steps, reject])
        known = known[np.isfinite(known) & (known >= 0)]
        last_step = int(known.max()) if known.size else 0
    arrive, admit, finish = (np.where(np.isfinite(c) & (c >= 0), c, -1) for c in steps)
    reject = np.where(np.isfinite(reject) & (reject >= 0), reject, -1)
    admitted = admit >= 0
    still = (finish < 0) & (reject < 0)  # alive when the trace ends
    end = np.where(finish >= 0, finish + 1, np.where(reject >= 0, reject, last_step + 1))
    seq = lifetimes["seq"].to_numpy(np.int64)
    waiting = pd.DataFrame(
        {
            "seq": seq,
            "phase": "waiting",
            "start_step": arrive,
            "end_step": np.where(admitted, admit, end),
            "open": ~admitted & still,
        }
    )[arrive >= 0]
    running = pd.DataFrame({"seq": seq, "phase": "running", "start_step": admit, "end_step": end, "open": still})
    running = running[admitted]
    return _phase_frame(pd.concat([waiting, running], ignore_index=True))


def _phase_frame(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame[frame["end_step"] > frame["start_step"]]
    frame = frame.astype({"seq": "int64", "start_step": "int64", "end_step": "int64", "open": "bool"})
    frame = frame.sort_values(["seq", "start_step"], kind="stable").reset_index(drop=True)
    frame["phase"] = pd.Categorical(frame["phase"].astype(str), categories=list(PHASES))
    return frame[PHASE_COLUMNS]


def _phases(trace) -> pd.DataFrame:
    steps = recorded_steps(trace)
    life = select(trace, *_LIFECYCLE)
    # The step each event counts with: events outside a step count with the step before them.
    life["at"] = np.maximum(step_of_rows(trace, rows(trace, *_LIFECYCLE)), 0)
    life = life[life["seq"] >= 0]
    if life.empty or not len(steps):
        return _phase_frame(pd.DataFrame({c: pd.Series([], dtype=object) for c in PHASE_COLUMNS}))
    code, n, aux = life["code"].to_numpy(), life["n"].to_numpy(), life["aux"].to_numpy()
    state = np.select(
        [code == int(Kind.ARRIVE), code == int(Kind.ADMIT), code == int(Kind.FORK), code == int(Kind.PREEMPT)],
        [
            _WAITING,
            _RUNNING,
            np.where(n > 0, _RUNNING, _WAITING),  # a fork without memory waits for its admission
            np.where(aux == _SWAP_PREEMPTION, _SWAPPED, _WAITING),
        ],
        np.where(code == int(Kind.SWAP_IN), _RUNNING, _GONE),  # FINISH, REJECT, PRUNE: gone
    )
    frame = pd.DataFrame(
        {
            "seq": life["seq"].to_numpy(),
            "state": state,
            "at": life["at"].to_numpy(np.int64),
            "finish": (code == int(Kind.FINISH)) | (code == int(Kind.PRUNE)),  # a pruned beam ran in its step
        }
    )
    frame = frame.sort_values("seq", kind="stable").reset_index(drop=True)  # per sequence, in trace order
    group = frame.groupby("seq", sort=False)
    prev = group["state"].shift(1, fill_value=-1).to_numpy()
    cur = frame["state"].to_numpy()
    # A sequence that finishes in a step ran in it: it leaves after the step (a rejected one leaves before it, and
    # one that finishes without ever running, a sample complete at its fork, never ran).
    frame["at"] += (frame["finish"].to_numpy() & (prev == _RUNNING)).astype(np.int64)
    gone = pd.Series(cur == _GONE).groupby(frame["seq"], sort=False).cumsum().to_numpy()
    gone_before = (gone - (cur == _GONE)) > 0  # events after a sequence left are ignored
    frame = frame[(cur != prev) & ~gone_before].reset_index(drop=True)  # repeated states: the phase goes on
    nxt = frame.groupby("seq", sort=False)["at"].shift(-1)
    stop = int(steps[-1]) + 1
    live = frame["state"].to_numpy() != _GONE
    phases = pd.DataFrame(
        {
            "seq": frame["seq"],
            "phase": np.array([*PHASES, "gone"], dtype=object)[frame["state"].to_numpy()],
            "start_step": frame["at"],
            "end_step": nxt.fillna(stop),
            "open": nxt.isna(),
        }
    )
    return _phase_frame(phases[live])


def _occupancy(trace) -> pd.DataFrame:
    steps = recorded_steps(trace)
    phases = request_phases(trace)
    stop = int(steps[-1]) + 2 if len(steps) else 1
    frame = pd.DataFrame({"step": steps.astype(np.int64)})
    clock = step_clock(trace).set_index("step")["t_s"]
    frame["t_s"] = clock.reindex(frame["step"]).to_numpy(np.float64)
    for name in PHASES:
        rows = phases[phases["phase"] == name]
        delta = np.zeros(stop + 1, np.int64)
        np.add.at(delta, np.clip(rows["start_step"].to_numpy(), 0, stop), 1)
        np.add.at(delta, np.clip(rows["end_step"].to_numpy(), 0, stop), -1)
        frame[name] = np.cumsum(delta)[frame["step"].to_numpy()]
    return frame[OCCUPANCY_COLUMNS]


def _timestamps(trace, clock: str) -> pd.DataFrame:
    lt = request_lifetimes(trace)
    seqs = lt["seq"].to_numpy(np.int64)
    life = select(trace, Kind.ARRIVE, Kind.ADMIT, Kind.FORK, Kind.FINISH, Kind.REJECT)
    life = life[life["seq"] >= 0].drop_duplicates(["code", "seq"], keep="first")
    steps = step_durations(trace, clock).set_index("step")["end_s"]
    if clock == "host":
        times = life.set_index(["code", "seq"])["t_ns"] / 1e9
    else:
        times = pd.Series(steps.reindex(life["step"]).to_numpy(np.float64), index=[life["code"], life["seq"]])

    def first(kind: Kind) -> np.ndarray:
        idx = pd.MultiIndex.from_arrays([np.full(len(seqs), int(kind)), seqs])
        return times.reindex(idx).to_numpy(np.float64)

    fork = life[life["code"] == int(Kind.FORK)].set_index("seq")["n"].reindex(seqs).to_numpy(np.float64)
    admit, fork_t = first(Kind.ADMIT), first(Kind.FORK)
    late_fork = (fork == 0) & ~np.isnan(admit)  # forked without memory: admitted later, at its ADMIT
    arrive = first(Kind.ARRIVE)
    token_step = lt["first_token_step"].to_numpy()
    finish = first(Kind.FINISH)
    frame = pd.DataFrame(
        {
            "seq": seqs,
            "arrive_s": np.where(np.isnan(arrive), fork_t, arrive),
            "admit_s": np.where(np.isnan(fork_t) | late_fork, admit, fork_t),
            "first_token_s": np.where(token_step >= 0, steps.reindex(token_step).to_numpy(np.float64), np.nan),
            "end_s": np.where(np.isnan(finish), first(Kind.REJECT), finish),
            "clock": clock,
        }
    )
    return frame[TIMESTAMP_COLUMNS]


def _numeric(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
