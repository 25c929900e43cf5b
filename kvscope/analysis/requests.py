"""Request lifetimes: one row per sequence (requests and the samples/beams forked from them).

Tokens generated per sequence are counted by semantics, not by summing events (see `generated_tokens`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached, requests_meta, select, step_clock
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
    finish_step (-1 when it never happened); admit_s, first_token_s, finish_s (run clock at the end of those
    steps; NaN if never); prompt_len, output_len (of its request; -1 unknown); max_tokens_held; generated (tokens
    it generated: see generated_tokens); preemptions; swaps (swap-outs); prefix_hit_tokens (prompt tokens served
    from the prefix cache at a request's first admission: hits at re-admissions after a preemption, and at the
    late admission of a forked sample, serve work already done for the request, and are not counted); status
    (finished, rejected, running: admitted and not finished when the trace ends, waiting: arrived and never
    admitted).
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
    at least its first token, sampled in the request's prefill step, even if it got no memory at the fork."""
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
        Kind.APPEND,
        Kind.PREFIX_HIT,
        Kind.REJECT,
    )
    life = life[life["seq"] >= 0]
    seqs = np.unique(life["seq"].to_numpy())
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

    held = life[life["code"].isin([int(Kind.APPEND), int(Kind.FINISH), int(Kind.PREEMPT), int(Kind.FORK)])]
    held_value = np.where(held["code"].to_numpy() == int(Kind.APPEND), held["aux"].to_numpy(), held["n"].to_numpy())
    held = pd.DataFrame({"seq": held["seq"].to_numpy(), "step": held["step"].to_numpy(), "held": held_value})
    max_held = held.groupby("seq")["held"].max().reindex(frame["seq"]).fillna(0).astype("int64").to_numpy()
    frame["max_tokens_held"] = max_held
    p = frame["prompt_len"].to_numpy()
    generated = np.where((p >= 0) & (max_held >= p) & (max_held > 0), max_held - p + 1, 0)
    # A sample forks at the end of its request's prefill step with its first token already sampled, even when it
    # gets no memory of its own then (FORK n=0: it waits and is prefilled later, or is complete if O = 1).
    generated = np.where(frame["parent"].to_numpy() >= 0, np.maximum(generated, 1), generated)
    frame["generated"] = generated.astype(np.int64)

    # First step at which the sequence held its whole prompt.
    held = held.merge(frame[["seq", "prompt_len"]], on="seq")
    reached = held[(held["prompt_len"] >= 0) & (held["held"] >= held["prompt_len"]) & (held["held"] > 0)]
    frame["first_token_step"] = _steps(reached.groupby("seq")["step"].min(), frame)
    frame["finish_step"] = _steps(first(Kind.FINISH, "step"), frame)
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
    status = np.where(
        frame["finish_step"] >= 0,
        "finished",
        np.where(rejected, "rejected", np.where(frame["admit_step"] >= 0, "running", "waiting")),
    )
    frame["status"] = status
    return frame[LIFETIME_COLUMNS]


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
