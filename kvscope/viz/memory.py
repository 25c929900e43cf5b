"""Memory stack over time: where every byte of the KV pool is at each step, and the two usage figures that people
confuse (vLLM's block usage vs the share of token slots actually filled)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvscope.viz._common import (
    MAX_TIMELINE_POINTS,
    base_layout,
    bin_steps,
    byte_unit,
    empty_figure,
    line_trace,
    numeric,
)
from kvscope.viz._common import require_columns as _require
from kvscope.viz.palette import (
    LOGICAL_LINE_COLOR,
    MEMORY_BANDS,
    PEAK_RESERVED_COLOR,
    PEAK_USED_COLOR,
    USAGE_LINE_COLOR,
    state_color,
    state_label,
)

TIMELINE_COLUMNS = ["step", *MEMORY_BANDS, "capacity", "block_usage_frac", "token_usage_frac"]
TITLE = "KV memory by state over time"


def memory_stack_figure(
    timeline: pd.DataFrame, *, title: str = TITLE, max_points: int = MAX_TIMELINE_POINTS
) -> go.Figure:
    """Stacked bands (used, internal, reservation, mapped-idle, cached-idle, free; they add up to capacity) against
    the step, with block usage (reserved / capacity, what vLLM reports) and token-slot usage (used / capacity) on
    a right-hand percent axis. The bands are the books at each step's end (after its releases); where the timeline
    has in-step peaks (peak_reserved / peak_used), two step lines show the most reserved and used at any instant of
    each step (a request that finishes in a step still holds its memory during it). Input:
    analysis.memory.memory_timeline(trace)."""
    _require(timeline, TIMELINE_COLUMNS, "memory stack")
    if timeline.empty:
        return empty_figure(title, "no memory samples in this trace")
    how = {c: "mean" for c in [*MEMORY_BANDS, "capacity", "logical", "used", "block_usage_frac", "token_usage_frac"]}
    peak_lines = [c for c in ("peak_reserved", "peak_used") if c in timeline.columns]
    how |= {c: "max" for c in peak_lines}  # a bin's peak is the most of its steps' peaks, never a mean
    df, width = bin_steps(timeline.sort_values("step"), max_points, how)
    steps = numeric(df["step"])
    div, unit = byte_unit(float(np.nanmax(numeric(df["capacity"]))) if len(df) else 0.0)

    fig = go.Figure()
    for band in MEMORY_BANDS:
        values = numeric(df[band]) / div
        if band != "free" and not np.any(values > 0):
            continue  # a band this allocator never has (cached-idle in a static run): keep the legend short
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=values,
                name=state_label(band),
                stackgroup="memory",
                mode="lines",
                line=dict(width=0.5, color=state_color(band)),
                fillcolor=state_color(band),
                hovertemplate=f"%{{y:.3f}} {unit}<extra>{state_label(band)}</extra>",
            )
        )
    if "logical" in df.columns:
        logical = numeric(df["logical"])
        if np.any(np.abs(logical - numeric(df["used"])) > 0):
            # Only drawn when sharing changes something: the gap to `used` is what sharing saved.
            name = "logical (tokens without sharing)"
            hover = f"%{{y:.3f}} {unit}<extra>logical, no sharing</extra>"
            fig.add_trace(line_trace(steps, logical / div, name, LOGICAL_LINE_COLOR, hover, width=1.5, dash="dot"))
    for column, color, what in (
        ("peak_reserved", PEAK_RESERVED_COLOR, "reserved"),
        ("peak_used", PEAK_USED_COLOR, "used"),
    ):
        if column not in peak_lines:
            continue
        name = f"in-step peak {what}" + ("" if width == 1 else f" (max of each {width}-step bin)")
        hover = f"%{{y:.3f}} {unit}<extra>most {what} at any instant of the step</extra>"
        fig.add_trace(line_trace(steps, numeric(df[column]) / div, name, color, hover, width=1.2, line_shape="hv"))
    # The two usage figures people confuse, on the right-hand percent axis: solid what vLLM reports, dashed the truth.
    usage_lines = [
        (
            "block_usage_frac",
            "block usage % (vLLM kv_cache_usage: reserved / capacity)",
            None,
            "block usage (reserved / capacity)",
        ),
        ("token_usage_frac", "token-slot usage % (used / capacity)", "dash", "token slots filled (used / capacity)"),
    ]
    for column, name, dash, what in usage_lines:
        y = 100 * numeric(df[column])
        hover = f"%{{y:.1f}}%<extra>{what}</extra>"
        fig.add_trace(line_trace(steps, y, name, USAGE_LINE_COLOR, hover, width=2, dash=dash, yaxis="y2"))
    xlabel = (
        "engine step (bands: books at the step's end)"
        if width == 1
        else (f"engine step (bands: mean of each {width}-step bin of the books at steps' ends)")
    )
    base_layout(
        fig,
        title,
        height=460,
        hovermode="x unified",
        xaxis=dict(title=dict(text=xlabel)),
        yaxis=dict(title=dict(text=f"KV memory ({unit})"), rangemode="tozero"),
        yaxis2=dict(
            title=dict(text="usage (% of capacity)"),
            overlaying="y",
            side="right",
            range=[0, 105],
            tickmode="auto",  # plotly aligns an overlaying axis's ticks to the main one by default ('sync')
            ticksuffix="%",
            showgrid=False,
        ),
        legend=dict(orientation="h", yanchor="top", y=-0.22, x=0),
        margin=dict(l=70, r=70, t=70, b=150),
    )
    return fig
