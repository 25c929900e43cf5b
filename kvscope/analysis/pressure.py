"""Memory pressure as incidents: the discrete events worth a mark on a timeline — preemptions, swaps, OOMs,
rejections, prefix-cache evictions.

incidents(trace) -> one row per incident, in trace order:
    step     the engine step (-1 outside steps)
    t_s      host time of the event (seconds since the run started; events inside a step have no simulated time
             of their own: place them at their step's on the simulated clock, kvscope.analysis.steps)
    kind     preempt, swap_out, swap_in, oom, reject, block_evict (the event kind's name)
    seq      the sequence (-1 if none: evictions)
    tokens   preempt: tokens the sequence held; oom: tokens the failed allocation asked for; reject: tokens the
             sequence would need; else 0
    blocks   swap_out / swap_in: blocks moved; else 0
    bytes    swap_out / swap_in: bytes moved; oom: bytes asked for; else 0
    block    block_evict: the prefix-cache block evicted; else -1
    mode     preempt: "swap" or "recompute"; else ""
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached, select
from kvscope.events import KIND_NAMES, Kind

INCIDENT_KINDS = (Kind.PREEMPT, Kind.SWAP_OUT, Kind.SWAP_IN, Kind.OOM, Kind.REJECT, Kind.BLOCK_EVICT)
INCIDENT_COLUMNS = ["step", "t_s", "kind", "seq", "tokens", "blocks", "bytes", "block", "mode"]
_SWAP_PREEMPTION = 1  # PREEMPT aux


def incidents(trace) -> pd.DataFrame:
    """Every incident of the trace (see the module docstring)."""
    return cached(trace, "incidents", lambda: _build(trace)).copy()


def _build(trace) -> pd.DataFrame:
    rows = select(trace, *INCIDENT_KINDS)
    code = rows["code"].to_numpy()
    n = rows["n"].to_numpy(np.int64)
    size = rows["bytes"].to_numpy(np.int64)
    evict = code == int(Kind.BLOCK_EVICT)
    swap = np.isin(code, [int(Kind.SWAP_OUT), int(Kind.SWAP_IN)])
    preempt = code == int(Kind.PREEMPT)
    kind_names = [KIND_NAMES[k] for k in INCIDENT_KINDS]
    frame = pd.DataFrame(
        {
            "step": rows["step"].to_numpy(np.int64),
            "t_s": rows["t_ns"].to_numpy(np.float64) / 1e9,
            "kind": pd.Categorical(np.array(KIND_NAMES, dtype=object)[code] if len(code) else [], kind_names),
            "seq": rows["seq"].to_numpy(np.int64),
            "tokens": np.where(np.isin(code, [int(Kind.PREEMPT), int(Kind.OOM), int(Kind.REJECT)]), n, 0),
            "blocks": np.where(swap, n, 0),
            "bytes": np.where(swap | (code == int(Kind.OOM)), size, 0),
            "block": np.where(evict, rows["block"].to_numpy(np.int64), -1),
            "mode": np.where(
                preempt, np.where(rows["aux"].to_numpy() == _SWAP_PREEMPTION, "swap", "recompute"), ""
            ).astype(object),
        }
    )
    return frame[INCIDENT_COLUMNS]
