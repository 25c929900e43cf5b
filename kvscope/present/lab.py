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


def lab_page(rows: pd.DataFrame, *, title: str = "kvscope lab") -> str:
    """`kvscope lab --report FILE.html`: one self-contained HTML page (plotly.js inline, works offline) with the
    workload line, every lab view with its caption, and the rows as a table."""
    from kvscope.present import pages

    workload = rows.attrs.get("workload", {})
    lines = []
    if workload:
        lines.append(
            f"{workload.get('source')}: {workload.get('requests', 0):,} requests, {workload.get('blocks', 0):,} "
            f"blocks of {workload.get('block_size')} tokens; an unbounded cache hits "
            f"{workload.get('max_hit_rate', 0):.1%}."
        )
    tiers = sorted(set(rows["cpu_cache_blocks"])) if "cpu_cache_blocks" in rows.columns else []
    if any(tiers):
        lines.append(
            f"With a CPU tier of {', '.join(f'{int(t):,}' for t in tiers)} blocks behind each capacity: hits count "
            "both tiers (the table's CPU-tier hits column says how many came from the CPU)."
        )
    panels = [
        {"div": f"lab{i}", "label": view.label, "caption": view.caption, "figure": view.draw(rows, workload)}
        for i, view in enumerate(LAB_VIEWS)
    ]
    columns = _columns(rows)
    return pages.template("lab.html.j2").render(
        title=title,
        lines=lines,
        panels=panels,
        header=[h for _, h, _ in columns],
        rows=[[_cell(row[c], f) for c, _, f in columns] for _, row in rows.iterrows()],
        plotly_js=pages.plotly_js(),
    )
