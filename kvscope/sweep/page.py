"""The sweep's figure page: one self-contained HTML file (plotly.js inline, as the report has it: it opens offline)
with how the sweep was made, the Pareto front, the what-if curves and the table of front configurations. The numbers
come from kvscope.sweep.analysis over the sweep's table; the figures from kvscope.viz.sweep.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from kvscope import __version__
from kvscope.present import pages
from kvscope.sweep import analysis
from kvscope.sweep.grid import OPTION_AXES, available_axes
from kvscope.units import format_bytes
from kvscope.viz.sweep import pareto_figure, what_if_figure


@dataclass(frozen=True)
class Panel:
    div: str
    title: str
    caption: str
    figure: go.Figure


def how_it_was_made(table: pd.DataFrame, meta: dict[str, Any], obj: analysis.Objectives) -> list[str]:
    """The page's first lines: what ran, on what, and what the axes of the figures mean."""
    grid = meta.get("grid", {})
    swept = [f"{k} {', '.join(map(_shown, v))}" for k, v in grid.items() if isinstance(v, list) and len(v) > 1]
    device = (
        table["device_name"].dropna().iloc[0] if "device_name" in table and table["device_name"].notna().any() else ""
    )
    lines = [
        f"{meta.get('runs', len(table))} simulated runs (--device sim: no compute; each step's time comes from "
        f"the cost model{': ' + str(device) if device else ''}), {grid.get('requests') or 'all'} requests per "
        "workload, model " + ", ".join(sorted(map(str, table["model"].dropna().unique()))) + ".",
        "Swept: " + ("; ".join(swept) if swept else "nothing (one configuration)") + ". Options that do not apply "
        "to an allocator are not crossed with it.",
        f"Executor: {meta.get('executor', '?')}, {meta.get('wall_s', 0):.1f} s of wall time on a host with "
        f"{meta.get('host_cpus', '?')} CPUs, started {meta.get('started', '?')}.",
        f"Memory is the KV memory each run was given; throughput is generated tokens per second of the run's "
        f"(simulated) clock; latency is {obj.latency_title}.",
    ]
    missing = [a.flag for a in OPTION_AXES if a not in available_axes()]
    if missing:
        lines.append(f"Not swept: {', '.join(missing)} (this kvscope's engine has no such setting yet).")
    return lines


def _shown(value: Any) -> str:
    return format_bytes(value) if isinstance(value, int) and value >= 1 << 20 else str(value)


def build_page(table: pd.DataFrame, meta: dict[str, Any], *, title: str = "kvscope sweep") -> str:
    obj = analysis.objectives(table)
    configs = analysis.with_front(analysis.configurations(table), obj)
    curves = analysis.what_if(configs, obj)
    panels = [
        Panel(
            "pareto",
            "Pareto front: memory vs throughput vs latency",
            "Each point is a configuration (runs averaged over seeds). Large ringed points are on the front: no "
            "other configuration needs less KV memory, serves more tokens/s and has lower latency at once.",
            pareto_figure(
                configs,
                memory=obj.memory,
                throughput=obj.throughput,
                latency=obj.latency,
                latency_title=obj.latency_title,
            ),
        ),
        Panel(
            "what-if",
            "What if: more or less KV memory",
            "Each line is one allocator configuration as its KV memory changes: throughput, the largest batch the "
            "scheduler ran, preemptions (memory ran out mid-request) and latency.",
            what_if_figure(curves),
        ),
    ]
    front = configs[configs["front"]].sort_values(obj.memory, kind="stable")
    header = ["configuration", "workload", "KV memory", "tokens/s", obj.latency_title, "peak batch", "preemptions",
              "seeds"]  # fmt: skip
    rows = [
        [
            (r["series"], False),
            (r["workload"], False),
            (format_bytes(r["kv_memory"]), True),
            (f"{r['tokens_per_s']:,.0f}", True),
            (f"{r[obj.latency]:.4g}", True),
            (f"{r['max_batch']:.3g}" if "max_batch" in r else "", True),
            (f"{r['preemptions']:.3g}" if "preemptions" in r else "", True),
            (str(r["seeds"]), True),
        ]
        for _, r in front.iterrows()
    ]
    failed = table[table["error"].notna()] if "error" in table.columns else table.iloc[:0]
    errors = [
        (
            int(r["run"]),
            f"{r['allocator']} {r['workload']} KV {format_bytes(r['kv_memory'])} seed {r['seed']}",
            r["error"],
        )
        for _, r in failed.iterrows()
    ]
    warnings = [f"{len(failed)} of {len(table)} runs failed; they are listed at the end."] if len(failed) else []
    return pages.template("sweep.html.j2").render(
        title=title,
        subtitle=f"{len(table)} runs, {len(configs)} configurations, {int(configs['front'].sum())} on the front",
        version=__version__,
        how=how_it_was_made(table, meta, obj),
        warnings=warnings,
        panels=panels,
        front_header=header,
        front_rows=rows,
        errors=errors,
        plotly_js=pages.plotly_js(),
    )


def write_page(table: pd.DataFrame, meta: dict[str, Any], path: str | os.PathLike, **kwargs: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(build_page(table, meta, **kwargs))
