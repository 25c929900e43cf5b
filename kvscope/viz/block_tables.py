"""Block tables at a step: one row per sequence, one column per logical block, each cell the physical block or page
it maps to, coloured own / partly filled / shared / copied-on-write. The fragmentation page shows every sequence;
the sharing view only those that share, grouped by shared prefix and fork family."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvscope.viz._common import base_layout, empty_figure, esc, numeric, truncate
from kvscope.viz._common import require_columns as _require
from kvscope.viz.palette import PREFILL_COLOR, STATE_COLORS

# ---- block tables: sequences x logical blocks ------------------------------------------------------------------
TABLE_COLUMNS = ["seq", "root", "request_id", "index", "unit", "kind", "ref_count", "fill", "capacity_tokens"]
MAX_TABLE_SEQS = 200
# A block table cell: held alone and full, held alone and partly filled (the internal fragmentation of a last
# block), shared (ref > 1), or a private copy made by copy-on-write. Copies take the prefill green: not a state of
# the memory stack, so it needs a colour no band uses.
TABLE_KINDS = ("own", "own_partial", "shared", "cow")
TABLE_COLORS = {"own": STATE_COLORS["active"], "own_partial": "#9ecae9", "shared": STATE_COLORS["shared"]}
TABLE_COLORS["cow"] = PREFILL_COLOR
TABLE_LABELS = {
    "own": "own (one holder, full)",
    "own_partial": "own, partly filled",
    "shared": "shared (ref > 1)",
    "cow": "copied on write",
}


def block_table_figure(
    tables: pd.DataFrame,
    *,
    step: int | None = None,
    title: str | None = None,
    only_sharing: bool = False,
    max_seqs: int = MAX_TABLE_SEQS,
) -> go.Figure:
    """Input: analysis.block_tables.block_tables(trace, step). One row per sequence (grouped as the analysis
    orders them: shared prefixes and fork families together, the largest groups first), one column per logical
    block; a cell is coloured own / own partly filled / shared / copied-on-write, hover names the physical block or
    page, its ref count and fill. `only_sharing` keeps the sequences that share or copied something. Past
    `max_seqs` sequences, the first ones (the largest groups) are drawn and the title says how many were left out."""
    _require(tables, TABLE_COLUMNS, "block tables")
    at = "" if step is None else f" at step {step}"
    title = title or f"Block tables{at}"
    df = tables
    if only_sharing and not df.empty:
        sharing = df.groupby("seq")["kind"].agg(lambda k: bool((k != "own").any()))
        df = df[df["seq"].isin(sharing.index[sharing])]
    if df.empty:
        message = "no sequence shares or copied a block" if only_sharing else "no sequence holds blocks or pages"
        return empty_figure(title, f"{message}{at}")
    seqs = list(dict.fromkeys(df["seq"].tolist()))
    total = len(seqs)
    if total > max_seqs:
        seqs = seqs[:max_seqs]
        df = df[df["seq"].isin(set(seqs))]
        title += f" (the first {max_seqs} of {total} sequences)"
    row_of = {s: i for i, s in enumerate(seqs)}
    rows = np.array([row_of[s] for s in df["seq"].tolist()])
    cols = numeric(df["index"]).astype(int)
    width = int(cols.max()) + 1
    kind = df["kind"].astype(str).to_numpy()
    partial = (kind == "own") & (numeric(df["fill"]) < numeric(df["capacity_tokens"]))
    kind = np.where(partial, "own_partial", kind)
    code = pd.Series(kind).map({k: i for i, k in enumerate(TABLE_KINDS)}).to_numpy(float)
    z = np.full((len(seqs), width), np.nan)
    z[rows, cols] = code
    # Hover numbers as one int32 array (base64 in the JSON): a string per cell would cost ~10x more.
    custom = np.zeros((len(seqs), width, 5), np.int32)  # 0, not -1: base64 of -1 is "////", which plotly escapes
    custom[rows, cols, 0] = numeric(df["seq"]).astype(np.int32)
    for j, c in enumerate(("unit", "ref_count", "fill", "capacity_tokens")):
        custom[rows, cols, j + 1] = numeric(df[c]).astype(np.int32)
    k = len(TABLE_KINDS)
    scale = []
    for i, name in enumerate(TABLE_KINDS):
        scale += [[i / k, TABLE_COLORS[name]], [(i + 1) / k, TABLE_COLORS[name]]]
    firsts = df.drop_duplicates("seq").set_index("seq")
    gap = 1 if len(seqs) * width <= 20_000 else 0
    fig = go.Figure(
        go.Heatmap(
            z=z.astype(np.float32),
            zmin=-0.5,
            zmax=k - 0.5,
            colorscale=scale,
            showscale=False,
            customdata=custom,
            xgap=gap,
            ygap=gap,
            hovertemplate="seq %{customdata[0]}: logical block %{x} -> physical %{customdata[1]}"
            "<br>ref count %{customdata[2]}<br>fill %{customdata[3]} / %{customdata[4]} tokens<extra></extra>",
        )
    )
    for name in TABLE_KINDS:
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=TABLE_LABELS[name],
                hoverinfo="skip",
                marker=dict(symbol="square", size=12, color=TABLE_COLORS[name], line=dict(color="#888", width=0.5)),
            )
        )
    tickvals, ticktext = _group_ticks(firsts, seqs)
    # Rules between fork families (grey) and between groups (dark): two line traces, not one shape per rule
    # (plotly validates every shape: 200 add_hline calls took seconds).
    starts = set(tickvals) if len(ticktext) and not ticktext[0].startswith("seq ") else set()
    breaks = _family_breaks(firsts, seqs)
    for color, rows_ in (("#bbb", [r for r in breaks if r not in starts]), ("#333", sorted(starts - {0}))):
        if rows_:
            xs = [v for _ in rows_ for v in (-0.5, width - 0.5, None)]
            ys = [v for r in rows_ for v in (r - 0.5, r - 0.5, None)]
            fig.add_trace(
                go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=color, width=1), hoverinfo="skip",
                           showlegend=False)
            )  # fmt: skip
    row_px = int(np.clip(640 / len(seqs), 3, 16))
    base_layout(
        fig,
        title,
        height=max(300, row_px * len(seqs) + 170),
        xaxis=dict(title=dict(text="logical block (position in the sequence's block table)"), showgrid=False),
        yaxis=dict(
            title=dict(text="sequences, grouped by shared prefix and fork family"),
            autorange="reversed",
            showgrid=False,
            tickvals=tickvals,
            ticktext=ticktext,
        ),
        showlegend=True,
        legend=dict(title=dict(text="block"), orientation="h", y=1.0, yanchor="bottom", x=0),
        margin=dict(l=200, r=30, t=110, b=60),
    )
    return fig


def _group_ticks(firsts: pd.DataFrame, seqs: list) -> tuple[list[int], list[str]]:
    """A y tick at the first row of each group (at most 30; else every n-th sequence with its request id)."""
    groups = firsts["group"].reindex(seqs).astype(str).tolist()
    first_row: dict[str, int] = {}
    for i, g in enumerate(groups):
        first_row.setdefault(g, i)
    if len(first_row) <= 30:
        sizes = pd.Series(groups).value_counts()
        text = []
        for group in first_row:
            label = group.replace("prefix@", "prefix at block ").replace("family ", "request seq ")
            text.append(esc(f"{label} ({int(sizes[group])} seq{'s' if sizes[group] != 1 else ''})"))
        return list(first_row.values()), text
    every = max(1, len(seqs) // 25)
    ids = firsts["request_id"].reindex(seqs).astype(str).tolist()
    rows = list(range(0, len(seqs), every))
    return rows, [esc(f"seq {seqs[i]} ({truncate(ids[i], 16)})") for i in rows]


def _family_breaks(firsts: pd.DataFrame, seqs: list) -> list[int]:
    """Rows where a new fork family starts (at most 200 rules, so a page stays light)."""
    roots = [firsts.at[s, "root"] for s in seqs]
    breaks = [i for i in range(1, len(seqs)) if roots[i] != roots[i - 1]]
    if len(breaks) == len(seqs) - 1:  # no family has two sequences: a rule under every row says nothing
        return []
    return breaks if len(breaks) <= 200 else []
