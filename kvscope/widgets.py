"""The notebook explorer of one trace: one anywidget showing the block map, the sharing tree and the memory timeline
on one step cursor (a slider and a play button; moving the cursor redraws all three).

    import kvscope
    kvscope.explore("out/paged.kvtrace")     # or a loaded Trace; a notebook displays it as a cell's result
    %kvscope explore out/paged.kvtrace       # the same, from the magic

It works wherever anywidget does (JupyterLab, Jupyter Notebook 7, VS Code, Colab, marimo): the front end is one ES
module (kvscope/templates/explorer.js, plain canvas and SVG drawing, nothing fetched from a CDN) and its CSS, shipped
inside the package. Data flows one way: kvscope.present.explorer computes every payload from kvscope.analysis; the
front end only draws. The whole-run parts (the timeline, the map's cell ranges, the prefix tree's layout) are sent
once; moving the cursor sets the `step` trait, and this object answers with that step's `step_data` (~15 KB for a
2,048-cell map), so a big trace never travels whole. Clicking a map cell sets `probe`; `probe_text` says what the
cell holds at the step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from kvscope.present.explorer import ExplorerData, default_tree
from kvscope.present.figures import rich_frontend
from kvscope.trace import Trace, load_trace

ASSETS = Path(__file__).resolve().parent / "templates"
ESM_PATH = ASSETS / "explorer.js"
CSS_PATH = ASSETS / "explorer.css"


def as_trace(trace_or_path: Trace | str | os.PathLike) -> Trace:
    return trace_or_path if isinstance(trace_or_path, Trace) else load_trace(trace_or_path)


class TraceExplorer(anywidget.AnyWidget):
    """The explorer widget. Traits the front end reads once: `meta` (title, step range, the map's states),
    `blocks` (the map's cells), `timeline`, `tree` (the sharing tree's kind, legend and fixed layout). Traits
    that move: `step` (the cursor; set it from Python too), `step_data` (what the cursor's step shows, answered
    to every `step` change), `tree_kind` (prefix tree or fork families, when a run has both), `probe` /
    `probe_text` (a clicked cell and what it holds)."""

    _esm = ESM_PATH.read_text(encoding="utf-8")
    _css = CSS_PATH.read_text(encoding="utf-8")

    meta = traitlets.Dict().tag(sync=True)
    blocks = traitlets.Dict().tag(sync=True)
    timeline = traitlets.Dict().tag(sync=True)
    tree = traitlets.Dict().tag(sync=True)
    tree_kind = traitlets.Unicode("").tag(sync=True)
    step = traitlets.Int(0).tag(sync=True)
    step_data = traitlets.Dict().tag(sync=True)
    probe = traitlets.Int(-1).tag(sync=True)
    probe_text = traitlets.Unicode("").tag(sync=True)

    def __init__(self, trace: Trace, *, step: int | None = None, tree: str | None = None) -> None:
        data = ExplorerData(trace)
        kind = default_tree(data) if tree is None else tree
        if kind and kind not in data.tree_kinds:
            offered = ", ".join(data.tree_kinds) or "none: the run shared nothing"
            raise ValueError(f"explore: tree {kind!r} does not apply to {trace.name} (offered: {offered})")
        self.trace = trace
        self.data = data
        start = data.snap(data.start if step is None else step)
        super().__init__(
            meta=data.header(),
            blocks=data.blocks(),
            timeline=data.timeline(),
            tree=data.tree(kind),
            tree_kind=kind,
            step=start,
            step_data=data.step(start, kind),
        )

    # ---- the cursor and the choices, from the front end or from Python -----------------------------------------
    @traitlets.validate("step")
    def _clamp(self, proposal: dict[str, Any]) -> int:
        return self.data.snap(min(max(int(proposal["value"]), self.data.first), self.data.last))

    @traitlets.observe("step")
    def _on_step(self, change: dict[str, Any]) -> None:
        self.step_data = self.data.step(int(change["new"]), self.tree_kind)
        self._on_probe()

    @traitlets.validate("tree_kind")
    def _check_tree(self, proposal: dict[str, Any]) -> str:
        kind = str(proposal["value"])
        return kind if kind in self.data.tree_kinds else default_tree(self.data)

    @traitlets.observe("tree_kind")
    def _on_tree(self, change: dict[str, Any]) -> None:
        self.tree = self.data.tree(str(change["new"]))
        self.step_data = self.data.step(self.step, str(change["new"]))

    @traitlets.observe("probe")
    def _on_probe(self, _change: dict[str, Any] | None = None) -> None:
        self.probe_text = self.data.cell_text(self.step, self.probe) if self.probe >= 0 else ""

    # ---- display -------------------------------------------------------------------------------------------
    def text(self) -> str:
        """The explorer in words: what a terminal, or a notebook exported without widget state, shows."""
        return (
            f"kvscope explorer of {self.trace.name}: {self.step_data.get('readout', '')}\n"
            f"(widgets need a notebook frontend; in a terminal try `kvscope dashboard {self.trace.name}`)"
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict, dict] | None:
        if not rich_frontend() and not in_marimo():  # a terminal cannot draw widgets: say where the explorer works
            return {"text/plain": self.text()}, {}
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is not None:
            bundle[0]["text/plain"] = self.text()
        return bundle

    def __repr__(self) -> str:
        return f"<kvscope explorer of {self.trace.name} at step {self.step}>"


def in_marimo() -> bool:
    """True inside a marimo notebook, which draws anywidgets itself (it has no Jupyter kernel)."""
    marimo = sys.modules.get("marimo")
    try:
        return bool(marimo is not None and marimo.running_in_notebook())
    except Exception:  # an old or partial marimo: not one to draw widgets for
        return False


def explore(
    trace_or_path: Trace | str | os.PathLike, *, step: int | None = None, tree: str | None = None
) -> TraceExplorer:
    """The explorer of a trace (a Trace or a .kvtrace path), starting at `step` (default: where the most memory
    was reserved) with the sharing tree `tree` ("prefix" or "forks"; default: the first the run has)."""
    return TraceExplorer(as_trace(trace_or_path), step=step, tree=tree)
