"""What a sweep's table says: configurations (runs averaged over seeds), their Pareto front, the what-if curves.
Pure functions, DataFrame in, DataFrame out; kvscope.viz.sweep draws them and computes nothing.

A configuration is a row's settings less its seed: seeds are replicates, so their runs are averaged (and counted in
`seeds`). The front is over three objectives: KV memory (capacity_bytes, lower is better), throughput
(tokens_per_s, higher) and latency (lower): the first of LATENCY_KEYS the summaries have values for, else the mean
step time of the run's clock. A configuration is on the front when no other is at least as good on all three and
better on one; each workload has its own front. Runs that ended with an error are left out (the page lists them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from kvscope.sweep.grid import OPTION_AXES

# Tail latency people plan for first: time to first token at p90, then per output token; mean step time is what
# every trace has. (Keys of kvscope.analysis.summary / kvscope.analysis.latency.)
LATENCY_KEYS: tuple[tuple[str, str], ...] = (
    ("ttft_p90_s", "time to first token, p90 (s)"),
    ("tpot_p90_s", "time per output token, p90 (s)"),
    ("mean_step_s", "mean step time (s)"),
)
MEMORY = ("capacity_bytes", "KV memory")
THROUGHPUT = ("tokens_per_s", "generated tokens/s")
# The what-if curves: each against KV memory, one line per configuration family (key, axis title).
WHAT_IF: tuple[tuple[str, str], ...] = (
    ("tokens_per_s", "generated tokens/s"),
    ("max_batch", "peak batch (sequences)"),
    ("preemptions", "preemptions"),
)
METRICS = ("capacity_bytes", "tokens_per_s", "max_batch", "preemptions", "peak_used_bytes", "peak_reserved_bytes")
CONFIG_COLUMNS = ("workload", "allocator", "kv_memory", *(a.field for a in OPTION_AXES), "model", "max_len")


@dataclass(frozen=True)
class Objectives:
    memory: str
    throughput: str
    latency: str
    latency_title: str


def objectives(table: pd.DataFrame) -> Objectives:
    """The front's three columns for this table: the latency key is the first with values."""
    for key, title in LATENCY_KEYS:
        if key in table.columns and pd.to_numeric(table[key], errors="coerce").notna().any():
            return Objectives(MEMORY[0], THROUGHPUT[0], key, title)
    return Objectives(MEMORY[0], THROUGHPUT[0], "mean_step_s", LATENCY_KEYS[-1][1])


def succeeded(table: pd.DataFrame) -> pd.DataFrame:
    if "error" not in table.columns:
        return table
    return table[table["error"].isna()]


def configurations(table: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (the settings less the seed) of the runs without error: the config columns, the
    label and `series` (the line it belongs to in the what-if curves), `seeds` (runs averaged) and the mean of each
    metric and of the latency objective."""
    ok = succeeded(table)
    obj = objectives(table)
    keys = [c for c in CONFIG_COLUMNS if c in ok.columns]
    metrics = list(dict.fromkeys([*(m for m in METRICS if m in ok.columns), obj.latency]))
    if ok.empty:
        return pd.DataFrame(columns=[*keys, "label", "series", "seeds", *metrics])
    values = ok[metrics].apply(pd.to_numeric, errors="coerce")
    frame = pd.concat([ok[keys].astype(object).where(ok[keys].notna(), None), ok[["label"]], values], axis=1)
    grouped = frame.groupby(keys, dropna=False, sort=False)
    out = grouped[metrics].mean()
    out["label"] = grouped["label"].first()
    out["seeds"] = grouped.size()
    out = out.reset_index()
    out["series"] = _series_names(out, keys)
    return out[[*keys, "label", "series", "seeds", *metrics]]


def _series_names(configs: pd.DataFrame, keys: list[str]) -> list[str]:
    """A what-if line per configuration less its KV memory: the run's label (its allocator says what it is), plus
    the settings that tell apart lines with the same label ("paged b16, prefix caching on"), plus the workload when
    the sweep has several."""
    labels = configs["label"].astype(str)
    rest = [k for k in keys if k not in ("kv_memory", "allocator", "workload")]
    shown = configs[rest].map(_shown) if rest else configs[rest]
    varying = {
        label: [k for k in rest if shown.loc[group.index, k].nunique() > 1] for label, group in configs.groupby(labels)
    }
    several_workloads = "workload" in configs and configs["workload"].nunique() > 1
    names = []
    for i, label in zip(configs.index, labels, strict=True):
        parts = [f"{_axis_word(k)} {shown.at[i, k]}" for k in varying[label] if shown.at[i, k] != ""]
        name = ", ".join([label, *parts])
        names.append(f"{name} · {configs.at[i, 'workload']}" if several_workloads else name)
    return names


def _shown(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    return str(value)


def _axis_word(key: str) -> str:
    axis = next((a for a in OPTION_AXES if a.field == key), None)
    return axis.short if axis is not None and axis.short else key.replace("_", " ")


def pareto_front(configs: pd.DataFrame, obj: Objectives) -> pd.Series:
    """True for the configurations no other dominates (lower memory, higher throughput, lower latency; at least as
    good on all and better on one). Rows missing an objective are never on the front."""
    cost = np.column_stack(
        [
            pd.to_numeric(configs[obj.memory], errors="coerce").to_numpy(np.float64),
            -pd.to_numeric(configs[obj.throughput], errors="coerce").to_numpy(np.float64),
            pd.to_numeric(configs[obj.latency], errors="coerce").to_numpy(np.float64),
        ]
    )
    valid = np.isfinite(cost).all(axis=1)
    front = valid.copy()
    for i in np.flatnonzero(valid):
        others = cost[valid]
        dominated = (others <= cost[i]).all(axis=1) & (others < cost[i]).any(axis=1)
        front[i] = not dominated.any()
    return pd.Series(front, index=configs.index, name="front")


def with_front(configs: pd.DataFrame, obj: Objectives) -> pd.DataFrame:
    """configs with `front`: the Pareto front of each workload (configurations on different workloads are not
    alternatives to one another)."""
    if configs.empty:
        return configs.assign(front=pd.Series(dtype=bool))
    groups = configs.groupby("workload", sort=False, dropna=False) if "workload" in configs else [(None, configs)]
    front = pd.concat([pareto_front(group, obj) for _, group in groups])
    return configs.assign(front=front.reindex(configs.index).astype(bool))


def what_if(configs: pd.DataFrame, obj: Objectives) -> pd.DataFrame:
    """Long form of the what-if curves: series, kv_memory, metric, title, value; one point per configuration,
    sorted by KV memory within each series (the latency objective is one of the metrics)."""
    rows = []
    for key, title in (*WHAT_IF, (obj.latency, obj.latency_title)):
        if key not in configs.columns:
            continue
        part = configs[["series", "kv_memory"]].assign(metric=key, title=title, value=configs[key].to_numpy())
        rows.append(part.sort_values(["series", "kv_memory"], kind="stable"))
    if not rows:
        return pd.DataFrame(columns=["series", "kv_memory", "metric", "title", "value"])
    return pd.concat(rows, ignore_index=True)  # metrics in WHAT_IF order, the latency objective last
