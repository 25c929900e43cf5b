"""Self-contained HTML report: one file that works offline, for one trace or several (then with a comparison).

What a run shows comes from the presentation layer (kvscope.present): the summary and metadata rows, and every view
of the catalog that applies to the trace (the ones left out are listed with the reason), each drawn by its builder
from the analysis layer: the report computes no numbers and writes no caption of its own. The page embeds plotly.js
exactly once, inline, and every figure as JSON. Figures enter the page through Jinja's `tojson` filter (memray's
approach), which escapes `<`, `>`, `&` and `'`, so no string from a trace can close the script element; everything
else is autoescaped HTML. Trace strings that go into figures (request ids, run labels) are escaped again for
plotly, which renders a subset of HTML.

Size: plotly.js is ~4.8 MB; each figure is bounded by the builders' caps (time bins, unit ranges, request groups),
so a report stays a few MB above that however long the run was. Measured: a paged run with prefix caching of
20,000 requests (3.0 M events, 190 k steps, 16.7 MB trace) gives a 6.7 MB report (1.9 MB of figures), built in
~13 s on 2 CPU cores, drawn by headless Chromium in ~4 s.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from kvscope import __version__
from kvscope.analysis.ranks import group_summary, parallel_meta, rank_table, split_groups
from kvscope.analysis.summary import summarize
from kvscope.present import pages
from kvscope.present import ranks as ranks_text
from kvscope.present.rows import CUT_OFF_NOTE, meta_rows, summary_columns, summary_rows
from kvscope.present.views import COMPARISON, split
from kvscope.trace import Trace, load_trace
from kvscope.viz.palette import MEMORY_BANDS, STATE_COLORS, state_label
from kvscope.viz.ranks import rank_stacks_figure


@dataclass
class Panel:
    """One figure of the page with its heading and the line saying how to read it; `div` is its element's id."""

    key: str
    title: str
    caption: str
    figure: go.Figure
    div: str = ""


@dataclass
class RunSection:
    anchor: str
    label: str
    name: str
    summary_rows: list[tuple[str, str] | None]
    meta_rows: list[tuple[str, str]]
    panels: list[Panel]
    absent: list[tuple[str, str]] = field(default_factory=list)  # (view label, why it is left out)
    warnings: list[str] = field(default_factory=list)


def run_panels(trace: Trace) -> tuple[list[Panel], list[tuple[str, str]]]:
    """Every view of the catalog that applies to the trace, drawn, in catalog order; and (label, reason) of the
    views left out."""
    shown, absent = split(trace)
    panels = [Panel(v.key, v.heading(trace), v.caption, v.figure(trace)) for v in shown]
    return panels, [(v.label, v.absent) for v in absent]


def _anchor(i: int, label: str) -> str:
    return f"run{i}-" + (re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "trace")


def run_section(i: int, trace: Trace) -> RunSection:
    anchor = _anchor(i, trace.label)
    panels, absent = run_panels(trace)
    for panel in panels:
        panel.div = f"{anchor}-{panel.key}"
    return RunSection(
        anchor=anchor,
        label=trace.label,
        name=trace.name,
        summary_rows=summary_rows(summarize(trace)),
        meta_rows=meta_rows(trace.meta),
        panels=panels,
        absent=absent,
        warnings=[CUT_OFF_NOTE] if trace.truncated else [],
    )


@dataclass
class ComparisonSection:
    """The page's first section when several runs are given: the verdict, the bars, the timelines, the table."""

    verdict: list[str]
    warnings: list[str]
    panels: list[Panel]
    header: list[str]
    rows: list[tuple[str, list[str]] | None]
    verdict_title: str = COMPARISON.verdict_title


def comparison(traces: Sequence[Trace]) -> ComparisonSection:
    """The comparison: the verdict's sentences and warnings, the bar and timeline panels, and a side-by-side
    summary table (header, rows), all from the presentation layer."""
    verdict = COMPARISON.verdict(traces)
    panels = [
        Panel(COMPARISON.key, COMPARISON.title, COMPARISON.caption, COMPARISON.figure(traces), div="compare-bars"),
        Panel(
            "compare-timelines",
            COMPARISON.timelines_title,
            COMPARISON.timelines_caption,
            COMPARISON.timelines(traces),
            div="compare-timelines",
        ),
    ]
    header = [f"{t.label} ({t.name})" for t in traces]
    return ComparisonSection(
        verdict.sentences, verdict.warnings, panels, header, summary_columns([summarize(t) for t in traces])
    )


