"""Driver-call latency: how long each kind of VMM call (cuMemCreate, cuMemMap, cuMemSetAccess, ...) took."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvscope.viz._common import base_layout, empty_figure, esc, numeric
from kvscope.viz._common import require_columns as _require
from kvscope.viz.palette import series_color

CALL_COLUMNS = ["step", "kind", "dur_us"]
TITLE = "VMM driver-call latency"
# What each event kind times, for the legend (kvscope.events documents the kinds).
CALL_NAMES = {
    "vmm_reserve": "reserve (cuMemAddressReserve)",
    "page_create": "page create (cuMemCreate)",
    "page_map": "page map (cuMemMap)",
    "page_access": "set access (cuMemSetAccess)",
    "page_unmap": "page unmap (cuMemUnmap)",
    "page_release": "page release (cuMemRelease)",
}


def driver_latency_figure(calls: pd.DataFrame, *, title: str = TITLE, bins: int = 60) -> go.Figure:
    """Input: analysis.driver.driver_calls(trace) (step, kind, dur_us). One outlined histogram per call kind on
    log-spaced bins (latencies span microseconds to milliseconds). The browser gets the bin counts, never one
    value per call, so a run with millions of calls costs the same as one with ten."""
    _require(calls, CALL_COLUMNS, "driver-call latency")
    dur = numeric(calls["dur_us"])
    ok = np.isfinite(dur) & (dur > 0)
    if not ok.any():
        return empty_figure(title, "no timed driver calls in this trace (not a VMM run, or the sim backend)")
    kinds = calls["kind"].astype(str).to_numpy()[ok]
    dur = dur[ok]
    lo, hi = float(dur.min()), float(dur.max())
    edges = np.geomspace(lo, hi * 1.0001, bins + 1) if hi > lo else np.array([lo * 0.9, lo * 1.1])
    fig = go.Figure()
    for i, kind in enumerate(sorted(set(kinds))):
        counts, _ = np.histogram(dur[kinds == kind], bins=edges)
        # Step outline: each bin's count held flat from its left edge to its right edge.
        x = np.repeat(edges, 2)[1:-1]
        y = np.repeat(counts, 2)
        label = CALL_NAMES.get(kind, esc(kind))
        name = f"{label}: {int(counts.sum()):,} calls"
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines",
                name=name,
                line=dict(color=series_color(i), width=1.5),
                fill="tozeroy",
                opacity=0.6,
                hovertemplate="%{y:,} calls near %{x:.3g} µs<extra>" + label + "</extra>",
            )
        )
    base_layout(
        fig,
        title,
        height=400,
        hovermode="closest",
        xaxis=dict(title=dict(text="call duration (µs, log scale)"), type="log"),
        yaxis=dict(title=dict(text="calls per bin"), rangemode="tozero"),
    )
    return fig
