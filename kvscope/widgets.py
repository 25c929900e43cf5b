"""Notebook explorer for one trace: a step slider driving the block grid, the fragmentation map and the sharing
graph, with a view selector.

    from kvscope.widgets import explore
    explore("out/paged.kvtrace")          # or a loaded Trace; in a notebook the last expression displays it

Figures go into an ipywidgets Output (plotly's FigureWidget would need anywidget, an extra dependency); each step
change redraws the selected view from kvscope.analysis + kvscope.viz, exactly like the report and the dashboard.
`summary_frame` (the `kvscope summary` table as a DataFrame) is shared with the %kvscope magic and the dashboard.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from kvscope.trace import Trace

VIEWS: dict[str, str] = {
    "blocks": "Blocks at the step",
    "map": "Fragmentation map (whole run)",
    "sharing": "Sharing graph at the step",
}
MAP_MAX_UNITS = 128  # the report's fragmentation-map resolution
MAP_MAX_STEPS = 300


def summary_frame(traces: list[Trace], names: list[str] | None = None) -> pd.DataFrame:
    """The `kvscope summary` table (same rows, labels and formatting as the CLI and the report): one row per
    figure, one column per trace."""
    from kvscope.analysis.summary import summarize
    from kvscope.report import summary_rows

    names = list(names) if names is not None else [t.name for t in traces]
    if len(names) != len(traces):
        raise ValueError(f"summary_frame: {len(traces)} traces but {len(names)} names")
    columns: dict[str, list[str]] = {}
    labels: list[str] = []
    for i, (trace, name) in enumerate(zip(traces, names, strict=True)):
        rows = [r for r in summary_rows(summarize(trace)) if r is not None]
        if i == 0:
            labels = [label for label, _ in rows]
        key = name if name not in columns else f"{name} ({i + 1})"
        columns[key] = [value for _, value in rows]
    return pd.DataFrame(columns, index=pd.Index(labels, name="figure"))


def as_trace(trace_or_path: Trace | str | os.PathLike) -> Trace:
    if isinstance(trace_or_path, Trace):
        return trace_or_path
    from kvscope.trace import load_trace

    return load_trace(trace_or_path)


class TraceExplorer:
    """The widget tree and its state. `widget` is what a notebook shows; `figure` the figure now drawn."""

    def __init__(self, trace: Trace, *, view: str = "blocks", step: int | None = None) -> None:
        import ipywidgets as w

        from kvscope.analysis.memory import peak_step, step_range

        if view not in VIEWS:
            raise ValueError(f"view: {view!r} is not one of {', '.join(VIEWS)}")
        self.trace = trace
        first, last = step_range(trace)
        if step is None:
            # Start where the pool was fullest (most reserved), like the dashboard's fragmentation page.
            step = peak_step(trace, "reserved")
            step = first if step is None else step
        self._map_figure = None
        self.figure = None

        self.slider = w.IntSlider(
            value=min(max(int(step), first), last),
            min=first,
            max=last,
            description="step",
            continuous_update=False,  # redraw when the handle is released, not on every pixel
            layout=w.Layout(width="60%"),
        )
        self.play = w.Play(min=first, max=last, step=max(1, (last - first) // 100), interval=400)
        w.jslink((self.play, "value"), (self.slider, "value"))
        self.view = w.ToggleButtons(options=[(label, key) for key, label in VIEWS.items()], value=view)
        self.info = w.HTML()
        self.output = w.Output()
        self.widget = w.VBox(
            [
                w.HTML(f"<b>{_escape(trace.label)}</b> — {_escape(trace.name)}"),
                self.view,
                w.HBox([self.play, self.slider]),
                self.info,
                self.output,
            ]
        )
        self.slider.observe(self._on_change, names="value")
        self.view.observe(self._on_change, names="value")
        self.refresh()

    # ---- figures -------------------------------------------------------------------------------------------
    def figure_for(self, view: str, step: int):
        from kvscope import viz
        from kvscope.analysis import fragmentation, sharing

        if view == "blocks":
            return viz.block_grid_figure(fragmentation.block_states(self.trace, step), step=step)
        if view == "sharing":
            return viz.sharing_graph_figure(sharing.sharing_edges(self.trace, step), step=step)
        if view == "map":
            import plotly.graph_objects as go

            if self._map_figure is None:
                matrix = fragmentation.state_matrix(self.trace, MAP_MAX_UNITS, MAP_MAX_STEPS)
                self._map_figure = viz.fragmentation_map_figure(matrix)
            fig = go.Figure(self._map_figure)  # a copy: the step marker moves, the map stays
            fig.add_vline(x=step, line=dict(color="black", width=1.5, dash="dot"))
            fig.add_annotation(x=step, y=1.02, yref="paper", text=f"step {step}", showarrow=False)
            return fig
        raise ValueError(f"view: {view!r} is not one of {', '.join(VIEWS)}")

    def refresh(self) -> None:
        """Redraw the selected view at the slider's step."""
        from IPython.display import clear_output, display

        step = int(self.slider.value)
        self.figure = self.figure_for(self.view.value, step)
        self.info.value = self._info_html(step)
        with self.output:
            clear_output(wait=True)
            display(self.figure)

    def _on_change(self, _change: dict[str, Any]) -> None:
        self.refresh()

    def _info_html(self, step: int) -> str:
        from kvscope.analysis.memory import memory_at
        from kvscope.units import format_bytes

        r = memory_at(self.trace, step)
        if r is None:
            return f"step {step}: no memory sample"
        parts = [
            f"reserved {format_bytes(int(r['reserved']))}",
            f"used {format_bytes(int(r['used']))}",
            f"waste {format_bytes(int(r['waste']))} ({100 * float(r['waste_frac']):.1f}% of reserved)",
            f"cached-idle {format_bytes(int(r['cached_idle']))}",
            f"free {format_bytes(int(r['free']))}",
        ]
        if int(r.get("sharing_saved", 0) or 0) > 0:
            parts.append(f"saved by sharing {format_bytes(int(r['sharing_saved']))}")
        return f"step {step}: " + " · ".join(parts)

    # ---- display -------------------------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def explore(
    trace_or_path: Trace | str | os.PathLike, *, view: str = "blocks", step: int | None = None
) -> TraceExplorer:
    """An explorer for a trace (a Trace or a .kvtrace path); a notebook displays it when it is a cell's result."""
    return TraceExplorer(as_trace(trace_or_path), view=view, step=step)


def _escape(text: str) -> str:
    import html

    return html.escape(str(text), quote=False)
