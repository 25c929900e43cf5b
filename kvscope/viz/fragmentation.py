"""Fragmentation views: units x steps coloured by state (the whole run at a glance), and every block / page /
arena segment at one step (hover: holders, fill, ref count)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvscope.viz._common import MAX_GRID_CELLS, base_layout, empty_figure, esc, numeric, truncate
from kvscope.viz._common import require_columns as _require
from kvscope.viz.palette import ordered_states, state_color, state_label

MATRIX_COLUMNS = ["step_bin", "unit_bin", "state", "fraction"]
STATES_COLUMNS = ["unit", "state", "fill", "capacity_tokens", "ref_count", "seqs", "slot"]


def _discrete_colorscale(states: list[str]) -> list[list]:
    """Heatmap z holds a state's index; each index maps to its colour over a band of equal width."""
    k = len(states)
    scale: list[list] = []
    for i, s in enumerate(states):
        scale.append([i / k, state_color(s)])
        scale.append([(i + 1) / k, state_color(s)])
    return scale


def _legend_swatches(fig: go.Figure, states: list[str]) -> None:
    """Heatmaps have no per-category legend; invisible marker traces give one that names every state."""
    for s in states:
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                name=state_label(s),
                hoverinfo="skip",
                marker=dict(symbol="square", size=12, color=state_color(s), line=dict(color="#888", width=0.5)),
            )
        )


def _state_heatmap(z: np.ndarray, states: list[str], **kwargs) -> go.Heatmap:
    k = len(states)
    kwargs["hovertemplate"] = kwargs["hovertemplate"] + "<extra></extra>"
    return go.Heatmap(z=z, zmin=-0.5, zmax=k - 0.5, colorscale=_discrete_colorscale(states), showscale=False, **kwargs)


def fragmentation_map_figure(matrix: pd.DataFrame, *, title: str = "Fragmentation map: units x steps") -> go.Figure:
    """Input: analysis.fragmentation.state_matrix(trace, max_units, max_steps) (long form: step_bin, unit_bin,
    state, fraction). Each cell is coloured by the state holding the largest share of its units and steps; the
    hover lists every state's share. The analysis layer already bins big runs, so cells stay bounded."""
    _require(matrix, MATRIX_COLUMNS, "fragmentation map")
    if matrix.empty:
        return empty_figure(title, "no block, page or segment states in this trace")
    matrix = matrix.assign(state=matrix["state"].astype(str))  # a categorical would add every unused state
    wide = matrix.pivot_table(index="unit_bin", columns="step_bin", values="fraction", aggfunc="sum", fill_value=0.0)
    by_state = matrix.pivot_table(
        index=["unit_bin", "step_bin"], columns="state", values="fraction", aggfunc="sum", fill_value=0.0
    )
    states = ordered_states(by_state.columns)
    by_state = by_state[states]
    units, steps = wide.index.to_numpy(), wide.columns.to_numpy()
    full = pd.MultiIndex.from_product([units, steps], names=["unit_bin", "step_bin"])
    by_state = by_state.reindex(full, fill_value=0.0)
    shares = by_state.to_numpy().reshape(len(units), len(steps), len(states))
    dominant = shares.argmax(axis=2).astype(float)
    dominant[shares.sum(axis=2) <= 0] = np.nan
    # Hover shares travel as whole percents in one byte each (base64 in the JSON): ~1 byte per cell and state,
    # where preformatted hover strings would cost ~80.
    percents = np.clip(np.rint(100 * shares), 0, 100).astype("uint8")
    hover = "steps from %{x}, units from %{y}<br>" + "<br>".join(
        f"{state_label(s)}: %{{customdata[{k}]}}%" for k, s in enumerate(states)
    )
    fig = go.Figure(_state_heatmap(dominant, states, x=steps, y=units, customdata=percents, hovertemplate=hover))
    _legend_swatches(fig, states)
    base_layout(
        fig,
        title,
        height=480,
        xaxis=dict(title=dict(text="engine step (bin start)"), showgrid=False),
        yaxis=dict(title=dict(text="block / page / token slot (bin start)"), showgrid=False),
        showlegend=True,
        legend=dict(title=dict(text="dominant state")),
    )
    return fig


def _seq_text(values: pd.Series) -> list[str]:
    return [esc(truncate(v, 60)) if isinstance(v, str) and v else "none" for v in values]


