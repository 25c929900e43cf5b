"""Request lifetimes: when each request waited, ran and was swapped out (Gantt-like); for many requests, the same
picture aggregated into request groups x step bins.

The phases drawn are kvscope.analysis.requests.request_phases(trace): the same ones request_occupancy counts and the
Perfetto export's "requests" counter shows, so every surface has one definition of waiting and running. The figure
only places them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvscope.analysis.requests import PHASE_COLUMNS, lifetime_phases
from kvscope.viz._common import MAX_GANTT_REQUESTS, base_layout, empty_figure, esc, numeric, truncate
from kvscope.viz._common import require_columns as _require
from kvscope.viz.palette import COUNT_SCALE, state_color, state_label

LIFETIME_COLUMNS = [
    "seq",
    "request_id",
    "parent",
    "arrive_step",
    "admit_step",
    "finish_step",
    "prompt_len",
    "output_len",
    "preemptions",
    "prefix_hit_tokens",
]
TITLE = "Request lifetimes"
SWAPPED_LABEL = "swapped out (KV on the CPU)"
_MAX_GROUPS = 120
_MAX_STEP_BINS = 400


def request_lifetimes_figure(
    lifetimes: pd.DataFrame,
    phases: pd.DataFrame | None = None,
    *,
    title: str = TITLE,
    last_step: int | None = None,
    max_requests: int = MAX_GANTT_REQUESTS,
) -> go.Figure:
    """Input: analysis.requests.request_lifetimes(trace) (one row per sequence: the rows, their order and hover)
    and analysis.requests.request_phases(trace) (the bars: one per waiting, running or swapped phase; without it,
    analysis.requests.lifetime_phases(lifetimes), which cannot see preemptions). Up to `max_requests` sequences:
    one row each (ordered by arrival, a forked sample under its request), a bar per phase; running bars of
    preempted sequences are hatched, and phases still open when the trace ends are drawn through `last_step`
    (default: the last step the frames name) as unfinished. Hover: request id, seq, prompt/output lengths, steps,
    preemptions, prefix-cache hits. More sequences: a heat map of request groups x step bins coloured by the share
    of the group's sequences running (hover adds the share waiting)."""
    _require(lifetimes, LIFETIME_COLUMNS, "request lifetimes")
    if lifetimes.empty:
        return empty_figure(title, "no requests in this trace")
    df = _arrival_order(lifetimes)
    if phases is None:
        phases = lifetime_phases(lifetimes, last_step)
    _require(phases, PHASE_COLUMNS, "request phases")
    row_of = pd.Series(np.arange(len(df)), index=df["seq"].to_numpy())
    phases = phases[phases["seq"].isin(row_of.index)]
    start = numeric(phases["start_step"])
    stop = numeric(phases["end_step"])
    if last_step is None:
        steps = np.concatenate([numeric(df[c]) for c in ("arrive_step", "admit_step", "finish_step")] + [stop - 1])
        finite = steps[np.isfinite(steps)]
        last_step = int(finite.max()) if finite.size else 0
    is_open = phases["open"].to_numpy(bool)
    bars = pd.DataFrame(
        {
            "row": row_of.reindex(phases["seq"]).to_numpy(),
            "phase": phases["phase"].astype(str).to_numpy(),
            "start": start,
            "stop": np.where(is_open, np.maximum(stop, last_step + 1), stop),
            "open": is_open,
        }
    )
    if len(df) > max_requests:
        return _aggregated(df, bars, title, float(last_step))
    return _gantt(df, bars, title)


def _arrival_order(lifetimes: pd.DataFrame) -> pd.DataFrame:
    """Rows in arrival order, a forked sample (no arrival of its own) right after the request it came from."""
    seq = numeric(lifetimes["seq"])
    arrive = numeric(lifetimes["arrive_step"])
    start = np.where(np.isfinite(arrive) & (arrive >= 0), arrive, numeric(lifetimes["admit_step"]))
    family = numeric(lifetimes["root"]) if "root" in lifetimes.columns else seq
    start_of = dict(zip(seq.tolist(), start.tolist(), strict=True))
    family_start = np.array([start_of.get(f, s) for f, s in zip(family.tolist(), start.tolist(), strict=True)])
    order = np.lexsort((seq, family, family_start))
    return lifetimes.iloc[order].reset_index(drop=True)


def _what(df: pd.DataFrame) -> str:
    """'40 requests', or '40 requests, 96 sequences' when samples were forked."""
    n = len(df)
    forks = int((numeric(df["parent"]) >= 0).sum())
    return f"{n} requests" if forks == 0 else f"{n - forks} requests, {n} sequences"


