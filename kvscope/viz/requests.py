"""Request lifetimes: when each request waited and when it held KV memory (Gantt-like); for many requests, the
same picture aggregated into request groups x step bins."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

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
_MAX_GROUPS = 120
_MAX_STEP_BINS = 400


def _intervals(df: pd.DataFrame, last_step: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(arrive, admit, end, finished) in steps. A request holds KV through its finish step, so `end` is
    finish + 1; one still running (or never admitted) at the end of the trace is drawn up to `last_step` + 1."""
    arrive = numeric(df["arrive_step"])
    admit = numeric(df["admit_step"])
    finish = numeric(df["finish_step"])
    finished = np.isfinite(finish) & (finish >= 0)
    admitted = np.isfinite(admit) & (admit >= 0)
    end = np.where(finished, finish + 1, last_step + 1)
    admit = np.where(admitted, admit, end)  # never admitted: waited until it finished (rejected) or the trace ended
    arrive = np.where(np.isfinite(arrive) & (arrive >= 0), arrive, admit)
    return arrive, admit, end, finished


def request_lifetimes_figure(
    lifetimes: pd.DataFrame,
    *,
    title: str = TITLE,
    last_step: int | None = None,
    max_requests: int = MAX_GANTT_REQUESTS,
) -> go.Figure:
    """Input: analysis.requests.request_lifetimes(trace). Up to `max_requests` requests: one row each (ordered by
    arrival), a waiting bar from arrival to admission and a running bar from admission to finish; preempted
    requests' running bars are hatched. Hover: request id, seq, prompt/output lengths, steps, preemptions,
    prefix-cache hits. More requests: a heat map of request groups x step bins coloured by the share of the
    group's requests holding KV (hover adds the share waiting)."""
    _require(lifetimes, LIFETIME_COLUMNS, "request lifetimes")
    if lifetimes.empty:
        return empty_figure(title, "no requests in this trace")
    df = _arrival_order(lifetimes)
    steps = np.concatenate([numeric(df[c]) for c in ("arrive_step", "admit_step", "finish_step")])
    if last_step is None:
        finite = steps[np.isfinite(steps)]
        last_step = int(finite.max()) if finite.size else 0
    if len(df) > max_requests:
        return _aggregated(df, title, float(last_step))
    return _gantt(df, title, float(last_step))


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


def _gantt(df: pd.DataFrame, title: str, last_step: float) -> go.Figure:
    arrive, admit, end, finished = _intervals(df, last_step)
    rows = np.arange(len(df))
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

    def add(mask: np.ndarray, start: np.ndarray, stop: np.ndarray, state: str, name: str, pattern: str = "") -> None:
        if not mask.any():
            return
        fig.add_trace(
            go.Bar(
                y=rows[mask],
                base=start[mask],
                x=(stop - start)[mask],
                orientation="h",
                name=name,
                width=bar_width,
                marker=dict(color=state_color(state), line=dict(width=0), pattern=dict(shape=pattern)),
                text=[ids[i] for i in np.flatnonzero(mask)],
                textposition="none",
                customdata=info[mask],
                hovertemplate=hover,
            )
        )

    waited = admit > arrive
    add(waited, arrive, admit, "waiting", state_label("waiting"))
    running = end > admit
    add(running & finished & ~preempted, admit, end, "running", state_label("running"))
    add(running & finished & preempted, admit, end, "running", "running, preempted at least once", "x")
    add(running & ~finished, admit, end, "unfinished", state_label("unfinished"))
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
        fig.update_yaxes(tickmode="array", tickvals=rows, ticktext=ids)
    return fig


def _occupancy(start: np.ndarray, stop: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Step-weighted share of each bin [edges[j], edges[j+1]) covered by [start, stop), summed over requests:
    F(e) = sum clip(e - start, 0, stop - start) is the covered length up to e, so a bin gets F(right) - F(left)."""
    length = np.maximum(stop - start, 0)
    cover = np.clip(edges[None, :] - start[:, None], 0, length[:, None]).sum(axis=0)
    return np.diff(cover)


def _aggregated(df: pd.DataFrame, title: str, last_step: float) -> go.Figure:
    arrive, admit, end, _ = _intervals(df, last_step)
    n = len(df)
    groups = min(_MAX_GROUPS, n)
    bounds = np.linspace(0, n, groups + 1).round().astype(int)
    first = float(np.nanmin(arrive))
    width = max(1, int(np.ceil((last_step + 1 - first) / _MAX_STEP_BINS)))
    edges = np.arange(first, last_step + 1 + width, width, dtype=float)
    bin_len = np.diff(edges)
    running = np.empty((groups, len(edges) - 1))
    waiting = np.empty_like(running)
    for g in range(groups):
        a, b = bounds[g], bounds[g + 1]
        size = (b - a) * bin_len
        running[g] = _occupancy(admit[a:b], end[a:b], edges) / size
        waiting[g] = _occupancy(arrive[a:b], admit[a:b], edges) / size
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
