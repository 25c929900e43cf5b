"""How a notebook shows traces (the %kvscope magic): the summary table, then the catalog's views one after another,
each under its title and caption, with the views left out of a run and why."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
from IPython.display import HTML, Markdown, display

from kvscope.analysis.memory import FIELDS, memory_timeline
from kvscope.present.rows import CUT_OFF_NOTE
from kvscope.present.tables import summary_frame
from kvscope.present.views import COMPARISON, VIEWS, select, split
from kvscope.trace import Trace
from kvscope.units import format_bytes


def _escape(text: str) -> str:
    return html.escape(str(text), quote=False)


def show_traces(traces: Sequence[Trace], *, views: Iterable[str] | None = None) -> None:
    """The summary table, then every view of each trace that applies to it (or only `views`, by catalog key: a
    ValueError names an unknown one); a line names the views left out and why."""
    keys = None if views is None else [view.key for view in select(views)]  # refused before anything is shown
    display(summary_frame(traces))
    for trace in traces:
        shown, absent = split(trace, keys)
        if len(traces) > 1:
            display(HTML(f"<h3>{_escape(trace.label)} — {_escape(trace.name)}</h3>"))
        if trace.truncated:
            display(Markdown(f"*{CUT_OFF_NOTE}*"))
        for view in shown:
            display(Markdown(f"**{view.heading(trace)}.** {view.caption}"))
            display(view.figure(trace))
        if absent:
            display(Markdown("*Not shown for this run:* " + "; ".join(f"**{v.label}**: {v.absent}" for v in absent)))


def show_allocator_state(trace: Trace) -> None:
    """A hand-driven allocator (recorded by %%kvscope: no engine, so no requests or steps): its books at the end of
    the code and its blocks / pages, plus the sharing graph when blocks are shared."""
    timeline = memory_timeline(trace)
    if timeline.empty:
        display(Markdown(f"*{_escape(trace.label)}: no memory sample recorded.*"))
        return
    last: Any = timeline.iloc[-1]
    step = int(last["step"])
    books = pd.DataFrame(
        {"bytes": [format_bytes(int(last[f])) for f in FIELDS]},  # the Usage fields, as the timeline holds them
        index=pd.Index(FIELDS, name=f"{trace.label}: allocator's books at the end of the cell"),
    )
    display(books)
    display(VIEWS["blocks"].figure(trace, step))
    if VIEWS["sharing"].applies(trace):
        display(VIEWS["sharing"].figure(trace, step))


def compare_traces(traces: Sequence[Trace]) -> None:
    """The summary table side by side (columns named 'label (file)') and the comparison figure."""
    display(summary_frame(traces, [f"{t.label} ({t.name})" for t in traces]))
    display(COMPARISON.figure(traces))
