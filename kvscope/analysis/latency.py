"""Latency per request: queueing delay, time to first token (TTFT) and time per output token (TPOT), with their
percentiles.

request_latency(trace) -> one row per request (forked samples are not requests: a request's latency is its first
sample's, the sequence that ran its prefill), ordered by seq:
    seq, request_id
    arrival_s      when it arrived: the workload's arrival time when the workload recorded it (sim runs), else its
                   ARRIVE event (host time)
    admit_s        when the scheduler admitted it the first time: on host time its ADMIT event's own time; on the
                   simulated clock, where events inside a step have no time of their own, the START of its admission
                   step (scheduling happens before the step's forward pass)
    first_token_s  when its first output token existed: the END of the step whose prefill completed its prompt
    finish_s       the end of its FINISH step (host: the FINISH event's time)
    generated      tokens it generated (kvscope.analysis.requests.generated_tokens' rule)
    queue_s        admit_s - arrival_s: time spent waiting for admission (memory, batch slots or token budget)
    ttft_s         first_token_s - arrival_s: queueing plus the prefill step
    tpot_s         (finish_s - first_token_s) / (generated - 1): mean time between output tokens after the first
                   (also called inter-token latency); NaN for requests that generated fewer than two tokens
    clock          "sim" or "host" (kvscope.analysis.steps)
NaN where a time never happened (a rejected or unfinished request). Negative differences (a host trace re-stamped
by a copy) are clipped to 0.

latency_summary(trace) -> {ttft_p50_s, ttft_p90_s, ttft_p99_s, tpot_p50_s, ..., queue_p99_s, latency_requests}:
the percentiles (numpy's linear interpolation) over the requests that have the value; None when none has it.
So on a simulated run admission (start of a step) and first token (end of the prefill step) are distinct times,
and TTFT >= the prefill step's duration > queueing delay.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached
from kvscope.analysis.requests import request_lifetimes, request_timestamps
from kvscope.analysis.steps import run_clock, step_durations

LATENCY_COLUMNS = [
    "seq",
    "request_id",
    "arrival_s",
    "admit_s",
    "first_token_s",
    "finish_s",
    "generated",
    "queue_s",
    "ttft_s",
    "tpot_s",
    "clock",
]
# (summary key prefix, request_latency column, what people read)
METRICS: tuple[tuple[str, str, str], ...] = (
    ("ttft", "ttft_s", "time to first token"),
    ("tpot", "tpot_s", "time per output token"),
    ("queue", "queue_s", "queueing delay"),
)
PERCENTILES = (50, 90, 99)


def request_latency(trace) -> pd.DataFrame:
    """One row per request: see the module docstring."""
    return cached(trace, "request_latency", lambda: _build(trace)).copy()


def latency_summary(trace) -> dict[str, Any]:
    """{prefix}_p{50,90,99}_s for ttft, tpot and queue (None when no request has the value), and
    latency_requests (requests with a first token)."""

    def build() -> dict[str, Any]:
        lat = request_latency(trace)
        out: dict[str, Any] = {}
        for prefix, column, _ in METRICS:
            values = lat[column].to_numpy(np.float64)
            values = values[np.isfinite(values)]
            for p in PERCENTILES:
                out[f"{prefix}_p{p}_s"] = float(np.percentile(values, p)) if values.size else None
        out["latency_requests"] = int(np.isfinite(lat["ttft_s"].to_numpy(np.float64)).sum())
        return out

    return dict(cached(trace, "latency_summary", build))


def _build(trace) -> pd.DataFrame:
    lt = request_lifetimes(trace)
    lt = lt[lt["parent"] < 0].reset_index(drop=True)
    if lt.empty:
        return _empty()
    clock = run_clock(trace)
    ts = request_timestamps(trace, clock).set_index("seq").reindex(lt["seq"])
    if clock == "sim":
        steps = step_durations(trace, "sim").set_index("step")
        start, end = steps["start_s"], steps["end_s"]

        def at(series: pd.Series, step_col: str) -> np.ndarray:
            s = lt[step_col].to_numpy(np.int64)
            return np.where(s >= 0, series.reindex(s).to_numpy(np.float64), np.nan)

        arrival = lt["arrival_s"].to_numpy(np.float64)
        admit = at(start, "admit_step")
        first = at(end, "first_token_step")
        finish = at(end, "finish_step")
    else:
        arrival = ts["arrive_s"].to_numpy(np.float64)
        admit = ts["admit_s"].to_numpy(np.float64)
        first = ts["first_token_s"].to_numpy(np.float64)
        finish = ts["end_s"].to_numpy(np.float64)
        finish = np.where(lt["finish_step"].to_numpy() >= 0, finish, np.nan)  # end_s is also a rejection's time
    generated = lt["generated"].to_numpy(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(generated >= 2, (finish - first) / np.maximum(generated - 1, 1), np.nan)
    frame = pd.DataFrame(
        {
            "seq": lt["seq"].to_numpy(np.int64),
            "request_id": lt["request_id"].to_numpy(object),
            "arrival_s": arrival,
            "admit_s": admit,
            "first_token_s": first,
            "finish_s": finish,
            "generated": generated,
            "queue_s": _nonneg(admit - arrival),
            "ttft_s": _nonneg(first - arrival),
            "tpot_s": _nonneg(tpot),
            "clock": clock,
        }
    )
    return frame[LATENCY_COLUMNS]


def _nonneg(values: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(values), np.nan, np.maximum(values, 0.0))


def _empty() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series([], dtype="float64") for c in LATENCY_COLUMNS})
    frame = frame.astype({"seq": "int64", "generated": "int64"})
    frame["request_id"] = frame["request_id"].astype(object)
    frame["clock"] = frame["clock"].astype(object)
    return frame
