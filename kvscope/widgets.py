"""Notebook explorer for one trace: a step slider driving the block grid, the fragmentation map and the sharing
graph, with a view selector.

    from kvscope.widgets import explore
    explore("out/paged.kvtrace")          # or a loaded Trace; in a notebook the last expression displays it

Figures go into an ipywidgets Output (plotly's FigureWidget would need anywidget, an extra dependency); each step
change redraws the selected view through the catalog of kvscope.present.views, the builders the report and the
dashboard draw with.
"""

from __future__ import annotations

import html
import os
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go
from IPython.display import clear_output, display

from kvscope.analysis.memory import memory_at, step_range
from kvscope.present.rows import format_value
from kvscope.present.views import VIEWS as CATALOG
from kvscope.present.views import View, start_step
from kvscope.trace import Trace, load_trace
from kvscope.units import format_bytes

# The explorer's views (its own keys, kept from before the catalog) -> the catalog's; stepped views redraw at the
# slider's step, whole-run views are drawn once and get a marker at it.
EXPLORED: dict[str, str] = {"blocks": "blocks", "map": "fragmentation", "sharing": "sharing"}


def view_label(view: View) -> str:
    return f"{view.label} at the step" if view.stepped else f"{view.label} (whole run)"


VIEWS: dict[str, str] = {key: view_label(CATALOG[name]) for key, name in EXPLORED.items()}


def as_trace(trace_or_path: Trace | str | os.PathLike) -> Trace:
    return trace_or_path if isinstance(trace_or_path, Trace) else load_trace(trace_or_path)


class TraceExplorer:
    """The widget tree and its state. `widget` is what a notebook shows; `figure` the figure now drawn. The view
    selector offers the views that apply to the trace (no sharing graph for a run that shared nothing)."""

    def __init__(self, trace: Trace, *, view: str = "blocks", step: int | None = None) -> None:
        if view not in VIEWS:
            raise ValueError(f"view: {view!r} is not one of {', '.join(VIEWS)}")
        offered = [key for key in VIEWS if CATALOG[EXPLORED[key]].applies(trace)]
        if view not in offered:
            raise ValueError(f"view: {view!r} does not apply to {trace.name}: {CATALOG[EXPLORED[view]].absent}")
        self.trace = trace
        first, last = step_range(trace)
        step = start_step(trace) if step is None else step  # like the dashboard's fragmentation page
        self._whole_run: dict[str, go.Figure] = {}
        self.figure: go.Figure | None = None

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
        self.view = w.ToggleButtons(options=[(VIEWS[key], key) for key in offered], value=view)
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
    def figure_for(self, view: str, step: int) -> go.Figure:
        """The explorer's `view` at `step`: a stepped view drawn at it, or a whole-run view with a marker there."""
        if view not in VIEWS:
            raise ValueError(f"view: {view!r} is not one of {', '.join(VIEWS)}")
        entry = CATALOG[EXPLORED[view]]
        if entry.stepped:
            return entry.figure(self.trace, step)
        if view not in self._whole_run:
            self._whole_run[view] = entry.figure(self.trace)
        fig = go.Figure(self._whole_run[view])  # a copy: the step marker moves, the figure stays
        fig.add_vline(x=step, line=dict(color="black", width=1.5, dash="dot"))
        fig.add_annotation(x=step, y=1.02, yref="paper", text=f"step {step}", showarrow=False)
        return fig

    def refresh(self) -> None:
        """Redraw the selected view at the slider's step."""
        step = int(self.slider.value)
        self.figure = self.figure_for(self.view.value, step)
        self.info.value = self._info_html(step)
        with self.output:
            clear_output(wait=True)
            display(self.figure)

    def _on_change(self, _change: dict[str, Any]) -> None:
        self.refresh()

    def _info_html(self, step: int) -> str:
        r = memory_at(self.trace, step)
        if r is None:
            return f"step {step}: no memory sample"
        parts = [
            f"reserved {format_bytes(int(r['reserved']))}",
            f"used {format_bytes(int(r['used']))}",
            f"waste {format_bytes(int(r['waste']))} ({format_value(r, 'waste_frac', 'pct')} of reserved)",
            f"cached-idle {format_bytes(int(r['cached_idle']))}",
            f"free {format_bytes(int(r['free']))}",
        ]
        if int(r.get("sharing_saved", 0) or 0) > 0:
            parts.append(f"saved by sharing {format_bytes(int(r['sharing_saved']))}")
        return f"step {step}: " + " · ".join(parts)

    # ---- display -------------------------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        display(self.widget)


def explore(
    trace_or_path: Trace | str | os.PathLike, *, view: str = "blocks", step: int | None = None
) -> TraceExplorer:
    """An explorer for a trace (a Trace or a .kvtrace path); a notebook displays it when it is a cell's result."""
    return TraceExplorer(as_trace(trace_or_path), view=view, step=step)


def _escape(text: str) -> str:
    return html.escape(str(text), quote=False)
