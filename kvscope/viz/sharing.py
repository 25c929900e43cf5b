"""Sharing views: which sequences hold which shared blocks (a graph laid out by networkx), and the prefix-cache
tree (chains of cached blocks, coloured by how often each was hit)."""

from __future__ import annotations

import math
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvscope.viz._common import MAX_GRAPH_BLOCKS, MAX_TREE_NODES, base_layout, empty_figure, numeric
from kvscope.viz._common import require_columns as _require
from kvscope.viz.palette import COUNT_SCALE, SEQ_COLOR, STATE_COLORS, state_color

EDGE_COLUMNS = ["seq", "block", "ref_count"]
TREE_COLUMNS = ["node", "parent", "block", "depth", "hits"]
_HIDDEN_AXIS = dict(visible=False, showgrid=False, zeroline=False)


def _segments(pairs: list[tuple[tuple[float, float], tuple[float, float]]]) -> tuple[list, list]:
    """Many line segments as one trace: x/y lists with None between segments (one shape per figure, not per edge)."""
    xs: list = []
    ys: list = []
    for (x0, y0), (x1, y1) in pairs:
        xs += [x0, x1, None]
        ys += [y0, y1, None]
    return xs, ys


def sharing_graph_figure(
    edges: pd.DataFrame, *, step: int | None = None, title: str | None = None, max_blocks: int = MAX_GRAPH_BLOCKS
) -> go.Figure:
    """Input: analysis.sharing.sharing_edges(trace, step) (seq, block, ref_count). Sequences (circles) link to the
    blocks they hold that are shared (ref count > 1, squares sized by ref count); edges are weighted by the block's
    ref count, so heavily shared blocks pull their holders together in the spring layout. Past `max_blocks`
    shared blocks only the most shared are drawn (the title says how many)."""
    _require(edges, EDGE_COLUMNS, "sharing graph")
    at = "" if step is None else f" at step {step}"
    title = title or f"Block sharing{at}"
    shared = edges[numeric(edges["ref_count"]) > 1]
    if shared.empty:
        return empty_figure(title, f"no block is shared by two or more sequences{at}")
    per_block = shared.groupby("block", sort=True)["ref_count"].max().sort_values(ascending=False, kind="stable")
    total_blocks = len(per_block)
    if total_blocks > max_blocks:
        keep = set(per_block.index[:max_blocks])
        shared = shared[shared["block"].isin(keep)]
        title += f" (the {max_blocks} most shared of {total_blocks} shared blocks)"
    graph = nx.Graph()
    for seq, block, ref in zip(shared["seq"], shared["block"], numeric(shared["ref_count"]), strict=True):
        graph.add_edge(("s", int(seq)), ("b", int(block)), weight=float(ref))
    n = graph.number_of_nodes()
    pos = nx.spring_layout(graph, weight="weight", seed=7, k=1.5 / math.sqrt(n), iterations=60)

    fig = go.Figure()
    # One trace per ref-count level: line width can only vary per trace.
    by_ref: dict[int, list] = {}
    for u, v, w in graph.edges(data="weight"):
        by_ref.setdefault(int(w), []).append((pos[u], pos[v]))
    top = max(by_ref)
    for ref in sorted(by_ref):
        xs, ys = _segments(by_ref[ref])
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                hoverinfo="skip",
                showlegend=ref == top,
                name="holds (width = ref count)",
                legendgroup="edges",
                line=dict(width=0.6 + 2.4 * (ref - 1) / max(top - 1, 1), color="rgba(120,120,120,0.55)"),
            )
        )
    seq_nodes = [node for node in graph if node[0] == "s"]
    block_nodes = [node for node in graph if node[0] == "b"]
    fig.add_trace(
        go.Scatter(
            x=[pos[v][0] for v in seq_nodes],
            y=[pos[v][1] for v in seq_nodes],
            mode="markers",
            name="sequence",
            marker=dict(symbol="circle", size=11, color=SEQ_COLOR, line=dict(color="white", width=1)),
            customdata=[[v[1], graph.degree(v)] for v in seq_nodes],
            hovertemplate="seq %{customdata[0]}<br>holds %{customdata[1]} shared block(s)<extra></extra>",
        )
    )
    holders = {v: sorted(u[1] for u in graph.neighbors(v)) for v in block_nodes}
    refs = [max(w for _, _, w in graph.edges(v, data="weight")) for v in block_nodes]
    fig.add_trace(
        go.Scatter(
            x=[pos[v][0] for v in block_nodes],
            y=[pos[v][1] for v in block_nodes],
            mode="markers",
            name="shared block (size = ref count)",
            marker=dict(
                symbol="square",
                size=[7 + 3 * math.sqrt(r) for r in refs],
                color=state_color("shared"),
                line=dict(color="white", width=1),
            ),
            customdata=[[v[1], int(r)] for v, r in zip(block_nodes, refs, strict=True)],
            text=[", ".join(map(str, holders[v][:20])) + (" …" if len(holders[v]) > 20 else "") for v in block_nodes],
            hovertemplate="block %{customdata[0]}<br>ref count %{customdata[1]}<br>seqs %{text}<extra></extra>",
        )
    )
    base_layout(fig, title, height=520, xaxis=_HIDDEN_AXIS, yaxis=_HIDDEN_AXIS, hovermode="closest")
    return fig


