"""How a notebook shows traces (the %kvscope magic): the summary table, then the catalog's views one after another,
each under its title and caption, with the views left out of a run and why.

Figures go out through kvscope.present.figures (interactive plotly + a static PNG + text). In a terminal IPython
everything is text: the tables print, headings and captions print as lines, and each figure prints its title."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
from IPython.display import HTML, Markdown, display

from kvscope.analysis.memory import FIELDS, memory_timeline
from kvscope.present.figures import rich_frontend, show_figure
from kvscope.present.rows import CUT_OFF_NOTE
from kvscope.present.tables import summary_frame
from kvscope.present.views import COMPARISON, VIEWS, select, split
from kvscope.trace import Trace
from kvscope.units import format_bytes


def _escape(text: str) -> str:
    return html.escape(str(text), quote=False)


def say(markdown: str, plain: str | None = None) -> None:
    """A line of prose: Markdown in a notebook, `plain` (default: the Markdown without its * marks) in a
    terminal, where a Markdown object would print as its Python repr."""
    if rich_frontend():
        display(Markdown(markdown))
    else:
        print(plain if plain is not None else markdown.replace("**", "").replace("*", ""))


def heading(text: str) -> None:
    if rich_frontend():
        display(HTML(f"<h3>{_escape(text)}</h3>"))
    else:
        print(f"\n== {text} ==")


def show_table(frame: pd.DataFrame) -> None:
    if rich_frontend():
        display(frame)
    else:
        with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
            print(frame.to_string())


def show_traces(traces: Sequence[Trace], *, views: Iterable[str] | None = None) -> None:
    """The summary table, then every view of each trace that applies to it (or only `views`, by catalog key: a
    ValueError names an unknown one); a line names the views left out and why."""
    keys = None if views is None else [view.key for view in select(views)]  # refused before anything is shown
    show_table(summary_frame(traces))
    for trace in traces:
        shown, absent = split(trace, keys)
        if len(traces) > 1:
            heading(f"{trace.label} — {trace.name}")
        if trace.truncated:
            say(f"*{CUT_OFF_NOTE}*")
        for view in shown:
            say(f"**{_md(view.heading(trace))}.** {view.caption}", f"{view.heading(trace)}. {view.caption}")
            show_figure(view.figure(trace))
        if absent:
            say(
                "*Not shown for this run:* " + "; ".join(f"**{v.label}**: {v.absent}" for v in absent),
                "Not shown for this run: " + "; ".join(f"{v.label}: {v.absent}" for v in absent),
            )


def show_allocator_state(trace: Trace) -> None:
    """A hand-driven allocator (recorded by %%kvscope: no engine, so no requests or steps): its books at the end of
    the code and its blocks / pages, plus the sharing view when blocks are shared."""
    timeline = memory_timeline(trace)
    if timeline.empty:
        say(f"*{_md(trace.label)}: no memory sample recorded.*", f"{trace.label}: no memory sample recorded.")
        return
    last: Any = timeline.iloc[-1]
    step = int(last["step"])
    books = pd.DataFrame(
        {"bytes": [format_bytes(int(last[f])) for f in FIELDS]},  # the Usage fields, as the timeline holds them
        index=pd.Index(FIELDS, name=f"{trace.label}: allocator's books at the end of the cell"),
    )
    show_table(books)
    show_figure(VIEWS["blocks"].figure(trace, step))
    if VIEWS["sharing"].applies(trace):
        show_figure(VIEWS["sharing"].figure(trace, step))


def compare_traces(traces: Sequence[Trace]) -> None:
    """The summary table side by side (columns named 'label (file)'), the verdict with its warnings, the
    comparison figure and the runs' timelines."""
    show_table(summary_frame(traces, [f"{t.label} ({t.name})" for t in traces]))
    verdict = COMPARISON.verdict(traces)
    for warning in verdict.warnings:
        say(f"**Warning:** {_md(warning)}", f"Warning: {warning}")
    for sentence in verdict.sentences:
        say(_md(sentence), sentence)
    show_figure(COMPARISON.figure(traces))
    show_figure(COMPARISON.timelines(traces))


def _md(text: str) -> str:
    """Trace text (labels, names) inside Markdown, shown as typed."""
    return "".join("\\" + ch if ch in "\\`*_{}[]()#+-.!|<>$~" else ch for ch in _escape(str(text)))
