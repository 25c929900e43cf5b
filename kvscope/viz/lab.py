"""Figures of the policy lab (kvscope.lab.sweep rows in, plotly figures out): hit rate against capacity per policy,
hit rate against the prediction error, and misses by cause. Rows are selected, never recomputed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvscope.viz._common import base_layout, empty_figure, esc, numeric, require_columns
from kvscope.viz.palette import AMBER, DARK_GREY, GREY, QUALITATIVE, RED, TEAL, series_color

# More policies than palette colours: the second round of colours is dashed, with other markers.
_DASHES = ("solid", "dash", "dot")
_SYMBOLS = ("circle", "diamond", "square")
CAPACITY_COLUMNS = ["policy", "capacity_blocks", "prediction_error", "hit_rate"]
CAUSE_COLUMNS = [
    "policy",
    "capacity_blocks",
    "prediction_error",
    "hit_blocks",
    "miss_cold",
    "miss_evicted",
    "miss_gap",
    "miss_capacity",
]
CAUSES = (  # (column, label, colour)
    ("hit_blocks", "hit", TEAL),
    ("miss_cold", "cold (first use)", GREY),
    ("miss_evicted", "evicted", RED),
    ("miss_gap", "behind a missing block", AMBER),
    ("miss_capacity", "deeper than the cache", DARK_GREY),
)


def _one_error(rows: pd.DataFrame, error: float | None) -> pd.DataFrame:
    """Rows without predictions, plus prediction rows at `error` (default: the smallest error in the rows)."""
    p = numeric(rows["prediction_error"])
    if error is None:
        error = float(np.nanmin(p)) if np.isfinite(p).any() else 0.0
    return rows[np.isnan(p) | np.isclose(p, error)]


def hit_rate_vs_capacity_figure(
    rows: pd.DataFrame,
    *,
    error: float | None = None,
    max_hit_rate: float | None = None,
    tokens_per_block: int | None = None,
    title: str = "Prefix-cache hit rate against capacity",
) -> go.Figure:
    """One line per policy (prediction policies at one prediction error); the dashed line is an unbounded cache."""
    require_columns(rows, CAPACITY_COLUMNS, "lab hit rate")
    if rows.empty:
        return empty_figure(title, "no lab rows")
    shown = _one_error(rows, error)
    fig = go.Figure()
    for i, (policy, part) in enumerate(shown.groupby("policy", sort=False)):
        part = part.sort_values("capacity_blocks")
        cap = numeric(part["capacity_blocks"])
        tokens = cap * tokens_per_block if tokens_per_block else None
        p = numeric(part["prediction_error"])
        name = esc(policy) + (f" (p={p[0]:g})" if np.isfinite(p[0]) else "")
        fig.add_trace(
            go.Scatter(
                x=cap,
                y=numeric(part["hit_rate"]),
                mode="lines+markers",
                name=name,
                line=dict(color=series_color(i), dash=_DASHES[(i // len(QUALITATIVE)) % len(_DASHES)], width=2),
                marker=dict(symbol=_SYMBOLS[(i // len(QUALITATIVE)) % len(_SYMBOLS)], size=6),
                customdata=tokens,
                hovertemplate="%{x:,} blocks"
                + (" (%{customdata:,.0f} tokens)" if tokens is not None else "")
                + "<br>hit rate %{y:.1%}<extra>"
                + name
                + "</extra>",
            )
        )
    if max_hit_rate is not None:
        fig.add_hline(
            y=max_hit_rate,
            line_dash="dash",
            line_color=DARK_GREY,
            annotation_text=f"unbounded cache {max_hit_rate:.1%}",
            annotation_position="top left",
        )
    fig.update_xaxes(
        type="log", title="capacity (blocks" + (f" of {tokens_per_block} tokens)" if tokens_per_block else ")")
    )
    fig.update_yaxes(title="block hit rate", tickformat=".0%", rangemode="tozero")
    return base_layout(fig, title, height=460)


def hit_rate_vs_error_figure(rows: pd.DataFrame, *, capacity: int | None = None, title: str | None = None) -> go.Figure:
    """Prediction policies' hit rate against the flip probability p at one capacity (default: the largest with
    several errors), with the policies that take no predictions at that capacity as horizontal references."""
    require_columns(rows, CAPACITY_COLUMNS, "lab hit rate vs error")
    p = numeric(rows["prediction_error"])
    pred = rows[np.isfinite(p)]
    if pred.empty:
        return empty_figure(title or "Hit rate against prediction error", "no policy with predictions in these rows")
    if capacity is None:
        counts = pred.groupby("capacity_blocks")["prediction_error"].nunique()
        capacity = int(counts[counts == counts.max()].index.max())
    title = title or f"Hit rate against prediction error (capacity {capacity:,} blocks)"
    fig = go.Figure()
    at = pred[pred["capacity_blocks"] == capacity]
    for i, (policy, part) in enumerate(at.groupby("policy", sort=False)):
        part = part.sort_values("prediction_error")
        fig.add_trace(
            go.Scatter(
                x=numeric(part["prediction_error"]),
                y=numeric(part["hit_rate"]),
                mode="lines+markers",
                name=esc(policy),
                line=dict(color=series_color(i)),
            )
        )
    refs = rows[~np.isfinite(p) & (rows["capacity_blocks"] == capacity)]
    for _, row in refs.iterrows():
        fig.add_hline(
            y=float(row["hit_rate"]),
            line_dash="dot",
            line_color=DARK_GREY,
            annotation_text=esc(row["policy"]),
            annotation_position="top left",
        )
    fig.update_xaxes(title="prediction error p (each bit flipped with probability p)", range=[-0.02, 1.02])
    fig.update_yaxes(title="block hit rate", tickformat=".0%", rangemode="tozero")
    return base_layout(fig, title, height=440)


def miss_causes_figure(
    rows: pd.DataFrame, *, capacity: int | None = None, error: float | None = None, title: str | None = None
) -> go.Figure:
    """Every prompt block of the workload, per policy at one capacity (default: the median one): hit, or missed
    for which reason. The bars have equal length (the workload's blocks): the classes sum to the misses."""
    require_columns(rows, CAUSE_COLUMNS, "lab miss causes")
    if rows.empty:
        return empty_figure(title or "Misses by cause", "no lab rows")
    caps = np.sort(rows["capacity_blocks"].unique())
    if capacity is None:
        capacity = int(caps[len(caps) // 2])
    title = title or f"Prompt blocks by outcome (capacity {capacity:,} blocks)"
    at = _one_error(rows[rows["capacity_blocks"] == capacity], error)
    if at.empty:
        return empty_figure(title, f"no rows at capacity {capacity}")
    labels = [esc(p) for p in at["policy"]]
    fig = go.Figure()
    for column, label, colour in CAUSES:
        fig.add_trace(
            go.Bar(
                y=labels,
                x=numeric(at[column]),
                name=label,
                orientation="h",
                marker_color=colour,
                hovertemplate="%{y}: %{x:,} blocks<extra>" + label + "</extra>",
            )
        )
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title="prompt blocks")
    fig.update_yaxes(autorange="reversed")
    return base_layout(fig, title, height=max(300, 40 + 28 * len(at)))
