"""Why each miss happened, per request and per block, from one replay run with `explain=True` (pure functions,
DataFrames out). Causes: cold, evicted (by which request, how long before), gap, capacity (kvscope.lab.replay)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.lab.accesses import BlockAccesses
from kvscope.lab.replay import Replay

CAUSES = ("hit", "cold", "evicted", "gap", "capacity")


def block_causes(acc: BlockAccesses, rep: Replay) -> np.ndarray:
    """The outcome of every access (flat positions) as an index into CAUSES."""
    if rep.evicted_by is None:
        raise ValueError("miss causes need a replay run with explain=True")
    n = acc.num_blocks
    req = acc.request_of
    j = np.arange(n) - acc.offsets[req]
    out = np.full(n, CAUSES.index("evicted"), dtype=np.int8)
    out[j < rep.hits[req]] = CAUSES.index("hit")
    missed = j >= rep.hits[req]
    out[missed & acc.first_use] = CAUSES.index("cold")
    deep = missed & ~acc.first_use & (j >= rep.capacity)
    out[deep] = CAUSES.index("capacity")
    # A missed, non-cold, in-reach block that no eviction lost was cached all along: behind a missing block.
    out[missed & ~acc.first_use & ~deep & (rep.evicted_by < 0)] = CAUSES.index("gap")
    return out


def request_causes(acc: BlockAccesses, rep: Replay) -> pd.DataFrame:
    """One row per request: its blocks and how many were hit or missed for each cause (they sum to blocks)."""
    causes = block_causes(acc, rep)
    req = acc.request_of
    frame = pd.DataFrame({"request": acc.request_ids, "arrival_s": acc.arrival_s, "blocks": np.diff(acc.offsets)})
    for i, name in enumerate(CAUSES):
        frame[name] = np.bincount(req[causes == i], minlength=acc.num_requests)
    return frame


def request_blocks(acc: BlockAccesses, rep: Replay, request: int) -> pd.DataFrame:
    """The blocks of one request: position, key, tokens, outcome and, for evicted ones, the request whose eviction
    lost the block and how many seconds before this request that was."""
    lo, hi = int(acc.offsets[request]), int(acc.offsets[request + 1])
    causes = block_causes(acc, rep)[lo:hi]
    assert rep.evicted_by is not None  # block_causes checked it
    by = rep.evicted_by[lo:hi]
    ids = np.asarray(acc.request_ids, dtype=object)
    return pd.DataFrame(
        {
            "position": np.arange(hi - lo),
            "block": acc.keys[lo:hi],
            "tokens": acc.fill[lo:hi],
            "outcome": [CAUSES[c] for c in causes],
            "evicted_by": np.where(by >= 0, ids[np.maximum(by, 0)], None),
            "evicted_s_before": np.where(by >= 0, acc.arrival_s[request] - acc.arrival_s[np.maximum(by, 0)], np.nan),
        }
    )
