"""Helpers every figure builder shares: input checks, escaping, display binning, byte units, empty figures.

Binning here is a rendering decision (how many points a browser draws), never a metric: a bin shows the mean (or
sum, for counts) of the rows the analysis layer produced, and the axis title says so.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvscope.viz.palette import TEMPLATE

# Past these sizes views aggregate: a browser stays fluid with a few thousand SVG shapes or ~100k heatmap cells.
MAX_TIMELINE_POINTS = 2000
MAX_GRID_CELLS = 8192
MAX_GANTT_REQUESTS = 1500
MAX_GRAPH_BLOCKS = 300
MAX_TREE_NODES = 400


def esc(value: object) -> str:
    """Text from a trace (request ids, labels, metadata) as plotly text: plotly renders a subset of HTML in hover
    labels, titles and legends, so trace strings are escaped and show as typed."""
    return html.escape(str(value), quote=False)


def require_columns(df: pd.DataFrame, columns: Iterable[str], view: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{view}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{view}: missing column(s) {', '.join(missing)} (have: {', '.join(map(str, df.columns))})")


def base_layout(fig: go.Figure, title: str, *, height: int = 420, **kwargs) -> go.Figure:
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=title, x=0.01, xanchor="left"),
        height=height,
        **kwargs,
    )
    return fig


def empty_figure(title: str, message: str, *, height: int = 260) -> go.Figure:
    """A figure that says why there is nothing to draw (instead of blank axes)."""
    fig = go.Figure()
    fig.add_annotation(text=esc(message), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False, font=dict(size=14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return base_layout(fig, title, height=height)


def byte_unit(max_bytes: float) -> tuple[float, str]:
    """(divisor, unit) so that the largest value reads as 1..1023 of a binary unit."""
    for unit, div in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if max_bytes >= div:
            return float(div), unit
    return 1.0, "B"


def numeric(series: pd.Series) -> np.ndarray:
    """float64 values, missing as NaN (the analysis layer may use nullable ints)."""
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def has_values(df: pd.DataFrame, column: str) -> bool:
    """True when the column exists and holds at least one finite, non-zero value (e.g. TB/s on a real device)."""
    if column not in df.columns or df.empty:
        return False
    v = numeric(df[column])
    return bool(np.any(np.isfinite(v) & (v != 0)))


def bin_steps(
    df: pd.DataFrame, max_points: int, how: Mapping[str, str], *, x: str = "step"
) -> tuple[pd.DataFrame, int]:
    """At most `max_points` rows: consecutive rows grouped by `x` into equal-width bins, each column reduced as
    `how` says ('mean', 'sum', 'max', 'first'). Returns (frame, bin width in `x` units; 1 when nothing was binned).
    The `x` column of a bin is its first value."""
    cols = [c for c in how if c in df.columns]
    if len(df) <= max_points:
        return df, 1
    xs = numeric(df[x])
    lo, hi = np.nanmin(xs), np.nanmax(xs)
    width = max(1, int(np.ceil((hi - lo + 1) / max_points)))
    key = ((xs - lo) // width).astype("int64")
    grouped = df[cols].assign(_bin=key).groupby("_bin", sort=True)
    out = grouped.agg({c: how[c] for c in cols})
    out[x] = (out.index.to_numpy() * width + lo).astype("int64")
    return out.reset_index(drop=True), width


def line_trace(
    x: np.ndarray,
    y: np.ndarray,
    name: str,
    color: str,
    hover: str,
    *,
    width: float = 1.2,
    dash: str | None = None,
    **kw,
) -> go.Scatter:
    """A plain line series: `hover` is the hover template's body (the legend name is not repeated in it)."""
    line = dict(color=color, width=width) | ({"dash": dash} if dash else {})
    return go.Scatter(x=x, y=y, name=name, mode="lines", line=line, hovertemplate=hover, **kw)


def truncate(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