def _grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols) about three times wider than tall, so a pool reads like a memory map."""
    cols = min(n, max(16, math.ceil(math.sqrt(n * 3))))
    return math.ceil(n / cols), cols


def _to_grid(values: np.ndarray, rows: int, cols: int, fill) -> np.ndarray:
    """values laid out row-major on a rows x cols grid; trailing cells padded with `fill` (extra dims kept)."""
    n = values.shape[0]
    out = np.full((rows * cols, *values.shape[1:]), fill, dtype=values.dtype)
    out[:n] = values
    return out.reshape(rows, cols, *values.shape[1:])


def block_grid_figure(
    states: pd.DataFrame, *, step: int | None = None, title: str | None = None, max_cells: int = MAX_GRID_CELLS
) -> go.Figure:
    """Input: analysis.fragmentation.block_states(trace, step). Paged blocks and VMM pages are drawn as a grid of
    equal cells (unit id left to right, top to bottom), coloured by state; hover: unit, state, fill, ref count,
    holders. Static arena segments, which differ in size, become a strip whose widths are token slots.
    Past `max_cells` units each cell covers a contiguous range of units and shows its majority state."""
    _require(states, STATES_COLUMNS, "block grid")
    at = "" if step is None else f" at step {step}"
    title = title or f"Blocks and pages{at}"
    if states.empty:
        return empty_figure(title, f"no blocks, pages or segments{at}")
    df = states.sort_values("unit").reset_index(drop=True)
    cap = numeric(df["capacity_tokens"])
    if np.nanmin(cap) != np.nanmax(cap):
        return _segment_strip(df, title)
    state_names = df["state"].astype(str)
    present = ordered_states(state_names.unique())
    codes = state_names.map({s: i for i, s in enumerate(present)}).to_numpy(dtype=float)
    n = len(df)
    if n > max_cells:
        return _range_grid(df, codes, present, title, max_cells)
    rows, cols = _grid_shape(n)
    # Numbers travel as float32 customdata (base64); only the state and holders are strings.
    numbers = np.stack(
        [numeric(df[c]) for c in ("unit", "fill", "capacity_tokens", "ref_count", "slot")], axis=1
    ).astype("float32")
    labels = {s: state_label(s) for s in present}
    text = np.array([f"{labels[s]}<br>seqs {q}" for s, q in zip(state_names, _seq_text(df["seqs"]), strict=True)])
    hover = "unit %{customdata[0]}: %{text}<br>fill %{customdata[1]} / %{customdata[2]} tokens"
    hover += "<br>ref count %{customdata[3]}"
    if np.any(numbers[:, 4] >= 0):  # VMM pages and static segments belong to a slot; paged blocks do not
        hover += "<br>slot %{customdata[4]}"
    gap = 1 if n <= 4096 else 0
    heat = _state_heatmap(
        _to_grid(codes, rows, cols, np.nan),
        present,
        customdata=_to_grid(numbers, rows, cols, np.nan),
        text=_to_grid(text.astype(object), rows, cols, ""),
        hovertemplate=hover,
        xgap=gap,
        ygap=gap,
    )
    return _grid_figure(heat, present, title, rows, cols, row_px=18, unit="unit id", legend="state")


def _grid_figure(
    heat: go.Heatmap, states: list[str], title: str, rows: int, cols: int, *, row_px: int, unit: str, legend: str
) -> go.Figure:
    """A state heatmap laid out as a rows x cols memory map (row-major, first unit top left) with a state legend."""
    fig = go.Figure(heat)
    _legend_swatches(fig, states)
    base_layout(
        fig,
        title,
        height=min(700, max(260, row_px * rows + 140)),
        xaxis=dict(title=dict(text=f"{unit} mod {cols}"), showgrid=False),
        yaxis=dict(title=dict(text=f"{unit} // {cols}"), autorange="reversed", showgrid=False),
        showlegend=True,
        legend=dict(title=dict(text=legend)),
    )
    return fig


def _range_grid(df: pd.DataFrame, codes: np.ndarray, present: list[str], title: str, max_cells: int) -> go.Figure:
    n = len(df)
    per = math.ceil(n / max_cells)
    cells = math.ceil(n / per)
    padded = np.full(cells * per, -1.0)
    padded[:n] = np.nan_to_num(codes, nan=-1.0)
    groups = padded.reshape(cells, per)
    counts = np.stack([(groups == i).sum(axis=1) for i in range(len(present))], axis=1)
    dominant = counts.argmax(axis=1).astype(float)
    first_unit = numeric(df["unit"])[::per][:cells]
    numbers = np.concatenate([first_unit[:, None], counts], axis=1).astype("float32")
    hover = "units from %{customdata[0]}<br>" + "<br>".join(
        f"{state_label(s)}: %{{customdata[{k + 1}]}}" for k, s in enumerate(present)
    )
    rows, cols = _grid_shape(cells)
    heat = _state_heatmap(
        _to_grid(dominant, rows, cols, np.nan),
        present,
        customdata=_to_grid(numbers, rows, cols, np.nan),
        hovertemplate=hover,
    )
    title = f"{title} ({per} units per cell, coloured by majority)"
    return _grid_figure(heat, present, title, rows, cols, row_px=6, unit="unit range (cell)", legend="majority state")


def _segment_strip(df: pd.DataFrame, title: str) -> go.Figure:
    """Static arena: segments of different sizes laid end to end on a token-slot axis."""
    fig = go.Figure()
    for s in ordered_states(df["state"].astype(str).unique()):
        part = df[df["state"].astype(str) == s]
        start = numeric(part["unit"])
        size = numeric(part["capacity_tokens"])
        text = [
            f"slots {int(a)}–{int(a + b - 1)} ({int(b)} tokens): {state_label(s)}<br>fill {f:.0f}<br>seqs {q}"
            for a, b, f, q in zip(start, size, numeric(part["fill"]), _seq_text(part["seqs"]), strict=True)
        ]
        fig.add_trace(
            go.Bar(
                x=size,
                base=start,
                y=["arena"] * len(part),
                orientation="h",
                name=state_label(s),
                marker=dict(color=state_color(s), line=dict(width=0.5, color="white")),
                text=text,
                textposition="none",
                hovertemplate="%{text}<extra></extra>",
            )
        )
    base_layout(
        fig,
        title,
        height=260,
        barmode="overlay",
        xaxis=dict(title=dict(text="token slot in the arena")),
        yaxis=dict(showticklabels=False),
        showlegend=True,
        legend=dict(title=dict(text="state")),
    )
    return fig
