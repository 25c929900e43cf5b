"""Per-rank KV of a parallel run: one stacked bar per rank (the memory stack at one instant for all ranks) with each
rank's in-step peak of used bytes marked. Draws kvscope.analysis.ranks.rank_table; computes nothing."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from kvscope.analysis.ranks import STACK_FIELDS
from kvscope.viz._common import base_layout, byte_unit, empty_figure, esc, require_columns
from kvscope.viz.palette import STATE_COLORS, state_label

TITLE = "KV memory per rank"


def rank_stacks_figure(table: pd.DataFrame, *, title: str = TITLE) -> go.Figure:
    """Bars: rank_table's memory stack columns, stacked, one bar per rank; diamonds: each rank's peak used."""
    require_columns(table, ["rank", "kv_heads", "capacity_tokens", "peak_used", "stack_step", *STACK_FIELDS], TITLE)
    if table.empty:
        return empty_figure(title, "no ranks")
    div, unit = byte_unit(float(table[list(STACK_FIELDS)].sum(axis=1).max() or 1))
    x = [f"rank {int(r)}" for r in table["rank"]]
    fig = go.Figure()
    slots = zip(table["kv_heads"], table["capacity_tokens"], strict=True)
    hover = [f"heads {esc(h)}<br>{int(c):,} token slots" for h, c in slots]
    for field in STACK_FIELDS:
        fig.add_bar(
            x=x,
            y=table[field] / div,
            name=state_label(field),
            marker_color=STATE_COLORS[field],
            customdata=hover,
            hovertemplate=f"%{{x}} {esc(state_label(field))}: %{{y:.3f}} {unit}<br>%{{customdata}}<extra></extra>",
        )
    fig.add_scatter(
        x=x,
        y=table["peak_used"] / div,
        mode="markers",
        name="peak used (any instant)",
        marker=dict(symbol="diamond", size=11, color="black"),
        hovertemplate=f"%{{x}} peak used: %{{y:.3f}} {unit}<extra></extra>",
    )
    step = int(table["stack_step"].iloc[0])
    fig.update_layout(barmode="stack", yaxis_title=unit, xaxis_title=f"bars: end of step {step:,}" if step >= 0 else "")
    return base_layout(fig, title, height=380)


__all__ = ["TITLE", "rank_stacks_figure"]
