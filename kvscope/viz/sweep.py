"""Figures of a sweep: the Pareto front (memory vs throughput vs latency) and the what-if curves against KV memory.

Builders lay out what kvscope.sweep.analysis returns (configurations with a `front` flag, the long what-if frame)
and compute nothing; every text from the table (labels, workload names) is escaped.
"""

from __future__ import annotations

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from kvscope.viz._common import base_layout, byte_unit, empty_figure, esc, numeric, require_columns

_COLORS = pio.templates["plotly"].layout.colorway  # one colour per series, the same in both figures


def _color_of(series: list[str]) -> dict[str, str]:
    """Colours by sorted name, so a configuration has the same colour in both figures of a page."""
    return {s: _COLORS[i % len(_COLORS)] for i, s in enumerate(sorted(set(series)))}


def pareto_figure(
    configs, *, memory: str, throughput: str, latency: str, latency_title: str, title: str = "Pareto front"
) -> go.Figure:
    """Two panels over the same configurations: throughput against KV memory, and latency against throughput.
    A configuration on the front (no other has less memory, more throughput and less latency) is drawn large with a
    black ring; the others small and faded. Hover shows all three objectives and the seeds averaged."""
    require_columns(configs, ["series", "seeds", "front", memory, throughput, latency], "pareto_figure")
    if configs.empty:
        return empty_figure(title, "no successful runs to draw")
    div, unit = byte_unit(float(numeric(configs[memory]).max() or 1))
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("throughput vs KV memory", "latency vs throughput"),
        horizontal_spacing=0.1,
    )
    series = sorted(set(configs["series"].astype(str)))
    colors = _color_of(series)
    hover = (
        "%{customdata[0]}<br>KV memory %{customdata[1]:.3g} " + unit + "<br>%{customdata[2]:,.0f} tokens/s<br>"
        f"{esc(latency_title)} %{{customdata[3]:.4g}}<br>%{{customdata[4]}} seed(s)%{{customdata[5]}}<extra></extra>"
    )
    for name in series:
        part = configs[configs["series"].astype(str) == name]
        for on_front in (True, False):
            sub = part[part["front"] == on_front]
            if sub.empty:
                continue
            mem = numeric(sub[memory]) / div
            thr = numeric(sub[throughput])
            lat = numeric(sub[latency])
            custom = list(
                zip(
                    [esc(name)] * len(sub),
                    mem,
                    thr,
                    lat,
                    sub["seeds"].tolist(),
                    ["<br><b>on the front</b>" if on_front else ""] * len(sub),
                    strict=True,
                )
            )
            marker = dict(
                color=colors[name],
                size=13 if on_front else 8,
                opacity=1.0 if on_front else 0.45,
                line=dict(color="black", width=2) if on_front else dict(width=0),
            )
            common = dict(
                mode="markers",
                marker=marker,
                customdata=custom,
                hovertemplate=hover,
                legendgroup=name,
                name=esc(name),
            )
            fig.add_trace(
                go.Scatter(x=mem, y=thr, showlegend=bool(on_front or not part["front"].any()), **common), row=1, col=1
            )
            fig.add_trace(go.Scatter(x=thr, y=lat, showlegend=False, **common), row=1, col=2)
    fig.update_xaxes(title_text=f"KV memory ({unit})", row=1, col=1)
    fig.update_yaxes(title_text="generated tokens/s", rangemode="tozero", row=1, col=1)
    fig.update_xaxes(title_text="generated tokens/s", rangemode="tozero", row=1, col=2)
    fig.update_yaxes(title_text=esc(latency_title), rangemode="tozero", row=1, col=2)
    return base_layout(fig, title, height=480, legend=dict(title=dict(text="configuration")))


def what_if_figure(curves, *, title: str = "What if: each metric against KV memory") -> go.Figure:
    """One panel per metric (kvscope.sweep.analysis.what_if's long frame), one line per series, KV memory on x."""
    require_columns(curves, ["series", "kv_memory", "metric", "title", "value"], "what_if_figure")
    if curves.empty:
        return empty_figure(title, "no successful runs to draw")
    metrics = list(dict.fromkeys(curves["metric"]))
    titles = [str(curves.loc[curves["metric"] == m, "title"].iloc[0]) for m in metrics]
    cols = 2
    rows = (len(metrics) + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[esc(t) for t in titles], vertical_spacing=0.14)
    div, unit = byte_unit(float(numeric(curves["kv_memory"]).max() or 1))
    series = sorted(set(curves["series"].astype(str)))
    colors = _color_of(series)
    for i, metric in enumerate(metrics):
        r, c = i // cols + 1, i % cols + 1
        for name in series:
            part = curves[(curves["metric"] == metric) & (curves["series"].astype(str) == name)]
            if part.empty:
                continue
            fig.add_trace(
                go.Scatter(
                    x=numeric(part["kv_memory"]) / div,
                    y=numeric(part["value"]),
                    mode="lines+markers",
                    name=esc(name),
                    legendgroup=name,
                    showlegend=i == 0,
                    line=dict(color=colors[name], width=1.6),
                    hovertemplate=f"{esc(name)}<br>KV memory %{{x:.3g}} {unit}<br>%{{y:.4g}}<extra></extra>",
                ),
                row=r,
                col=c,
            )
        fig.update_xaxes(title_text=f"KV memory ({unit})", row=r, col=c)
        fig.update_yaxes(rangemode="tozero", row=r, col=c)
    return base_layout(fig, title, height=330 * rows + 60, legend=dict(title=dict(text="configuration")))
