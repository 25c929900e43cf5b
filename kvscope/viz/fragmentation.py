"""Fragmentation views: units x steps coloured by state (the whole run at a glance), and every block / page /
arena segment at one step (hover: holders, fill, ref count)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

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


MAP_BANDS = 5  # a cell of the map is drawn as this many horizontal bands, shared out by its states' shares
FILL_SCALE = [[0.0, "#d62728"], [0.5, "#f7b267"], [1.0, "#1f77b4"]]  # empty (red) .. full (the "used" blue)


def _bands(shares: np.ndarray, k: int, free: np.ndarray) -> np.ndarray:
    """shares (cells x states, rows sum to 1) -> (cells x k) state index per band. Bands go to states by largest
    remainder, but every state present in a cell that is not free gets at least one band: a few scattered blocks
    in a big binned cell must stay visible (a winner-takes-the-cell colouring hid them)."""
    cells, n = shares.shape
    want = shares * k
    count = np.floor(want).astype(np.int64)
    present = (shares > 0) & ~free[None, :]
    count = np.where(present & (count == 0), 1, count)
    # Bring each row to exactly k bands: take from (or give to) the states with the most bands / largest remainder.
    for _ in range(n * k):
        total = count.sum(axis=1)
        over, under = total > k, total < k
        if not (over.any() or under.any()):
            break
        rem = want - count
        if over.any():
            # Take a band from the state with the most bands beyond its share (never the last band of a present state).
            key = np.where(count > np.where(present, 1, 0), count - want, -np.inf)
            i = np.flatnonzero(over)
            j = key[i].argmax(axis=1)
            count[i, j] -= 1
        if under.any():
            i = np.flatnonzero(under)
            j = np.where(shares[i] > 0, rem[i], -np.inf).argmax(axis=1)
            count[i, j] += 1
    out = np.zeros((cells, k), np.int64)
    count = np.clip(count, 0, None)
    # Band j of a cell is the state whose run of bands covers j: the number of states whose runs end at or before j
    # (np.repeat(states, count)[:k] per cell, for all cells at once; a map has tens of thousands of cells).
    ends = np.cumsum(count, axis=1)
    whole = ends[:, -1] >= k if n else np.zeros(cells, bool)
    out[whole] = (ends[whole][:, :, None] <= np.arange(k)[None, None, :]).sum(axis=1)
    for c in np.flatnonzero(~whole).tolist():  # (fewer than k bands: as np.repeat gives them)
        out[c] = np.repeat(np.arange(n), count[c])[:k]
    return out


def fragmentation_map_figure(
    matrix: pd.DataFrame,
    fill: pd.DataFrame | None = None,
    *,
    title: str = "Fragmentation map: units x steps",
    bands: int = MAP_BANDS,
) -> go.Figure:
    """Input: analysis.fragmentation.state_matrix(trace, max_units, max_steps) (long form: step_bin, unit_bin,
    state, fraction; unit_end when present) and, optionally, analysis.fragmentation.fill_matrix with the same
    bins (tokens, slots, fill). Each cell shows the MIX of states it covers: it is cut into `bands` horizontal
    bands shared out by the states' shares (any state that is present and not free gets at least one band, so
    scattered allocations stay visible). With `fill`, a second panel shows the fill level of each cell's reserved
    units (tokens held / token slots): partly filled last blocks, pages mapped ahead and idle mapped pages show as
    low fill. Hover: every state's share and the fill."""
    _require(matrix, MATRIX_COLUMNS, "fragmentation map")
    if matrix.empty:
        return empty_figure(title, "no block, page or segment states in this trace")
    matrix = matrix.assign(state=matrix["state"].astype(str))  # a categorical would add every unused state
    by_state = matrix.pivot_table(
        index=["unit_bin", "step_bin"], columns="state", values="fraction", aggfunc="sum", fill_value=0.0
    )
    states = ordered_states(by_state.columns)
    by_state = by_state[states]
    units = np.sort(matrix["unit_bin"].unique())
    steps = np.sort(matrix["step_bin"].unique())
    full = pd.MultiIndex.from_product([units, steps], names=["unit_bin", "step_bin"])
    shares = by_state.reindex(full, fill_value=0.0).to_numpy().reshape(len(units), len(steps), len(states))
    if "unit_end" in matrix.columns:
        ends = matrix.groupby("unit_bin")["unit_end"].max().reindex(units).to_numpy(np.float64)
    else:
        ends = np.r_[units[1:], units[-1] + (units[-1] - units[0]) / max(len(units) - 1, 1) + 1].astype(float)
    free = np.array([s in ("free", "pool") for s in states])
    band = _bands(shares.reshape(-1, len(states)), bands, free).reshape(len(units), len(steps), bands)
    empty = shares.sum(axis=2) <= 0
    k = len(states)
    # Rows of the heatmap: every unit bin split into `bands` rows, laid at unit coordinates, first band at the top of
    # the bin (the unit axis grows downwards, like a memory map). z is one byte per band (index k: nothing there,
    # drawn white), so a 128 x 300 map with 5 bands is ~200 KB of base64.
    z = np.transpose(band, (0, 2, 1)).reshape(len(units) * bands, len(steps)).astype(np.int8)
    z[np.repeat(empty, bands, axis=0)] = k
    height = (ends - units) / bands
    y = (units[:, None] + height[:, None] * (np.arange(bands)[None, :] + 0.5)).ravel()
    # The share of each band's own state in its cell, one byte per band; the whole mix is on the fill panel.
    percents = np.clip(np.rint(100 * shares), 0, 100).astype("uint8")
    own_share = np.take_along_axis(np.repeat(percents, bands, axis=0), z.astype(np.int64).clip(0, k - 1)[..., None], 2)
    fill_pct = None
    if fill is not None and not fill.empty:
        _require(fill, ["step_bin", "unit_bin", "fill"], "fragmentation fill")
        f = fill.set_index(["unit_bin", "step_bin"])["fill"].reindex(full).to_numpy(np.float64)
        fill_pct = f.reshape(len(units), len(steps))
    mix = "<br>".join(f"{state_label(s)}: %{{customdata[{i}]}}%" for i, s in enumerate(states))
    rows = 2 if fill_pct is not None else 1
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.1,
        subplot_titles=(
            ["mix of states (each cell banded by its states' shares)", "fill of reserved units (tokens / slots)"]
            if rows == 2
            else None
        ),
    )
    scale = _discrete_colorscale(states)
    scale = [[v * k / (k + 1), c] for v, c in scale] + [[k / (k + 1), "#ffffff"], [1.0, "#ffffff"]]
    band_hover = "steps from %{x}, units near %{y:.0f}<br>this band's state: %{customdata[0]}% of the cell"
    if fill_pct is None:
        band_hover = "steps from %{x}, units near %{y:.0f}<br>" + mix
        custom = np.repeat(percents, bands, axis=0)
    else:
        band_hover += "<br>(hover the fill panel below for every state's share)"
        custom = own_share
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=steps,
            y=y,
            zmin=-0.5,
            zmax=k + 0.5,
            colorscale=scale,
            showscale=False,
            customdata=custom,
            hovertemplate=band_hover + "<extra></extra>",
        ),
        row=1,
        col=1,
    )
    if fill_pct is not None:
        fig.add_trace(
            go.Heatmap(
                z=(100 * fill_pct).astype(np.float32),
                x=steps,
                y=(units + ends) / 2,
                zmin=0,
                zmax=100,
                colorscale=FILL_SCALE,
                colorbar=dict(title=dict(text="fill %"), len=0.42, y=0.0, yanchor="bottom"),
                customdata=percents,
                hovertemplate="steps from %{x}, units near %{y:.0f}<br>fill of reserved units: %{z:.1f}%<br>"
                + mix
                + "<extra></extra>",
            ),
            row=2,
            col=1,
        )
    _legend_swatches(fig, states)
    unit_title = "block / page / token slot"
    fig.update_yaxes(title=dict(text=unit_title), autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False)
    fig.update_xaxes(title=dict(text="engine step (bin start)"), row=rows, col=1)
    base_layout(
        fig,
        title,
        height=760 if rows == 2 else 480,
        showlegend=True,
        legend=dict(title=dict(text="state"), y=1.0, yanchor="top"),
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
    return _grid_figure(heat, present, title, rows, cols, row_px=18, unit="block / page", legend="state")


def _grid_figure(
    heat: go.Heatmap,
    states: list[str],
    title: str,
    rows: int,
    cols: int,
    *,
    row_px: int,
    unit: str,
    legend: str,
    per_cell: int = 1,
) -> go.Figure:
    """A state heatmap laid out as a rows x cols memory map (row-major, first unit top left) with a state legend.
    The y ticks name the first block / page id of a row, so the axes read as ids, not as arithmetic."""
    fig = go.Figure(heat)
    _legend_swatches(fig, states)
    step = max(1, math.ceil(rows / 12))
    ticks = list(range(0, rows, step))
    base_layout(
        fig,
        title,
        height=min(700, max(260, row_px * rows + 140)),
        xaxis=dict(
            title=dict(text=f"{unit}s in id order, {cols * per_cell:,} per row"),
            showgrid=False,
            showticklabels=False,
            ticks="",
        ),
        yaxis=dict(
            title=dict(text=f"first {unit} id of the row"),
            autorange="reversed",
            showgrid=False,
            tickvals=ticks,
            ticktext=[f"{r * cols * per_cell:,}" for r in ticks],
        ),
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
    return _grid_figure(
        heat, present, title, rows, cols, row_px=6, unit="block / page", legend="majority state", per_cell=per
    )


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
