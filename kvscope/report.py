"""Self-contained HTML report: one file that works offline, for one trace or several (then with a comparison).

The page embeds plotly.js exactly once, inline, and every figure as JSON produced by the figure builders
(kvscope.viz) from the analysis layer's DataFrames (kvscope.analysis): the report computes no numbers of its own.
Figures enter the page through Jinja's `tojson` filter (memray's approach), which escapes `<`, `>`, `&` and `'`, so
no string from a trace can close the script element; everything else is autoescaped HTML. Trace strings that go
into figures (request ids, run labels) are escaped again for plotly, which renders a subset of HTML.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from kvscope import __version__
from kvscope.trace import Trace

# The fragmentation map's resolution: units x steps cells (the analysis layer bins to this).
MAP_MAX_UNITS = 128
MAP_MAX_STEPS = 300

# Metadata keys shown first, in this order, with a human name; the rest follow under their own names.
META_FIELDS: list[tuple[str, str]] = [
    ("device_name", "device"),
    ("device", "backend"),
    ("allocator", "allocator"),
    ("allocator_config", "allocator settings"),
    ("model", "model"),
    ("spec", "KV spec"),
    ("engine_config", "engine"),
    ("workload", "workload"),
    ("seed", "seed"),
    ("versions", "versions"),
    ("kvscope_version", "kvscope"),
    ("format_version", "trace format"),
    ("start_time", "started"),
    ("command", "command"),
]


@dataclass
class View:
    """One figure of a run, with a line saying how to read it; `note` replaces the figure when there is nothing
    to draw (e.g. no sharing in a static run)."""

    key: str
    title: str
    caption: str
    figure: go.Figure | None = None
    note: str = ""
    div: str = ""


@dataclass
class RunSection:
    anchor: str
    label: str
    name: str
    summary_rows: list[tuple[str, str] | None]
    meta_rows: list[tuple[str, str]]
    views: list[View]
    warnings: list[str] = field(default_factory=list)


def _fmt_meta(value: Any) -> str:
    """A metadata value as one line of text (the template escapes it)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt_meta(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def meta_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(label, _fmt_meta(meta[key])) for key, label in META_FIELDS if key in meta and meta[key] not in (None, "")]
    known = {k for k, _ in META_FIELDS} | {"requests"}
    rows += [(str(k), _fmt_meta(v)) for k, v in meta.items() if k not in known]
    requests = meta.get("requests")
    if isinstance(requests, dict) and isinstance(requests.get("seq"), list):
        rows.append(("requests recorded", f"{len(requests['seq']):,}"))
    return rows


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str] | None]:
    """The same rows, labels and formats as `kvscope summary` (None separates groups)."""
    from kvscope.commands.summary import SUMMARY_ROWS, format_value

    return [None if row is None else (row[1], format_value(summary, row[0], row[2])) for row in SUMMARY_ROWS]


def _view(key: str, title: str, caption: str, build: Callable[[], go.Figure | str]) -> View:
    result = build()
    if isinstance(result, str):
        return View(key, title, caption, note=result)
    return View(key, title, caption, figure=result)


def run_views(trace: Trace) -> list[View]:
    """Every view of one trace, in report order."""
    from kvscope import viz
    from kvscope.analysis import driver, fragmentation, memory, requests, sharing, summary, throughput

    timeline = memory.memory_timeline(trace)
    alloc = str(trace.meta.get("allocator", ""))
    block_size = (trace.meta.get("allocator_config") or {}).get("block_size")
    last_step = summary.last_step(trace)
    # Steps worth a snapshot: the most tokens held (the pool under most pressure), and the peak of sharing savings.
    peak_step = memory.peak_step(trace, "used") or memory.step_range(trace)[0]
    share_step = memory.peak_step(trace, "sharing_saved")

    def sharing_graph() -> go.Figure | str:
        if share_step is None:
            return "No sequences shared KV memory in this run."
        return viz.sharing_graph_figure(sharing.sharing_edges(trace, share_step), step=share_step)

    def prefix_tree() -> go.Figure | str:
        tree = sharing.prefix_tree(trace)
        if tree.empty:
            return "No prefix-cache blocks in this run (prefix caching off, or not a paged allocator)."
        return viz.prefix_tree_figure(tree, block_size=block_size)

    def driver_calls() -> go.Figure | str:
        calls = driver.driver_calls(trace)
        if calls.empty:
            return "No timed driver calls in this run (only VMM allocators on the cuda or cpu backend make them)."
        return viz.driver_latency_figure(calls)

    views = [
        _view(
            "memory",
            "Memory over time",
            "Where every byte of the KV pool is after each step; the bands add up to the capacity. The solid black "
            "line is what vLLM's kv_cache_usage reports (blocks taken / capacity); the dashed black line is the "
            "share of token slots actually holding tokens. The gap between them is waste.",
            lambda: viz.memory_stack_figure(timeline),
        ),
        _view(
            "fragmentation",
            "Fragmentation map",
            "Every block, page or arena row (vertical) at every step (horizontal), coloured by its state; large "
            "pools and long runs are binned, each cell showing the state most of it was in (hover for the mix).",
            lambda: viz.fragmentation_map_figure(fragmentation.state_matrix(trace, MAP_MAX_UNITS, MAP_MAX_STEPS)),
        ),
        _view(
            "blocks",
            f"Blocks when the most tokens were held (step {peak_step})",
            "One cell per block or page (a strip of segments for static arenas); hover for its holders, fill "
            "and ref count.",
            lambda: viz.block_grid_figure(fragmentation.block_states(trace, peak_step), step=peak_step),
        ),
        _view(
            "throughput",
            "Throughput",
            "Generated tokens per second, the tokens each step computed (prefill and decode) with the batch size, "
            "step time, and achieved KV read bandwidth on real devices; crosses mark preemptions.",
            lambda: viz.throughput_figure(throughput.throughput_timeline(trace)),
        ),
        _view(
            "requests",
            "Request lifetimes",
            "When each request waited and when it held KV memory; hatched bars were preempted at least once.",
            lambda: viz.request_lifetimes_figure(requests.request_lifetimes(trace), last_step=last_step),
        ),
    ]
    if alloc == "paged" or share_step is not None:
        views.append(
            _view(
                "sharing",
                "Block sharing" + (f" at its peak (step {share_step})" if share_step is not None else ""),
                "Sequences and the blocks they share (forks for parallel sampling or beam search, prefix-cache "
                "hits); thicker edges and bigger squares mean more holders.",
                sharing_graph,
            )
        )
    if alloc == "paged":
        views.append(
            _view(
                "prefix",
                "Prefix-cache tree",
                "Chains of cached blocks: a path from the left is a shared prompt prefix; colour counts the hits.",
                prefix_tree,
            )
        )
    if alloc == "vmm":
        views.append(
            _view(
                "driver",
                "Driver-call latency",
                "How long each kind of VMM call took (log scale): the price of growing and shrinking by pages.",
                driver_calls,
            )
        )
    return views


