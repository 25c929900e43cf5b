"""The summary rows every surface shows (`kvscope summary`, the report, the dashboard, the magic), how each value
is formatted, and the run-metadata rows. Values come from kvscope.analysis.summary.summarize; nothing is computed
here. Light on purpose: the CLI imports this module when it starts (no pandas, no plotly)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from kvscope.units import format_bytes


class SummaryRow(NamedTuple):
    key: str  # a key of summarize(trace)
    label: str  # what people read
    how: str  # one of FORMATS


# How a value is shown: bytes (1.5 GiB), int (1,234), pct (a fraction as 12.3%), rate (1,234.5), time (seconds,
# marked when simulated), ms, bool (yes/no), device (backend and device name), str.
FORMATS = ("bytes", "int", "pct", "rate", "time", "ms", "bool", "device", "str")

# None rows are section rules.
SUMMARY_ROWS: list[SummaryRow | None] = [
    SummaryRow("label", "run", "str"),
    SummaryRow("device", "device", "device"),
    SummaryRow("model", "model", "str"),
    SummaryRow("bytes_per_token", "KV bytes / token", "bytes"),
    SummaryRow("capacity_bytes", "KV capacity", "bytes"),
    None,
    SummaryRow("requests", "requests", "int"),
    SummaryRow("finished", "finished", "int"),
    SummaryRow("rejected", "rejected", "int"),
    SummaryRow("unfinished", "unfinished at end", "int"),
    SummaryRow("forks", "forked sequences", "int"),
    SummaryRow("steps", "steps", "int"),
    SummaryRow("generated_tokens", "generated tokens", "int"),
    SummaryRow("tokens_per_s", "generated tokens / s", "rate"),
    SummaryRow("run_time_s", "run time", "time"),
    None,
    SummaryRow("peak_used_bytes", "peak used", "bytes"),
    SummaryRow("peak_reserved_bytes", "peak reserved", "bytes"),
    SummaryRow("peak_waste_bytes", "peak waste", "bytes"),
    SummaryRow("retained_end_bytes", "retained after the last step", "bytes"),
    SummaryRow("peaks", "peaks taken", "str"),
    SummaryRow("mean_waste_fraction", "mean waste / reserved", "pct"),
    SummaryRow("peak_cached_idle_bytes", "peak cached-idle", "bytes"),
    SummaryRow("sharing_saved_bytes_peak", "peak sharing savings", "bytes"),
    SummaryRow("prefix_hit_tokens", "prefix-cache hit tokens", "int"),
    SummaryRow("prefix_hit_rate", "prefix-cache hit rate", "pct"),
    None,
    SummaryRow("preemptions", "preemptions", "int"),
    SummaryRow("recomputed_tokens", "recomputed tokens", "int"),
    SummaryRow("ooms", "allocation failures (OOM)", "int"),
    SummaryRow("evictions", "prefix-cache evictions", "int"),
    SummaryRow("driver_calls", "VMM driver calls", "int"),
    SummaryRow("driver_ms", "VMM driver time", "ms"),
    SummaryRow("events", "events", "int"),
    SummaryRow("truncated", "cut off", "bool"),
]


def format_value(summary: Mapping[str, Any], key: str, how: str) -> str:
    """summary[key] as text, formatted `how` (one of FORMATS); '-' when the value is missing."""
    value = summary.get(key)
    if value is None:
        return "-"
    if how == "bytes":
        return format_bytes(value)
    if how == "int":
        return f"{int(value):,}"
    if how == "pct":
        return f"{100 * float(value):.1f}%"
    if how == "rate":
        return f"{float(value):,.1f}"
    if how == "time":
        clock = " (simulated)" if summary.get("clock") == "sim" else ""
        return f"{float(value):.3f} s{clock}"
    if how == "ms":
        return f"{float(value):.2f} ms"
    if how == "bool":
        return "yes" if value else "no"
    if how == "device":
        name = summary.get("device_name")
        return f"{value} ({name})" if name and name != value else str(value)
    return str(value)


def summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str] | None]:
    """(label, value) for one run, in SUMMARY_ROWS order (None separates groups)."""
    return [None if row is None else (row.label, format_value(summary, row.key, row.how)) for row in SUMMARY_ROWS]


def summary_columns(summaries: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[str]] | None]:
    """(label, [value per run]) for runs side by side, in SUMMARY_ROWS order (None separates groups)."""
    return [
        None if row is None else (row.label, [format_value(s, row.key, row.how) for s in summaries])
        for row in SUMMARY_ROWS
    ]


CUT_OFF_NOTE = (
    "This trace is cut off (a killed run or a partial copy): it shows the run up to its last complete batch of events."
)

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


def meta_value(value: Any) -> str:
    """A metadata value as one line of text (surfaces escape it)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={meta_value(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def meta_rows(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, value) rows of a trace's metadata: META_FIELDS first, then the other keys, then how many requests the
    workload recorded (their table itself is left out)."""
    rows = [(label, meta_value(meta[key])) for key, label in META_FIELDS if key in meta and meta[key] not in (None, "")]
    known = {k for k, _ in META_FIELDS} | {"requests"}
    rows += [(str(k), meta_value(v)) for k, v in meta.items() if k not in known]
    requests = meta.get("requests")
    if isinstance(requests, dict) and isinstance(requests.get("seq"), list):
        rows.append(("requests recorded", f"{len(requests['seq']):,}"))
    return rows