def _tree_positions(graph: nx.DiGraph, roots: list) -> dict:
    """Tidy-ish layout: leaves get consecutive rows in depth-first order, a parent sits at its children's mean."""
    y: dict = {}
    next_row = 0
    for root in roots:
        for node in nx.dfs_postorder_nodes(graph, root):
            children = list(graph.successors(node))
            if children:
                y[node] = float(np.mean([y[c] for c in children]))
            else:
                y[node] = float(next_row)
                next_row += 1
    return y


def prefix_tree_figure(
    tree: pd.DataFrame,
    *,
    block_size: int | None = None,
    title: str = "Prefix-cache tree",
    max_nodes: int = MAX_TREE_NODES,
) -> go.Figure:
    """Input: analysis.sharing.prefix_tree(trace) (node, parent, block, depth, hits). Each node is a cached block;
    a path from a root is a chain of block hashes (a shared prompt prefix). x is the prefix length in tokens (the
    `tokens` column, else depth x `block_size`, else depth in blocks), colour and size the prefix-cache hits.
    Past `max_nodes` the most hit nodes and their ancestors are kept."""
    _require(tree, TREE_COLUMNS, "prefix tree")
    if tree.empty:
        return empty_figure(title, "no cached prefix blocks in this trace")
    df = tree.drop_duplicates("node").set_index("node", drop=False)
    parent = pd.to_numeric(df["parent"], errors="coerce")
    known = set(df.index)
    total = len(df)
    if total > max_nodes:
        keep: set = set()
        for node in df.sort_values("hits", ascending=False, kind="stable").index:
            if len(keep) >= max_nodes:
                break
            while node in known and node not in keep:  # a node brings its ancestors, so paths stay connected
                keep.add(node)
                node = parent.get(node)
        df = df[df.index.isin(keep)]
        parent = parent[parent.index.isin(keep)]
        known = keep
        title += f" (the {len(df)} most hit of {total} nodes, with their ancestors)"
    graph = nx.DiGraph()
    graph.add_nodes_from(df.index)
    graph.add_edges_from((p, c) for c, p in parent.items() if p in known)
    roots = [n for n in df.index if graph.in_degree(n) == 0]
    y = _tree_positions(graph, roots)
    depth = numeric(df["depth"])
    if "tokens" in df.columns:  # analysis gives the prefix length in tokens (depth x block size)
        length, in_tokens = numeric(df["tokens"]), True
    else:
        length, in_tokens = depth * (block_size or 1), bool(block_size)
    x = dict(zip(df.index, length, strict=True))
    pairs = []
    for p, c in graph.edges():
        # Elbow connector: across to the child's depth at the parent's row is drawn as two segments.
        pairs.append(((x[p], y[p]), (x[p], y[c])))
        pairs.append(((x[p], y[c]), (x[c], y[c])))
    xs, ys = _segments(pairs)
    hits = numeric(df["hits"])
    # Hits are heavy-tailed (a system prompt is hit by every request): colour on a log scale, labelled in hits.
    shade = np.log10(1 + np.nan_to_num(hits))
    top = max(1, int(np.ceil(shade.max())))
    ticks = [0, *range(1, top + 1)]
    colorbar = dict(
        title=dict(text="hits"),
        tickvals=[np.log10(1 + (10**t if t else 0)) for t in ticks],
        ticktext=["0", *(f"{10**t:,}" for t in ticks[1:])],
    )
    big = len(df) > 1000
    marker_trace = go.Scattergl if big else go.Scatter
    fig = go.Figure(
        go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False, line=dict(color="#bbb", width=1))
    )
    fig.add_trace(
        marker_trace(
            x=[x[n] for n in df.index],
            y=[y[n] for n in df.index],
            mode="markers",
            name="cached block",
            marker=dict(
                size=np.clip(6 + 2 * np.sqrt(np.nan_to_num(hits)), 6, 22),
                color=shade,
                colorscale=COUNT_SCALE,
                cmin=0,
                cmax=np.log10(1 + 10**top),
                line=dict(color=STATE_COLORS["cached_idle"], width=1),
                colorbar=colorbar,
            ),
            customdata=np.stack([numeric(df["node"]), numeric(df["block"]), depth, hits], axis=1),
            hovertemplate=(
                "node %{customdata[0]}<br>block %{customdata[1]}<br>depth %{customdata[2]} blocks"
                "<br>prefix-cache hits %{customdata[3]}<extra></extra>"
            ),
        )
    )
    per_block = f", {block_size} per block" if block_size else ""
    xtitle = f"prefix length (tokens{per_block})" if in_tokens else "depth in the prefix chain (blocks)"
    base_layout(
        fig,
        title,
        height=min(800, max(320, 10 * (max(y.values(), default=0) + 1) + 140)),
        xaxis=dict(title=dict(text=xtitle)),
        yaxis=_HIDDEN_AXIS,
        hovermode="closest",
        showlegend=False,
    )
    return fig


