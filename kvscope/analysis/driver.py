"""VMM driver / OS calls: one row per timed call (cuMemCreate, cuMemMap, cuMemSetAccess, ...), and their stats."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis._events import DRIVER_KINDS, cached, config_value, select
from kvscope.events import KIND_NAMES, Kind

CALL_COLUMNS = ["step", "kind", "dur_us", "call", "page", "bytes", "t_s"]

# What each event times, per backend (kvscope.backends): the CUDA driver API, or the OS calls of the cpu backend.
CALL_NAMES: dict[str, dict[Kind, str]] = {
    "cuda": {
        Kind.VMM_RESERVE: "cuMemAddressReserve",
        Kind.PAGE_CREATE: "cuMemCreate",
        Kind.PAGE_MAP: "cuMemMap",
        Kind.PAGE_ACCESS: "cuMemSetAccess",
        Kind.PAGE_UNMAP: "cuMemUnmap",
        Kind.PAGE_RELEASE: "cuMemRelease",
    },
    "cpu": {
        Kind.VMM_RESERVE: "mmap(PROT_NONE)",
        Kind.PAGE_CREATE: "memfd_create+ftruncate",
        Kind.PAGE_MAP: "mmap(MAP_FIXED)",
        Kind.PAGE_ACCESS: "mprotect",
        Kind.PAGE_UNMAP: "munmap",
        Kind.PAGE_RELEASE: "close",
    },
}


def driver_calls(trace) -> pd.DataFrame:
    """One row per timed VMM call, in trace order: step (-1 for setup before the first step), kind (event kind:
    vmm_reserve, page_create, page_map, page_access, page_unmap, page_release), dur_us, call (the driver / OS
    function it timed on this trace's backend; the kind again on the sim backend), page (page id, -1 for
    vmm_reserve), bytes, t_s (host time of the call)."""
    return cached(trace, "driver_calls", lambda: _build(trace)).copy()


def _build(trace) -> pd.DataFrame:
    rows = select(trace, *DRIVER_KINDS)
    names = CALL_NAMES.get(str(config_value(trace, "backend", "")), {})
    kind = np.array(KIND_NAMES, dtype=object)[rows["code"].to_numpy()] if len(rows) else np.array([], object)
    frame = pd.DataFrame(
        {
            "step": rows["step"].to_numpy(np.int64),
            "kind": pd.Categorical(kind, categories=[KIND_NAMES[k] for k in DRIVER_KINDS]),
            "dur_us": rows["dur_ns"].to_numpy(np.float64) / 1e3,
            "call": [names.get(Kind(c), KIND_NAMES[c]) for c in rows["code"].tolist()],
            "page": rows["block"].to_numpy(np.int64),
            "bytes": rows["bytes"].to_numpy(np.int64),
            "t_s": rows["t_ns"].to_numpy(np.float64) / 1e9,
        }
    )
    return frame[CALL_COLUMNS]


def driver_stats(trace) -> pd.DataFrame:
    """Per call kind: kind, call, count, total_ms, median_us, p90_us, p99_us, max_us (kinds never called left out)."""
    calls = driver_calls(trace)
    if calls.empty:
        return pd.DataFrame(
            {
                "kind": pd.Series([], dtype=object),
                "call": pd.Series([], dtype=object),
                "count": pd.Series([], dtype="int64"),
                **{c: pd.Series([], dtype="float64") for c in ("total_ms", "median_us", "p90_us", "p99_us", "max_us")},
            }
        )
    g = calls.groupby("kind", observed=True)["dur_us"]
    stats = pd.DataFrame(
        {
            "count": g.size().astype("int64"),
            "total_ms": g.sum() / 1e3,
            "median_us": g.median(),
            "p90_us": g.quantile(0.9),
            "p99_us": g.quantile(0.99),
            "max_us": g.max(),
        }
    )
    stats["call"] = calls.drop_duplicates("kind").set_index("kind")["call"].reindex(stats.index).to_numpy()
    stats = stats.reset_index()
    stats["kind"] = stats["kind"].astype(str)
    return stats[["kind", "call", "count", "total_ms", "median_us", "p90_us", "p99_us", "max_us"]]
