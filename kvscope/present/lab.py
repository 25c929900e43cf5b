"""What the surfaces show of a lab run: the table of rows (CLI, magic) and the catalog of lab views (the
dashboard's Policies page, `%kvscope lab`), each with its title, caption and builder (kvscope.viz.lab)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from kvscope.viz.lab import hit_rate_vs_capacity_figure, hit_rate_vs_error_figure, miss_causes_figure

TABLE_COLUMNS = (  # (column, heading, format)
    ("policy", "policy", "{}"),
    ("capacity_blocks", "capacity", "{:,}"),
    ("prediction_error", "p", "{:g}"),
    ("hit_rate", "hit rate", "{:.2%}"),
    ("token_hit_rate", "token hits", "{:.2%}"),
    ("miss_cold", "cold", "{:,}"),
    ("miss_evicted", "evicted", "{:,}"),
    ("miss_gap", "gap", "{:,}"),
    ("miss_capacity", "too deep", "{:,}"),
    ("cpu_hit_blocks", "CPU-tier hits", "{:,}"),
    ("seconds", "s", "{:.2f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return fmt.format(value)


def _columns(frame: pd.DataFrame) -> list[tuple[str, str, str]]:
    """TABLE_COLUMNS the rows have; the CPU tier's only when some run had one."""
    tier = "cpu_cache_blocks" in frame.columns and bool((frame["cpu_cache_blocks"] > 0).any())
    return [t for t in TABLE_COLUMNS if t[0] in frame.columns and (tier or t[0] != "cpu_hit_blocks")]


def lab_table(frame: pd.DataFrame) -> str:
    """The rows as a fixed-width text table (one line per run)."""
    columns = _columns(frame)
    head = [h for _, h, _ in columns]
    body = [[_cell(row[c], f) for c, _, f in columns] for _, row in frame.iterrows()]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join(line(r) for r in [head, *body])


@dataclass(frozen=True)
class LabView:
    key: str
    label: str
    caption: str
    draw: Callable[[pd.DataFrame, dict[str, Any]], go.Figure]  # (rows, workload description) -> figure


def _capacity(rows: pd.DataFrame, workload: dict[str, Any]) -> go.Figure:
    return hit_rate_vs_capacity_figure(
        rows, max_hit_rate=workload.get("max_hit_rate"), tokens_per_block=workload.get("block_size")
    )


LAB_VIEWS = (
    LabView(
        "capacity",
        "Hit rate vs capacity",
        "Share of prompt blocks served from the cache, per policy, against the cache's size in blocks (log scale); "
        "prediction policies at the smallest prediction error run. The dashed line is an unbounded cache: every "
        "block but each content's first use.",
        _capacity,
    ),
    LabView(
        "error",
        "Hit rate vs prediction error",
        "The learning-augmented policies fed by an oracle whose bits are each flipped with probability p: p = 0 "
        "shows consistency (close to the optimum), p = 1 robustness (bounded loss), the curve smoothness. Dotted "
        "lines: the policies that take no predictions, at the same capacity.",
        lambda rows, w: hit_rate_vs_error_figure(rows),
    ),
    LabView(
        "causes",
        "Misses by cause",
        "Every prompt block at one capacity: a hit, or a miss that is cold (the content's first use: no policy could "
        "hit it), evicted (cached before and evicted since), behind a missing block (cached, but the lookup stops at "
        "the first miss), or deeper than the whole cache. The classes sum to the misses.",
        lambda rows, w: miss_causes_figure(rows),
    ),
)


def show_lab(rows: pd.DataFrame) -> None:
    """In a notebook (`%kvscope lab`): the rows as a table, then every lab view with its caption."""
    from kvscope.present.figures import show_figure
    from kvscope.present.notebook import say, show_table

    workload = rows.attrs.get("workload", {})
    if workload:
        say(
            f"**{workload.get('source')}**: {workload.get('requests'):,} requests, {workload.get('blocks'):,} blocks "
            f"of {workload.get('block_size')} tokens; an unbounded cache hits {workload.get('max_hit_rate', 0):.1%}."
        )
    show_table(rows)
    for view in LAB_VIEWS:
        say(f"**{view.label}.** {view.caption}", f"{view.label}. {view.caption}")
        show_figure(view.draw(rows, workload))


def _script_json(text: str) -> str:
    """JSON made safe inside a <script> element: <, > and & escaped as JSON escapes (what Jinja's tojson does)."""
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e").replace("'", "\\u0027")


def lab_page(rows: pd.DataFrame, *, title: str = "kvscope lab") -> str:
    """`kvscope lab --report FILE.html`: one self-contained HTML page (plotly.js inline, works offline) with the
    workload line, every lab view with its caption, and the rows as a table."""
    import html
    import json

    from plotly.offline import get_plotlyjs

    workload = rows.attrs.get("workload", {})
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "font-size:13px}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.caption{color:#444;max-width:60em}</style>",
        f"<script>{get_plotlyjs()}</script></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if workload:
        parts.append(
            f"<p><b>{esc(str(workload.get('source')))}</b>: {workload.get('requests', 0):,} requests, "
            f"{workload.get('blocks', 0):,} blocks of {esc(str(workload.get('block_size')))} tokens; an unbounded "
            f"cache hits {workload.get('max_hit_rate', 0):.1%}.</p>"
        )
    tiers = sorted(set(rows["cpu_cache_blocks"])) if "cpu_cache_blocks" in rows.columns else []
    if any(tiers):
        parts.append(
            f"<p>With a CPU tier of {', '.join(f'{int(t):,}' for t in tiers)} blocks behind each capacity: hits count "
            "both tiers (the table's CPU-tier hits column says how many came from the CPU).</p>"
        )
    figures = []
    for i, view in enumerate(LAB_VIEWS):
        parts.append(f"<h2>{esc(view.label)}</h2><p class='caption'>{esc(view.caption)}</p><div id='lab{i}'></div>")
        figures.append(f"[{json.dumps(f'lab{i}')}, {_script_json(view.draw(rows, workload).to_json())}]")
    columns = _columns(rows)
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(_cell(row[c], f))}</td>" for c, _, f in columns) + "</tr>"
        for _, row in rows.iterrows()
    )
    parts.append(f"<h2>Runs</h2><table><tr>{head}</tr>{body}</table>")
    parts.append(
        "<script>for (const [id, fig] of [" + ",".join(figures) + "]) "
        "Plotly.newPlot(document.getElementById(id), fig.data, fig.layout, {responsive: true});</script>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)