def _anchor(i: int, label: str) -> str:
    return f"run{i}-" + (re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "trace")


def run_section(i: int, trace: Trace) -> RunSection:
    from kvscope.analysis.summary import summarize

    anchor = _anchor(i, trace.label)
    views = run_views(trace)
    for view in views:
        view.div = f"{anchor}-{view.key}"
    warnings = []
    if trace.truncated:
        warnings.append(
            "This trace is cut off (a killed run or a partial copy): it shows the run up to its last "
            "complete batch of events."
        )
    return RunSection(
        anchor=anchor,
        label=trace.label,
        name=trace.name,
        summary_rows=summary_rows(summarize(trace)),
        meta_rows=meta_rows(trace.meta),
        views=views,
        warnings=warnings,
    )


def comparison(traces: Sequence[Trace]) -> tuple[View, list[str], list[tuple[str, list[str]] | None]]:
    """The comparison view and a side-by-side summary table (header, rows)."""
    from kvscope import viz
    from kvscope.analysis.compare import compare_runs
    from kvscope.analysis.summary import summarize
    from kvscope.commands.summary import SUMMARY_ROWS, format_value

    view = View(
        "compare",
        "Runs compared",
        "The headline figures of every run side by side; each run keeps its colour in every panel.",
        figure=viz.comparison_figure(compare_runs(list(traces))),
        div="compare-bars",
    )
    summaries = [summarize(t) for t in traces]
    header = [f"{t.label} ({t.name})" for t in traces]
    rows: list[tuple[str, list[str]] | None] = [
        None if row is None else (row[1], [format_value(s, row[0], row[2]) for s in summaries]) for row in SUMMARY_ROWS
    ]
    return view, header, rows


def _json_dumps(obj: Any, **kwargs: Any) -> str:
    """Jinja's tojson serializer: a plotly figure as plotly's own JSON (typed arrays as base64), anything else as
    plain JSON. tojson then escapes <, >, & and ' for the HTML page."""
    if isinstance(obj, go.Figure):
        return obj.to_json()
    return json.dumps(obj, **kwargs)


def _environment():
    import jinja2

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
    from markupsafe import Markup
    from plotly.offline import get_plotlyjs

    from kvscope.viz.palette import MEMORY_BANDS, STATE_COLORS, state_label

    traces = list(traces)
    if not traces:
        raise ValueError("report: no traces given")
    runs = [run_section(i, t) for i, t in enumerate(traces)]
    compare_view, compare_header, compare_rows = comparison(traces) if len(traces) > 1 else (None, [], [])
    figures = [(v.div, v.figure) for run in runs for v in run.views if v.figure is not None]
    if compare_view is not None:
        figures.insert(0, (compare_view.div, compare_view.figure))
    legend = [(state_label(s), STATE_COLORS[s]) for s in MEMORY_BANDS] + [
        (state_label(s), STATE_COLORS[s]) for s in ("shared", "pool")
    ]
    html = (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=title,
            generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            version=__version__,
            runs=runs,
            compare=compare_view,
            compare_header=compare_header,
            compare_rows=compare_rows,
            legend=legend,
            figures=figures,
            # plotly's own bundle, the same text plotly's write_html(include_plotlyjs=True) inlines.
            plotly_js=Markup(get_plotlyjs()),
        )
    )
    return html


def write_report(
    paths: Sequence[str | os.PathLike | Trace], out: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Load the traces (paths or already loaded Traces), build the report, write it to `out` (UTF-8)."""
    from kvscope.trace import load_trace

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