# ---- the prefix tree as an icicle ----------------------------------------------------------------------------------
ICICLE_COLUMNS = ["node", "parent", "block", "depth", "hits", "cached", "evictions"]
EVICTED_COLOR = "#c7c7c7"
MAX_ICICLE_NODES = 120  # more boxes than this are slivers too thin for a label (clicking zooms in anyway)


def prefix_icicle_figure(
    tree: pd.DataFrame, *, title: str = "Prefix-cache tree", max_nodes: int = MAX_ICICLE_NODES, maxdepth: int = 8
) -> go.Figure:
    """Input: analysis.sharing.prefix_tree(trace). An icicle: the root is every cached prefix, each level more blocks
    of a prompt prefix (a chain of block hashes; a chain without branches is one box), a box's label the
    admissions that were served it from the cache (its hits), its height the distinct cached prompts below it.
    Teal: some block still carries the prefix at the end of the run (cached); grey: it was evicted. Click a box to
    zoom into its subtree. Past `max_nodes` the most hit nodes and their ancestors are kept."""
    _require(tree, ICICLE_COLUMNS, "prefix tree")
    if tree.empty:
        return empty_figure(title, "no cached prefix blocks in this trace")
    df = tree.drop_duplicates("node").set_index("node", drop=False)
    parent = pd.to_numeric(df["parent"], errors="coerce")
    total = len(df)
    if total > max_nodes:
        keep: set = set()
        for node in df.sort_values("hits", ascending=False, kind="stable").index:
            if len(keep) >= max_nodes:
                break
            while node in df.index and node not in keep:
                keep.add(node)
                node = parent.get(node)
        df = df[df.index.isin(keep)]
        title += f" (the {len(df)} most hit of {total} nodes, with their ancestors)"
    # A chain of blocks with no branch (a long system prompt) is one box, "blocks 1-32": the icicle then spends its
    # levels on where prompts diverge. The box shows its first block's hits and its last block's cached state.
    parent_of = {int(n): (int(p) if p in df.index else -1) for n, p in parent.reindex(df.index).items()}
    children: dict[int, list[int]] = {}
    for n, p in parent_of.items():
        children.setdefault(p, []).append(n)
    head_of: dict[int, int] = {}
    for n in df.index:  # parents before children: node ids grow along a chain (analysis numbers them in order)
        p = parent_of[int(n)]
        head_of[int(n)] = head_of.get(p, p) if p >= 0 and len(children.get(p, [])) == 1 else int(n)
    heads = [int(n) for n in df.index if head_of[int(n)] == int(n)]
    members: dict[int, list[int]] = {h: [] for h in heads}
    for n in df.index:
        members[head_of[int(n)]].append(int(n))
    ids = ["all"] + [f"n{h}" for h in heads]
    parents = [""] + [f"n{head_of[parent_of[h]]}" if parent_of[h] >= 0 else "all" for h in heads]
    labels, colors, values = ["every cached prefix"], ["#ffffff"], [0]
    custom: list[list[Any]] = [["", "", "", "", ""]]
    for h in heads:
        chain = df.loc[members[h]]
        first, last = chain.iloc[0], chain.iloc[-1]
        depth0, depth1 = int(first["depth"]), int(last["depth"])
        hits = int(first["hits"])
        cached = bool(last["cached"])
        span = f"block {depth0}" if depth0 == depth1 else f"blocks {depth0}–{depth1}"
        labels.append(f"{span}: {hits:,} hits")
        colors.append(STATE_COLORS["cached_idle"] if cached else EVICTED_COLOR)
        tokens = int(last["tokens"]) if "tokens" in chain.columns else depth1
        custom.append([int(last["block"]), tokens, "cached" if cached else "evicted", int(chain["evictions"].sum()),
                       len(chain)])  # fmt: skip
        values.append(0 if children.get(members[h][-1]) else 1)  # a leaf counts once: height = prompts below
    fig = go.Figure(
        go.Icicle(
            ids=ids,
            parents=parents,
            labels=labels,
            values=values,
            branchvalues="remainder",
            marker=dict(colors=colors, line=dict(color="white", width=1)),
            leaf=dict(opacity=1.0),
            customdata=custom,
            maxdepth=maxdepth,
            tiling=dict(orientation="h"),
            hovertemplate="%{label}<br>%{customdata[4]} block(s), the prefix ends after %{customdata[1]} tokens "
            "(last block %{customdata[0]})<br>%{customdata[2]} at the end; %{customdata[3]} evictions"
            "<extra></extra>",
            textinfo="label",
        )
    )
    for name, color in (("cached at the end", STATE_COLORS["cached_idle"]), ("evicted", EVICTED_COLOR)):
        fig.add_trace(
            go.Scatter(x=[None], y=[None], mode="markers", name=name, hoverinfo="skip",
                       marker=dict(symbol="square", size=12, color=color, line=dict(color="#888", width=0.5)))
        )  # fmt: skip
    base_layout(
        fig,
        title,
        height=520,
        xaxis=_HIDDEN_AXIS,
        yaxis=_HIDDEN_AXIS,
        showlegend=True,
        legend=dict(title=dict(text="prefix"), orientation="h", y=1.0, yanchor="bottom", x=1.0, xanchor="right"),
        margin=dict(l=20, r=20, t=90, b=20),
    )
    fig.add_annotation(
        text="left to right: deeper into the prompt (a chain without branches is one box); height: the distinct "
        "cached prompts below a box; click a box to zoom",
        x=0,
        y=1.0,
        xref="paper",
        yref="paper",
        yanchor="bottom",
        showarrow=False,
        font=dict(size=11, color="#555"),
    )
    return fig
