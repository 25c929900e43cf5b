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
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import plotly.graph_objects as go
from markupsafe import Markup
from plotly.offline import get_plotlyjs

from kvscope import __version__
from kvscope.analysis.summary import summarize
from kvscope.present.rows import CUT_OFF_NOTE, meta_rows, summary_columns, summary_rows
from kvscope.present.views import COMPARISON, split
from kvscope.trace import Trace, load_trace
from kvscope.viz.palette import MEMORY_BANDS, STATE_COLORS, state_label


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


def comparison(traces: Sequence[Trace]) -> tuple[Panel, list[str], list[tuple[str, list[str]] | None]]:
    """The comparison panel and a side-by-side summary table (header, rows)."""
    panel = Panel(COMPARISON.key, COMPARISON.title, COMPARISON.caption, COMPARISON.figure(traces), div="compare-bars")
    header = [f"{t.label} ({t.name})" for t in traces]
    return panel, header, summary_columns([summarize(t) for t in traces])


def _json_dumps(obj: Any, **kwargs: Any) -> str:
    """Jinja's tojson serializer: a plotly figure as plotly's own JSON (typed arrays as base64), anything else as
    plain JSON. tojson then escapes <, >, & and ' for the HTML page."""
    if isinstance(obj, go.Figure):
        return obj.to_json()
    return json.dumps(obj, **kwargs)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("kvscope", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.policies["json.dumps_function"] = _json_dumps
    return env


def build_report(traces: Sequence[Trace], *, title: str = "kvscope report") -> str:
    """The report as one HTML string (plotly.js inline, no network access needed to view it)."""
    traces = list(traces)
    if not traces:
        raise ValueError("report: no traces given")
    runs = [run_section(i, t) for i, t in enumerate(traces)]
    compare_panel, compare_header, compare_rows = comparison(traces) if len(traces) > 1 else (None, [], [])
    figures = [(p.div, p.figure) for run in runs for p in run.panels]
    if compare_panel is not None:
        figures.insert(0, (compare_panel.div, compare_panel.figure))
    legend = [(state_label(s), STATE_COLORS[s]) for s in (*MEMORY_BANDS, "shared", "pool")]
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=title,
            generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            version=__version__,
            runs=runs,
            compare=compare_panel,
            compare_header=compare_header,
            compare_rows=compare_rows,
            legend=legend,
            figures=figures,
            # plotly's own bundle, the same text plotly's write_html(include_plotlyjs=True) inlines.
            plotly_js=Markup(get_plotlyjs()),
        )
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
