"""Figures of an imported KV-event stream (kvscope.analysis.cache frames in, plotly out; nothing computed here):
cached blocks per medium, stores and removals per second, the prefix tree from the hash chain, blocks stored again
after their eviction, block lifetimes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvscope.viz._common import MAX_TIMELINE_POINTS, MAX_TREE_NODES, base_layout, empty_figure, esc, numeric
from kvscope.viz._common import require_columns as _require
from kvscope.viz.palette import BLUE, COUNT_SCALE, DARK_GREY, RED, STATE_COLORS, series_color

TIME_AXIS = "vLLM's clock (s since the first message)"
END_COLORS = {"removed": RED, "cleared": DARK_GREY, "cached at end": BLUE}


def cached_blocks_figure(points: pd.DataFrame, *, title: str = "Cached blocks per medium") -> go.Figure:
    """Input: analysis.cache.cached_blocks(trace). A step line per medium (and all media together when several):
    blocks cached after every store, removal and clear. Past MAX_TIMELINE_POINTS rows a medium is thinned to the
    rows where its count peaks or dips within each stretch (the step shape and its extremes stay)."""
    _require(points, ["t_s", "step", "medium", "cached", "total"], "cached blocks")
    if points.empty:
        return empty_figure(title, "no block was stored in this stream")
    fig = go.Figure()
    mediums = sorted(points["medium"].astype(str).unique())
    series = [(m, points[points["medium"].astype(str) == m], "cached") for m in mediums]
    if len(mediums) > 1:
        series.append(("all media", points, "total"))
    for i, (name, df, col) in enumerate(series):
        df = _thin(df, col)
        fig.add_trace(
            go.Scatter(
                x=numeric(df["t_s"]),
                y=numeric(df[col]),
                name=esc(name),
                mode="lines",
                line=dict(shape="hv", color=series_color(i), width=1.6),
                customdata=numeric(df["step"]),
                hovertemplate="%{y:,} blocks<br>t %{x:.3f} s, message %{customdata}<extra>" + esc(name) + "</extra>",
            )
        )
    fig.update_xaxes(title_text=TIME_AXIS)
    fig.update_yaxes(title_text="blocks cached", rangemode="tozero")
    return base_layout(fig, title)


def _thin(df: pd.DataFrame, col: str, max_points: int = MAX_TIMELINE_POINTS) -> pd.DataFrame:
    if len(df) <= max_points:
        return df
    chunk = -(-len(df) // (max_points // 2))
    key = np.arange(len(df)) // chunk
    values = df[col].to_numpy()
    keep: set[int] = set()
    for k in np.unique(key):
        idx = np.flatnonzero(key == k)
        keep.update((idx[np.argmax(values[idx])], idx[np.argmin(values[idx])]))
    return df.iloc[sorted(keep)]


def cache_rates_figure(rates: pd.DataFrame, *, title: str = "Blocks stored and removed per second") -> go.Figure:
    """Input: analysis.cache.cache_rates(trace). Bars per bin of vLLM's clock: stored above zero, removed below,
    one colour pair per medium; the bin width is in the axis title."""
    _require(rates, ["t_s", "medium", "stored_per_s", "removed_per_s", "bin_s"], "cache rates")
    if rates.empty:
        return empty_figure(title, "no block was stored or removed in this stream")
    width = float(rates["bin_s"].iloc[0])
    fig = go.Figure()
    for i, medium in enumerate(sorted(rates["medium"].astype(str).unique())):
        df = rates[rates["medium"].astype(str) == medium]
        x = numeric(df["t_s"]) + width / 2
        name = esc(medium)
        fig.add_trace(
            go.Bar(
                x=x,
                y=numeric(df["stored_per_s"]),
                width=width,
                name=f"stored ({name})",
                marker_color=series_color(2 * i),
                hovertemplate="%{y:,.2f} blocks/s stored<br>t %{x:.2f} s<extra>" + name + "</extra>",
            )
        )
        fig.add_trace(
            go.Bar(
                x=x,
                y=-numeric(df["removed_per_s"]),
                width=width,
                name=f"removed ({name})",
                marker_color=RED if i == 0 else series_color(2 * i + 1),
                customdata=numeric(df["removed_per_s"]),
                hovertemplate="%{customdata:,.2f} blocks/s removed<br>t %{x:.2f} s<extra>" + name + "</extra>",
            )
        )
    fig.update_layout(barmode="relative", bargap=0)
    fig.update_xaxes(title_text=f"{TIME_AXIS}, bins of {width:g} s")
    fig.update_yaxes(title_text="blocks / s (removed below 0)")
    return base_layout(fig, title)


def cache_tree_figure(tree: pd.DataFrame, *, title: str = "Prefix tree from the hash chain") -> go.Figure:
    """Input: analysis.cache.cache_tree(trace). One marker per node (a hash), placed at its prefix length in tokens,
    joined to its parent; colour counts its stores (above 1: stored again after an eviction, or two blocks under
    one hash), hollow markers are still cached at the end. Past MAX_TREE_NODES the most stored nodes and their
    ancestors are kept, and the title says how many."""
    _require(tree, ["node", "parent", "tokens", "stores", "removals", "cached", "hash_hex", "depth"], "cache tree")
    if tree.empty:
        return empty_figure(title, "no block hashes in this stream")
    df = tree.set_index("node", drop=False)
    parent = df["parent"].astype("int64")
    if len(df) > MAX_TREE_NODES:
        keep: set[int] = set()
        for node in df.sort_values("stores", ascending=False, kind="stable").index:
            if len(keep) >= MAX_TREE_NODES:
                break
            while node >= 0 and node in df.index and node not in keep:
                keep.add(int(node))
                node = int(parent[node])
        title += f" (the {len(keep)} most stored of {len(df)} nodes, with their ancestors)"
        df, parent = df[df.index.isin(keep)], parent[parent.index.isin(keep)]
    y = _rows(parent)
    x = dict(zip(df.index, numeric(df["tokens"]), strict=True))
    xs: list[float | None] = []
    ys: list[float | None] = []
    for child, p in parent.items():
        if p in x:  # elbow: down from the parent's row, then across to the child
            xs += [x[p], x[p], x[child], None]
            ys += [y[p], y[child], y[child], None]
    stores = numeric(df["stores"])
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False, line=dict(color="#bbb")))
    fig.add_trace(
        go.Scatter(
            x=[x[n] for n in df.index],
            y=[y[n] for n in df.index],
            mode="markers",
            name="block hash",
            showlegend=False,
            marker=dict(
                size=9,
                color=stores,
                colorscale=COUNT_SCALE,
                cmin=0,
                cmax=max(2.0, float(np.nanmax(stores))),
                symbol=["circle-open" if c > 0 else "circle" for c in numeric(df["cached"])],
                line=dict(color=STATE_COLORS["cached_idle"], width=1.5),
                colorbar=dict(title=dict(text="stores")),
            ),
            customdata=np.stack(
                [df["hash_hex"].astype(str), df["depth"], df["stores"], df["removals"], df["cached"]], axis=1
            ),
            hovertemplate=(
                "hash %{customdata[0]}<br>depth %{customdata[1]} blocks, %{x:,} tokens<br>stored %{customdata[2]}"
                " times, removed %{customdata[3]}<br>cached at the end: %{customdata[4]}<extra></extra>"
            ),
        )
    )
    fig.update_xaxes(title_text="prefix length (tokens)")
    fig.update_yaxes(visible=False)
    return base_layout(fig, title, height=max(360, min(900, 14 * len(df))))


def _rows(parent: pd.Series) -> dict[int, float]:
    """A row per leaf, parents at the mean row of their children: depth-first, so each subtree is one band."""
    children: dict[int, list[int]] = {}
    nodes = set(parent.index)
    roots = []
    for child, p in parent.items():
        if p in nodes:
            children.setdefault(int(p), []).append(int(child))
        else:
            roots.append(int(child))
    y: dict[int, float] = {}
    leaf = 0
    for root in roots:
        stack: list[tuple[int, bool]] = [(root, False)]
        while stack:  # iterative post-order: chains can be thousands of blocks deep
            node, done = stack.pop()
            kids = children.get(node, [])
            if done or not kids:
                if kids:
                    y[node] = float(np.mean([y[k] for k in kids]))
                else:
                    y[node], leaf = float(leaf), leaf + 1
                continue
            stack.append((node, True))
            stack.extend((k, False) for k in reversed(kids))
    return y


def restored_figure(restored: pd.DataFrame, *, title: str = "Blocks stored again after their eviction") -> go.Figure:
    """Input: analysis.cache.restored_blocks(trace). One marker per store of a hash that a BlockRemoved had taken out
    of the same medium: when it came back (x) and how long it had been gone (y)."""
    _require(restored, ["t_s", "gap_s", "medium", "node", "tokens", "step"], "restored blocks")
    if restored.empty:
        return empty_figure(title, "no evicted block hash was stored again")
    fig = go.Figure()
    for i, medium in enumerate(sorted(restored["medium"].astype(str).unique())):
        df = restored[restored["medium"].astype(str) == medium]
        fig.add_trace(
            go.Scatter(
                x=numeric(df["t_s"]),
                y=numeric(df["gap_s"]),
                mode="markers",
                name=esc(medium),
                marker=dict(color=series_color(i), size=7, opacity=0.75),
                customdata=np.stack([df["node"], df["tokens"], df["step"]], axis=1),
                hovertemplate=(
                    "node %{customdata[0]} (%{customdata[1]} tokens)<br>stored again at %{x:.2f} s (message "
                    "%{customdata[2]})<br>%{y:.2f} s after its eviction<extra></extra>"
                ),
            )
        )
    fig.update_xaxes(title_text=TIME_AXIS)
    fig.update_yaxes(title_text="time since its eviction (s)", rangemode="tozero")
    return base_layout(fig, title)


def lifetimes_figure(lifetimes: pd.DataFrame, *, title: str = "Block lifetimes") -> go.Figure:
    """Input: analysis.cache.block_lifetimes(trace). A histogram of how long stored blocks stayed cached, stacked by
    how they ended: removed (evicted), cleared, or still cached at the end (a lower bound: cut at the trace's end)."""
    _require(lifetimes, ["lifetime_s", "end"], "block lifetimes")
    if lifetimes.empty:
        return empty_figure(title, "no block was stored in this stream")
    fig = go.Figure()
    for end in ("removed", "cleared", "cached at end"):
        df = lifetimes[lifetimes["end"] == end]
        if df.empty:
            continue
        fig.add_trace(
            go.Histogram(
                x=numeric(df["lifetime_s"]),
                name=end,
                marker_color=END_COLORS[end],
                nbinsx=60,
                hovertemplate="%{y:,} blocks lived %{x} s<extra>" + end + "</extra>",
            )
        )
    fig.update_layout(barmode="stack")
    fig.update_xaxes(title_text="time cached (s of vLLM's clock)")
    fig.update_yaxes(title_text="stored blocks")
    return base_layout(fig, title)