@dataclass
class RanksSection:
    """A parallel run's ranks (kvscope.analysis.ranks): the group's rows, the per-rank stacks, which ranks get a
    section of their own."""

    anchor: str
    title: str
    caption: str
    rows: list[tuple[str, str]]
    panels: list[Panel]
    note: str


def ranks_section(i: int, group: Sequence[Trace]) -> RanksSection:
    g = group_summary(group)
    anchor = f"ranks{i}"
    detail = _detail_ranks(group)
    figure = rank_stacks_figure(rank_table(group), title=ranks_text.FIGURE_TITLE)
    names = ", ".join(t.name for t in group)
    drawn = ", ".join(t.name for t in detail)
    note = f"Rank traces: {names}. Drawn in full below: {drawn}" + (
        " (the other ranks hold other heads of the same tokens: the same books)" if len(detail) < len(group) else ""
    )
    if g["dcp"] > 1:
        note += ". " + ranks_text.DCP_NOTE
    return RanksSection(
        anchor=anchor,
        title=ranks_text.section_title(g),
        caption=ranks_text.CAPTION,
        rows=ranks_text.group_rows(g),
        panels=[Panel("ranks", ranks_text.FIGURE_TITLE, ranks_text.CAPTION, figure, div=f"{anchor}-stacks")],
        note=note,
    )


def _detail_ranks(group: Sequence[Trace]) -> list[Trace]:
    """The ranks of the first DCP group (rank 0 alone under TP): the others repeat their books for other heads."""
    return [t for t in group if int(parallel_meta(t).get("dcp_group", 0)) == 0]


def _detailed(traces: Sequence[Trace], groups: Sequence[Sequence[Trace]]) -> tuple[list[Trace], list[Trace]]:
    """(traces drawn in full, in the order given; the runs compared: other traces and each group's rank 0)."""
    detail = {id(t) for g in groups for t in _detail_ranks(g)}
    first = {id(g[0]) for g in groups}
    in_group = {id(t) for g in groups for t in g}
    shown = [t for t in traces if id(t) not in in_group or id(t) in detail]
    units = [t for t in traces if id(t) not in in_group or id(t) in first]
    return shown, units


def build_report(traces: Sequence[Trace], *, title: str = "kvscope report") -> str:
    """The report as one HTML string (plotly.js inline, no network access needed to view it)."""
    traces = list(traces)
    if not traces:
        raise ValueError("report: no traces given")
    groups, _ = split_groups(traces)
    ranks = [ranks_section(i, g) for i, g in enumerate(groups)]
    shown, units = _detailed(traces, groups)
    runs = [run_section(i, t) for i, t in enumerate(shown)]
    compare = comparison(units) if len(units) > 1 else None
    figures = [(p.div, p.figure) for run in runs for p in run.panels]
    figures[:0] = [(p.div, p.figure) for group in ranks for p in group.panels]
    if compare is not None:
        figures[:0] = [(p.div, p.figure) for p in compare.panels]
    legend = [(state_label(s), STATE_COLORS[s]) for s in (*MEMORY_BANDS, "shared", "pool")]
    return pages.template("report.html.j2").render(
        title=title,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
        runs=runs,
        compare=compare,
        ranks=ranks,
        legend=legend,
        figures=figures,
        plotly_js=pages.plotly_js(),
    )


def write_report(
    paths: Sequence[str | os.PathLike | Trace], out: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Load the traces (paths or already loaded Traces), build the report, write it to `out` (UTF-8)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out}: is a directory; give the report's file name (e.g. {out / 'report.html'})")
    if not out.parent.exists():
        raise ValueError(f"{out.parent}: no such directory for the report")
    traces = [p if isinstance(p, Trace) else load_trace(p) for p in paths]
    html = build_report(traces, title=title or _default_title(traces))
    out.write_text(html, encoding="utf-8")
    return out


def _default_title(traces: Sequence[Trace]) -> str:
    if len(traces) == 1:
        return f"kvscope report: {traces[0].label} ({traces[0].name})"
    return f"kvscope report: {len(traces)} runs compared"
