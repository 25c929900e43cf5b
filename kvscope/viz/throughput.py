"""Throughput timeline: tokens/s, tokens per step (prefill + decode) with the batch size, step time, achieved
memory bandwidth (real devices only) and preemption markers, on one shared step axis."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvscope.viz._common import MAX_TIMELINE_POINTS, base_layout, bin_steps, empty_figure, has_values, numeric
from kvscope.viz._common import require_columns as _require
from kvscope.viz.palette import (
    BATCH_COLOR,
    DECODE_COLOR,
    DRIVER_COLOR,
    KERNEL_COLOR,
    PREEMPT_COLOR,
    PREFILL_COLOR,
    TBPS_COLOR,
)

TIMELINE_COLUMNS = [
    "step",
    "dur_s",
    "batch",
    "prefill_tokens",
    "decode_tokens",
    "tokens_per_s",
    "kernel_ms",
    "achieved_tbps",
    "preemptions",
    "driver_ms",
]
TITLE = "Throughput, batch and step time"


def throughput_figure(
    timeline: pd.DataFrame, *, title: str = TITLE, max_points: int = MAX_TIMELINE_POINTS
) -> go.Figure:
    """Input: analysis.throughput.throughput_timeline(trace). Rows: tokens/s (with preemption markers); tokens per
    step, prefill and decode stacked, batch size on the right axis; step wall time with GPU kernel time and VMM
    driver time; achieved TB/s when the trace has kernel timings."""
    _require(timeline, TIMELINE_COLUMNS, "throughput timeline")
    if timeline.empty:
        return empty_figure(title, "no engine steps in this trace")
    means = ["dur_s", "batch", "prefill_tokens", "decode_tokens", "tokens_per_s", "kernel_ms", "achieved_tbps"]
    how = {c: "mean" for c in means} | {"preemptions": "sum", "driver_ms": "mean"}
    df, width = bin_steps(timeline.sort_values("step"), max_points, how)
    x = numeric(df["step"])
    show_tbps = has_values(df, "achieved_tbps")
    show_kernel = has_values(df, "kernel_ms")
    show_driver = has_values(df, "driver_ms")
    rows = 4 if show_tbps else 3
    per = "" if width == 1 else f" (mean per {width}-step bin)"
    titles = ["tokens / s" + per, "tokens per step and batch size" + per, "step time" + per]
    if show_tbps:
        titles.append("achieved KV read bandwidth" + per)
    specs = [[{}], [{"secondary_y": True}], [{}]] + ([[{}]] if show_tbps else [])
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.07, subplot_titles=titles, specs=specs)

    tps = numeric(df["tokens_per_s"])
    fig.add_trace(
        go.Scatter(
            x=x,
            y=tps,
            name="tokens/s",
            mode="lines",
            line=dict(color=DECODE_COLOR, width=1.5),
            hovertemplate="%{y:,.0f} tokens/s<extra>step %{x}</extra>",
        ),
        row=1,
        col=1,
    )
    pre = numeric(df["preemptions"])
    hit = np.isfinite(pre) & (pre > 0)
    if hit.any():
        fig.add_trace(
            go.Scatter(
                x=x[hit],
                y=tps[hit],
                name="preemption(s)",
                mode="markers",
                marker=dict(symbol="x", size=9, color=PREEMPT_COLOR, line=dict(width=1)),
                customdata=pre[hit],
                hovertemplate="%{customdata:.0f} preemption(s)<extra>step %{x}</extra>",
            ),
            row=1,
            col=1,
        )
    for col, name, color in (
        ("prefill_tokens", "prefill tokens", PREFILL_COLOR),
        ("decode_tokens", "decode tokens", DECODE_COLOR),
    ):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=numeric(df[col]),
                name=name,
                stackgroup="tokens",
                mode="lines",
                line=dict(width=0.5, color=color),
                fillcolor=color,
                hovertemplate="%{y:,.1f} " + name + "<extra>step %{x}</extra>",
            ),
            row=2,
            col=1,
            secondary_y=False,
        )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=numeric(df["batch"]),
            name="batch size (sequences)",
            mode="lines",
            line=dict(color=BATCH_COLOR, width=1.5, dash="dot"),
            hovertemplate="%{y:.1f} sequences<extra>step %{x}</extra>",
        ),
        row=2,
        col=1,
        secondary_y=True,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=1000 * numeric(df["dur_s"]),
            name="step wall time (ms)",
            mode="lines",
            line=dict(color="#333", width=1.2),
            hovertemplate="%{y:.3f} ms step<extra>step %{x}</extra>",
        ),
        row=3,
        col=1,
    )
    if show_kernel:
        fig.add_trace(
            go.Scatter(
                x=x,
                y=numeric(df["kernel_ms"]),
                name="GPU forward time (ms)",
                mode="lines",
                line=dict(color=KERNEL_COLOR, width=1.2),
                hovertemplate="%{y:.3f} ms GPU<extra>step %{x}</extra>",
            ),
            row=3,
            col=1,
        )
    if show_driver:
        fig.add_trace(
            go.Scatter(
                x=x,
                y=numeric(df["driver_ms"]),
                name="VMM driver calls (ms)",
                mode="lines",
                line=dict(color=DRIVER_COLOR, width=1.2),
                hovertemplate="%{y:.3f} ms in driver calls<extra>step %{x}</extra>",
            ),
            row=3,
            col=1,
        )
    if show_tbps:
        fig.add_trace(
            go.Scatter(
                x=x,
                y=numeric(df["achieved_tbps"]),
                name="achieved TB/s (KV bytes read / GPU time)",
                mode="lines",
                line=dict(color=TBPS_COLOR, width=1.5),
                hovertemplate="%{y:.2f} TB/s<extra>step %{x}</extra>",
            ),
            row=4,
            col=1,
        )
        fig.update_yaxes(title_text="TB/s", rangemode="tozero", row=4, col=1)
    fig.update_yaxes(title_text="tokens/s", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="tokens", rangemode="tozero", row=2, col=1, secondary_y=False)
    fig.update_yaxes(
        title_text="sequences", rangemode="tozero", showgrid=False, tickmode="auto", row=2, col=1, secondary_y=True
    )
    fig.update_yaxes(title_text="ms", rangemode="tozero", row=3, col=1)
    fig.update_xaxes(title_text="engine step", row=rows, col=1)
    base_layout(fig, title, height=240 * rows + 120, hovermode="closest", legend=dict(orientation="v"))
    return fig
