"""Comparison of several runs: one small bar chart per summary figure, one colour per run in every chart."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kvscope.viz._common import base_layout, byte_unit, empty_figure, esc, numeric, truncate
from kvscope.viz._common import require_columns as _require
from kvscope.viz.palette import series_color

TITLE = "Runs compared"


@dataclass(frozen=True)
class Metric:
    column: str
    title: str
    unit: str  # "bytes" (scaled to a binary unit), "fraction" (shown as %), or a unit name shown as is


# Shown in this order when the column is present; compare_runs may add more (pass `metrics=` to choose).
METRICS: list[Metric] = [
    Metric("peak_reserved_bytes", "peak KV reserved", "bytes"),
    Metric("peak_used_bytes", "peak KV used (token states)", "bytes"),
    Metric("mean_waste_fraction", "mean waste (share of reserved)", "fraction"),
    Metric("tokens_per_s", "throughput", "tokens/s"),
    Metric("generated_tokens", "tokens generated", "tokens"),
    Metric("finished", "requests finished", "requests"),
    Metric("preemptions", "preemptions", "count"),
    Metric("sharing_saved_bytes_peak", "sharing savings (peak)", "bytes"),
    Metric("prefix_hit_tokens", "prefix-cache hit tokens", "tokens"),
    Metric("steps", "engine steps", "steps"),
]


def _worth_a_panel(column: pd.Series, explicit: list[Metric] | None) -> bool:
    """A default panel needs a non-zero value somewhere (no empty 'prefix-cache hits' panel when no run caches);
    a metric asked for by name is drawn whenever it has a number."""
    values = numeric(column)
    finite = values[np.isfinite(values)]
    return finite.size > 0 and (explicit is not None or bool(np.any(finite != 0)))


def comparison_figure(
    runs: pd.DataFrame, *, metrics: list[Metric] | None = None, title: str = TITLE, cols: int = 3
) -> go.Figure:
    """Input: analysis.compare.compare_runs(traces) (one row per trace: label + summary figures). Every metric
    whose column is present and numeric gets a panel; run `label`s name the bars and keep one colour per run."""
    _require(runs, ["label"], "run comparison")
    if runs.empty:
        return empty_figure(title, "no runs to compare")
    chosen = [m for m in (metrics or METRICS) if m.column in runs.columns and _worth_a_panel(runs[m.column], metrics)]
    if not chosen:
        return empty_figure(title, "the runs have no summary figures in common")
    labels = [esc(truncate(str(v), 40)) for v in runs["label"]]
    cols = min(cols, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    panel_titles = []
    scaled: list[tuple[np.ndarray, str, str]] = []
    for m in chosen:
        values = numeric(runs[m.column])
        if m.unit == "bytes":
            div, unit = byte_unit(float(np.nanmax(np.abs(values))))
            scaled.append((values / div, unit, "%{y:.3f} " + unit))
        elif m.unit == "fraction":
            scaled.append((100 * values, "%", "%{y:.1f}%"))
        else:
            scaled.append((values, m.unit, "%{y:,.4g} " + m.unit))
        panel_titles.append(f"{m.title} ({scaled[-1][1]})")
    height = 230 * rows + 110
    # ~80 px between rows whatever the number of rows (plotly takes the gap as a fraction of the height).
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=panel_titles, vertical_spacing=80 / height, horizontal_spacing=0.08
    )
    colors = [series_color(i) for i in range(len(labels))]
    for i, (values, _unit, fmt) in enumerate(scaled):
        r, c = divmod(i, cols)
        fig.add_trace(
            go.Bar(
                x=labels,
                y=values,
                marker=dict(color=colors),
                showlegend=False,
                name=chosen[i].title,
                hovertemplate="%{x}: " + fmt + "<extra></extra>",
            ),
            row=r + 1,
            col=c + 1,
        )
        fig.update_yaxes(rangemode="tozero", row=r + 1, col=c + 1)
    # One legend entry per run, in the run's colour, shared by all panels.
    for label, color in zip(labels, colors, strict=True):
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="markers", name=label, marker=dict(symbol="square", size=12, color=color)
            )
        )
    base_layout(fig, title, height=height, hovermode="closest", legend=dict(title=dict(text="run")))
    return fig