def _gantt(df: pd.DataFrame, bars: pd.DataFrame, title: str) -> go.Figure:
    preempted = numeric(df["preemptions"]) > 0
    ids = [esc(truncate(str(v), 60)) for v in df["request_id"]]
    info = np.stack(
        [
            numeric(df["seq"]),
            numeric(df["prompt_len"]),
            numeric(df["output_len"]),
            numeric(df["arrive_step"]),
            numeric(df["admit_step"]),
            numeric(df["finish_step"]),
            numeric(df["preemptions"]),
            numeric(df["prefix_hit_tokens"]),
            numeric(df["parent"]),
        ],
        axis=1,
    ).astype("float32")
    hover = (
        "request %{text} (seq %{customdata[0]})<br>prompt %{customdata[1]} tokens, output %{customdata[2]}"
        "<br>arrived step %{customdata[3]}, admitted %{customdata[4]}, finished %{customdata[5]}"
        "<br>preemptions %{customdata[6]}, prefix-cache hit tokens %{customdata[7]}"
    )
    if np.any(info[:, 8] >= 0):  # forked children (parallel sampling, beam search) name their parent
        hover += "<br>parent seq %{customdata[8]}"
    hover += "<extra>%{fullData.name}</extra>"
    bar_width = 0.8 if len(df) <= 200 else 1.0
    fig = go.Figure()
    row = bars["row"].to_numpy()
    start, stop = bars["start"].to_numpy(), bars["stop"].to_numpy()

    def add(mask: np.ndarray, state: str, name: str, pattern: str = "") -> None:
        if not mask.any():
            return
        rows = row[mask]
        fig.add_trace(
            go.Bar(
                y=rows,
                base=start[mask],
                x=(stop - start)[mask],
                orientation="h",
                name=name,
                width=bar_width,
                marker=dict(color=state_color(state), line=dict(width=0), pattern=dict(shape=pattern)),
                text=[ids[i] for i in rows],
                textposition="none",
                customdata=info[rows],
                hovertemplate=hover,
            )
        )

    phase = bars["phase"].to_numpy()
    is_open = bars["open"].to_numpy()
    running = phase == "running"
    was_preempted = preempted[row]
    add(phase == "waiting", "waiting", state_label("waiting"))
    add(running & ~is_open & ~was_preempted, "running", state_label("running"))
    add(running & ~is_open & was_preempted, "running", "running, preempted at least once", "x")
    add(running & is_open, "unfinished", state_label("unfinished"))
    add(phase == "swapped", "swapped", SWAPPED_LABEL)
    base_layout(
        fig,
        f"{title} ({_what(df)})",
        height=min(900, max(320, 8 * len(df) + 160)),
        barmode="overlay",
        bargap=0,
        hovermode="closest",
        xaxis=dict(title=dict(text="engine step")),
        yaxis=dict(
            title=dict(text="request / sequence (in arrival order)"),
            autorange="reversed",
            showticklabels=len(df) <= 40,
            ticks="outside" if len(df) <= 40 else "",
            showgrid=False,
        ),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0.3),
    )
    if len(df) <= 40:
        fig.update_yaxes(tickmode="array", tickvals=np.arange(len(df)), ticktext=ids)
    return fig


def _occupancy(start: np.ndarray, stop: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Step-weighted share of each bin [edges[j], edges[j+1]) covered by [start, stop), summed over requests:
    F(e) = sum clip(e - start, 0, stop - start) is the covered length up to e, so a bin gets F(right) - F(left)."""
    length = np.maximum(stop - start, 0)
    cover = np.clip(edges[None, :] - start[:, None], 0, length[:, None]).sum(axis=0)
    return np.diff(cover)


def _aggregated(df: pd.DataFrame, bars: pd.DataFrame, title: str, last_step: float) -> go.Figure:
    n = len(df)
    groups = min(_MAX_GROUPS, n)
    bounds = np.linspace(0, n, groups + 1).round().astype(int)
    first = float(bars["start"].min()) if len(bars) else 0.0
    width = max(1, int(np.ceil((last_step + 1 - first) / _MAX_STEP_BINS)))
    edges = np.arange(first, last_step + 1 + width, width, dtype=float)
    bin_len = np.diff(edges)
    running = np.zeros((groups, len(edges) - 1))
    waiting = np.zeros_like(running)
    group_of = np.searchsorted(bounds, bars["row"].to_numpy(), side="right") - 1
    phase = bars["phase"].to_numpy()
    in_phase = {name: phase == name for name in ("running", "waiting")}  # (strings: compared once, not per group)
    start, stop = bars["start"].to_numpy(), bars["stop"].to_numpy()
    for g in range(groups):
        size = (bounds[g + 1] - bounds[g]) * bin_len
        mine = group_of == g
        for name, out in (("running", running), ("waiting", waiting)):
            m = mine & in_phase[name]
            out[g] = _occupancy(start[m], stop[m], edges) / size
    percents = np.stack([np.rint(100 * running), np.rint(100 * waiting)], axis=2).astype("uint8")
    fig = go.Figure(
        go.Heatmap(
            z=running,
            x=edges[:-1],
            y=bounds[:-1],
            zmin=0,
            # Each sequence holds KV for a short part of a long run: scale to the busiest cell, not to 100%.
            zmax=max(float(np.nanmax(running)), 0.01),
            colorscale=COUNT_SCALE,
            customdata=percents,
            colorbar=dict(title=dict(text="share of the group<br>holding KV"), tickformat=".0%"),
            hovertemplate=(
                "requests from #%{y} in arrival order, steps from %{x}<br>running (holds KV): %{customdata[0]}%"
                "<br>waiting: %{customdata[1]}%<extra></extra>"
            ),
        )
    )
    per = int(np.ceil(n / groups))
    base_layout(
        fig,
        f"{title} ({_what(df)}; aggregated: ~{per} sequences x {width} steps per cell)",
        height=520,
        xaxis=dict(title=dict(text=f"engine step ({width}-step bins)"), showgrid=False),
        yaxis=dict(title=dict(text="request # in arrival order (groups)"), autorange="reversed", showgrid=False),
    )
    return fig
