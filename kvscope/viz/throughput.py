"""Throughput timeline: tokens/s, tokens per step (prefill + decode) with the batch size, step time, achieved
memory bandwidth (real devices only: KV bytes over the whole forward pass's GPU time, and over the attention
kernels' own time against the copy ceiling the run measured) and preemption markers, on one shared step axis."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvscope.viz._common import (
    MAX_TIMELINE_POINTS,
    base_layout,
    bin_steps,
    empty_figure,
    has_values,
    line_trace,
    numeric,
)
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
#: Optional columns: the attention kernels' own time and bandwidth, and the copy ceiling measured at the run's start.
ATTENTION_COLUMNS = ["attention_ms", "attention_tbps", "copy_ceiling_tbps"]
#: The attention-only bandwidth line (the forward-pass line keeps TBPS_COLOR).
ATTENTION_COLOR = "#d62728"


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
    means += [c for c in ATTENTION_COLUMNS if c in timeline]  # traces with attention timings (issue 14)
    how = {c: "mean" for c in means} | {"preemptions": "sum", "driver_ms": "mean"}
    df, width = bin_steps(timeline.sort_values("step"), max_points, how)
    x = numeric(df["step"])
    show_attn = "attention_tbps" in df and has_values(df, "attention_tbps")
    show_tbps = has_values(df, "achieved_tbps") or show_attn
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
    hover = "<extra>step %{x}</extra>"
    fig.add_trace(line_trace(x, tps, "tokens/s", DECODE_COLOR, "%{y:,.0f} tokens/s" + hover, width=1.5), row=1, col=1)
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
                hovertemplate="%{customdata:.0f} preemption(s)" + hover,
            ),
            row=1,
            col=1,
        )
    for col, name, color in (
        ("prefill_tokens", "prefill tokens", PREFILL_COLOR),
        ("decode_tokens", "decode tokens", DECODE_COLOR),
    ):
        fig.add_trace(
            line_trace(
                x,
                numeric(df[col]),
                name,
                color,
                "%{y:,.1f} " + name + hover,
                width=0.5,
                stackgroup="tokens",
                fillcolor=color,
            ),
            row=2,
            col=1,
            secondary_y=False,
        )
    batch = line_trace(
        x,
        numeric(df["batch"]),
        "batch size (sequences)",
        BATCH_COLOR,
        "%{y:.1f} sequences" + hover,
        width=1.5,
        dash="dot",
    )
    fig.add_trace(batch, row=2, col=1, secondary_y=True)
    # Step time and what part of it the GPU and the VMM driver took; a series with no values is not drawn.
    timing = [
        (1000 * numeric(df["dur_s"]), "step wall time (ms)", "#333", "%{y:.3f} ms step", True),
        (numeric(df["kernel_ms"]), "GPU forward time (ms)", KERNEL_COLOR, "%{y:.3f} ms GPU", show_kernel),
        (numeric(df["driver_ms"]), "VMM driver calls (ms)", DRIVER_COLOR, "%{y:.3f} ms in driver calls", show_driver),
    ]
    for y, name, color, text, shown in timing:
        if shown:
            fig.add_trace(line_trace(x, y, name, color, text + hover), row=3, col=1)
    if show_tbps:
        tbps = numeric(df["achieved_tbps"])
        name = "KV bytes read / whole forward pass GPU time (TB/s)"
        fig.add_trace(line_trace(x, tbps, name, TBPS_COLOR, "%{y:.2f} TB/s (forward)" + hover, width=1), row=4, col=1)
        if show_attn:
            attn = numeric(df["attention_tbps"])
            name = "attention kernels' KV read bandwidth (TB/s)"
            fig.add_trace(
                line_trace(x, attn, name, ATTENTION_COLOR, "%{y:.2f} TB/s (attention)" + hover, width=1.5),
                row=4,
                col=1,
            )
        ceiling = numeric(df["copy_ceiling_tbps"]) if "copy_ceiling_tbps" in df else np.array([np.nan])
        if np.isfinite(ceiling).any():
            value = float(np.nanmax(ceiling))
            fig.add_hline(
                y=value,
                line=dict(color="#888", dash="dash", width=1),
                annotation_text=f"copy ceiling {value:.2f} TB/s (measured at start)",
                annotation_position="top left",
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
