"""Why each request's prompt missed the prefix cache in an engine run: one stacked bar per request (its prompt's
tokens by outcome: GPU hit, CPU-tier hit, cold, evicted, behind a missing block, the block-size floor), in admission
order; hovering a bar names the request's outcome split and, for evicted blocks, the step of the latest eviction
that cost it and how long before its admission that was. The numbers are
kvscope.analysis.prefix_misses.request_misses / missed_blocks; this module only places them. Runs with more requests
than MAX_GANTT_REQUESTS are drawn as that many groups of consecutive admissions (their sums), so the bars stay
readable; the hover then names the group's requests.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvscope.viz._common import MAX_GANTT_REQUESTS, base_layout, empty_figure, esc, require_columns
from kvscope.viz.palette import AMBER, BLUE, DARK_GREY, GREY, RED, TEAL

TITLE = "Why prompts missed the prefix cache"
OUTCOMES = (  # (request_misses column, label, colour): the lab's colours for the same causes
    ("hit_gpu", "hit (GPU)", TEAL),
    ("hit_cpu", "hit (CPU tier)", BLUE),
    ("cold", "cold (first use)", GREY),
    ("evicted", "evicted before reuse", RED),
    ("gap", "behind a missing block", AMBER),
    ("floor", "block-size floor", DARK_GREY),
)
REQUEST_COLUMNS = ["seq", "prompt_tokens", *(c for c, _, _ in OUTCOMES)]


def _eviction_notes(blocks: pd.DataFrame) -> dict[int, str]:
    """seq -> 'n evicted blocks, latest eviction at step s (t s before)' for the requests that lost some."""
    evicted = blocks[blocks["cause"] == "evicted"]
    notes: dict[int, str] = {}
    for seq, group in evicted.groupby("seq"):
        latest = group.loc[group["evicted_step"].idxmax()]
        notes[int(seq)] = (
            f"{len(group):,} evicted block(s); latest eviction at step {int(latest['evicted_step']):,}, "
            f"{float(latest['evicted_s_before']):.3g} s before this admission"
        )
    return notes


def prefix_misses_figure(requests: pd.DataFrame, blocks: pd.DataFrame | None = None) -> go.Figure:
    require_columns(requests, REQUEST_COLUMNS, "prompt misses")
    if requests.empty or not requests["prompt_tokens"].sum():
        return empty_figure(TITLE, "no prompt tokens at first admissions (a run without prefix caching has none)")
    notes = _eviction_notes(blocks) if blocks is not None and len(blocks) else {}
    frame = requests.reset_index(drop=True)
    groups = int(np.ceil(len(frame) / MAX_GANTT_REQUESTS))
    if groups > 1:  # consecutive admissions summed, so that the chart keeps one bar per group
        key = frame.index // groups
        summed = frame.groupby(key)[[c for c, _, _ in OUTCOMES]].sum()
        first, last = frame.groupby(key)["seq"].first(), frame.groupby(key)["seq"].last()
        x = [f"{a}-{b}" for a, b in zip(first, last, strict=True)]
        hover = [f"sequences {a}..{b} (admission order)" for a, b in zip(first, last, strict=True)]
        values = summed
        x_title = f"requests in admission order ({groups} a bar)"
    else:
        values = frame
        x = [str(s) for s in frame["seq"]]
        hover = [
            f"sequence {s}: {int(p):,} prompt tokens" + (f"<br>{esc(notes[s])}" if s in notes else "")
            for s, p in zip(frame["seq"], frame["prompt_tokens"], strict=True)
        ]
        x_title = "request (sequence id, admission order)"
    fig = go.Figure()
    for column, label, colour in OUTCOMES:
        fig.add_trace(
            go.Bar(
                x=x,
                y=values[column].to_numpy(),
                name=label,
                marker_color=colour,
                customdata=hover,
                hovertemplate="%{customdata}<br>%{y:,} tokens<extra>" + label + "</extra>",
            )
        )
    fig.update_layout(barmode="stack", bargap=0.05, legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title=x_title, type="category", showticklabels=len(x) <= 60)
    fig.update_yaxes(title="prompt tokens at first admission")
    return base_layout(fig, TITLE, height=460)
