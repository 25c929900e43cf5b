"""Comparison of several runs: one small horizontal bar chart per summary figure (one colour per run in every chart,
the run names once, on the left), and the runs' timelines overlaid on one clock (memory, batch, throughput)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvscope.viz._common import (
    MAX_TIMELINE_POINTS,
    base_layout,
    bin_steps,
    byte_unit,
    empty_figure,
    esc,
    numeric,
    truncate,
)
from kvscope.viz._common import require_columns as _require
from kvscope.viz.palette import series_color

TITLE = "Runs compared"
TIMELINES_TITLE = "Runs over time"
NOTE_CHARS = 100  # the note under the panels wraps at this width (about 700 px: it fits a narrow window)
LABEL_CHARS = 28  # run names are cut to this on the axes (the legend and hover keep the whole name)
TIMELINE_COLUMNS = ["label", "t_s", "reserved", "used", "batch", "tokens_per_s"]


@dataclass(frozen=True)
class Metric:
    column: str
    title: str
    unit: str  # "bytes" (scaled to a binary unit), "fraction" (shown as %), "s" (seconds), or a unit name as is


# Shown in this order when the column is present; compare_runs may add more (pass `metrics=` to choose).
METRICS: list[Metric] = [
    Metric("max_batch", "largest batch", "sequences"),
    Metric("mean_batch", "mean batch", "sequences"),
    Metric("peak_reserved_bytes", "peak KV reserved", "bytes"),
    Metric("peak_used_bytes", "peak KV used (token states)", "bytes"),
    Metric("mean_waste_fraction", "mean waste (share of reserved)", "fraction"),
    Metric("tokens_per_s", "throughput", "tokens/s"),
    Metric("ttft_p50_s", "time to first token, median", "s"),
    Metric("tpot_p50_s", "time per output token, median", "s"),
    Metric("generated_tokens", "tokens generated", "tokens"),
    Metric("finished", "requests finished", "requests"),
    Metric("preemptions", "preemptions", "count"),
    Metric("sharing_saved_bytes_peak", "sharing savings (peak)", "bytes"),
    Metric("prefix_hit_tokens", "prefix-cache hit tokens", "tokens"),
    Metric("steps", "engine steps", "steps"),
]


def _scaled(m: Metric, values: np.ndarray) -> tuple[np.ndarray, str, str]:
    """(values in the panel's unit, unit name, d3 format of the bar text)."""
    finite = values[np.isfinite(values)]
    top = float(np.max(np.abs(finite))) if finite.size else 0.0
    if m.unit == "bytes":
        div, unit = byte_unit(top)
        return values / div, unit, ".3~f"
    if m.unit == "fraction":
        return 100 * values, "%", ".1f"
    if m.unit == "s":
        return (1e3 * values, "ms", ",.1f") if top < 1 else (values, "s", ",.2f")
    return values, m.unit, ",.4~g"  # the bar text: _fmt


def _fmt(value: float, fmt: str) -> str:
    if not np.isfinite(value):
        return "-"
    if fmt.endswith("g"):  # counts and rates: whole numbers with separators, 4 significant digits below 1000
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    text = format(value, fmt.replace("~", ""))
    return text.rstrip("0").rstrip(".") if "~" in fmt and "." in text else text  # d3's ~: no trailing zeros


def comparison_figure(
    runs: pd.DataFrame, *, metrics: list[Metric] | None = None, title: str = TITLE, cols: int = 3
) -> go.Figure:
    """Input: analysis.compare.compare_runs(traces) (one row per trace: label + summary figures). Every metric
    whose column is present and numeric gets a panel of horizontal bars (one per run, the value written on it);
    the run names are the rows, shown once on the left. A figure equal in every run gets no panel: the note
    under the panels lists those with their value."""
    _require(runs, ["label"], "run comparison")
    if runs.empty:
        return empty_figure(title, "no runs to compare")
    candidates = [m for m in (metrics or METRICS) if m.column in runs.columns]
    chosen: list[tuple[Metric, np.ndarray, str, str]] = []
    equal: list[str] = []
    for m in candidates:
        raw = numeric(runs[m.column])
        if not np.isfinite(raw).any() or (metrics is None and not np.any(raw[np.isfinite(raw)] != 0)):
            continue  # nothing to show (no prefix-cache hits when no run caches)
        values, unit, fmt = _scaled(m, raw)
        if metrics is None and len(runs) > 1 and np.all(raw == raw[0]):  # asked for by name: drawn anyway
            equal.append(f"{m.title} {_fmt(values[0], fmt)} {unit}")
            continue
        chosen.append((m, values, unit, fmt))
    if not chosen:
        return empty_figure(title, "the runs have no summary figures that differ")
    labels = [truncate(str(v), LABEL_CHARS) for v in runs["label"]]
    full = [str(v) for v in runs["label"]]
    n = len(labels)
    cols = min(cols, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    panel_px = 24 * n + 30  # bars, plus the panel's x tick labels
    gap_px = 62  # a panel's title and the x ticks of the panel above it
    lines = _note_lines(equal)
    plot_px = rows * panel_px + (rows - 1) * gap_px
    bottom = 60 + 17 * len(lines)
    height = plot_px + 80 + bottom
    fig = make_subplots(
        rows=rows,
        cols=cols,
        shared_yaxes=True,
        subplot_titles=[f"{m.title} ({unit})" for m, _, unit, _ in chosen],
        vertical_spacing=gap_px / plot_px if rows > 1 else 0.0,
        horizontal_spacing=0.04,
    )
    colors = [series_color(i) for i in range(n)]
    y = [esc(v) for v in labels]
    for i, (m, values, unit, fmt) in enumerate(chosen):
        r, c = divmod(i, cols)
        fig.add_trace(
            go.Bar(
                x=values,
                y=y,
                orientation="h",
                marker=dict(color=colors),
                showlegend=False,
                name=m.title,
                text=[_fmt(v, fmt) for v in values],
                textposition="auto",
                cliponaxis=False,
                customdata=[esc(v) for v in full],
                hovertemplate="%{customdata}: %{x:"
                + fmt.replace(".4~g", ".6~g")
                + "} "
                + esc(unit)
                + "<extra></extra>",
            ),
            row=r + 1,
            col=c + 1,
        )
        fig.update_xaxes(rangemode="tozero", nticks=4, row=r + 1, col=c + 1)
    fig.update_yaxes(autorange="reversed", showgrid=False)  # the first run on top, as in the tables
    widest = max(len(v) for v in labels)
    if lines:
        fig.add_annotation(
            text="<br>".join(esc(line) for line in lines),
            x=0,
            y=0,
            xref="paper",
            yref="paper",
            yshift=-34,
            xanchor="left",
            yanchor="top",
            align="left",
            showarrow=False,
            font=dict(size=12, color="#555"),
        )
    base_layout(
        fig,
        title,
        height=height,
        hovermode="closest",
        showlegend=False,
        margin=dict(l=min(260, 7 * widest + 24), r=30, t=80, b=bottom),
    )
    fig.update_annotations(font_size=13, selector=dict(yanchor="bottom"))  # the panel titles
    return fig


def _note_lines(equal: list[str]) -> list[str]:
    """'Equal in every run: ...' wrapped on '; ' into lines of at most NOTE_CHARS (none when nothing is equal), so
    the note never runs past the figure's edge."""
    lines: list[str] = []
    if not equal:
        return lines
    for item in ["Equal in every run:", *(f"{e};" for e in equal[:-1]), equal[-1] + "."]:
        if lines and len(lines[-1]) + 1 + len(item) <= NOTE_CHARS:
            lines[-1] += " " + item
        else:
            lines.append(item)
    return lines


def comparison_timelines_figure(timelines: pd.DataFrame, *, title: str = TIMELINES_TITLE) -> go.Figure:
    """Input: analysis.compare.compare_timelines(traces) (label, t_s, reserved, used, batch, tokens_per_s: one row
    per run and step). Three panels on one time axis, one colour per run: KV memory (solid reserved, dotted used),
    batch size, and generated tokens per second. Past MAX_TIMELINE_POINTS steps a run's steps are averaged in
    equal bins (the axis titles say so)."""
    _require(timelines, TIMELINE_COLUMNS, "run timelines")
    if timelines.empty:
        return empty_figure(title, "no steps recorded in these runs")
    order = list(dict.fromkeys(timelines["label"].astype(str)))
    unit_div, unit = byte_unit(float(np.nanmax(numeric(timelines["reserved"]))))
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.09,
        subplot_titles=[
            f"KV memory ({unit}): solid reserved, dotted used",
            "batch (sequences in the step)",
            "generated tokens / s",
        ],
    )
    binned = 1
    for i, label in enumerate(order):
        run = timelines[timelines["label"].astype(str) == label].sort_values("t_s")
        run = run.assign(step=np.arange(len(run)))
        run, width = bin_steps(
            run,
            MAX_TIMELINE_POINTS // max(1, len(order)),
            {"t_s": "max", "reserved": "mean", "used": "mean", "batch": "mean", "tokens_per_s": "mean"},
        )
        binned = max(binned, width)
        color = series_color(i)
        name = esc(truncate(label, 40))
        t = numeric(run["t_s"])
        series = [
            (1, numeric(run["reserved"]) / unit_div, None, "reserved %{y:.3f} " + unit, True),
            (1, numeric(run["used"]) / unit_div, "dot", "used %{y:.3f} " + unit, False),
            (2, numeric(run["batch"]), None, "batch %{y:,.1f}", False),
            (3, numeric(run["tokens_per_s"]), None, "%{y:,.0f} tokens/s", False),
        ]
        for row, values, dash, hover, legend in series:
            line = dict(color=color, width=1.4) | ({"dash": dash} if dash else {})
            fig.add_trace(
                go.Scatter(
                    x=t,
                    y=values,
                    mode="lines",
                    name=name,
                    legendgroup=name,
                    showlegend=legend,
                    line=line,
                    hovertemplate=f"{name}<br>t %{{x:.3f}} s<br>{hover}<extra></extra>",
                ),
                row=row,
                col=1,
            )
    mean_note = f" (means over bins of {binned} steps)" if binned > 1 else ""
    fig.update_xaxes(title=dict(text=f"time on each run's clock (s){mean_note}"), row=3, col=1)
    for row in (1, 2, 3):
        fig.update_yaxes(rangemode="tozero", row=row, col=1)
    base_layout(
        fig,
        title,
        height=640,
        hovermode="closest",
        legend=dict(title=dict(text="run"), orientation="h", y=-0.12, yanchor="top", x=0),
        margin=dict(l=70, r=30, t=80, b=110),
    )
    return fig
