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
    # The row is left out when every run shown has this value (a CPU tier of 0 blocks, a world of 1 rank): figures
    # of a feature the runs did not use would only be noise. None: always shown when the key is there.
    unused: Any = None


# How a value is shown: bytes (1.5 GiB), int (1,234), pct (a fraction as 12.3%), rate (1,234.5), time (seconds,
# marked when simulated), ms, secs (a duration in seconds shown in ms below 1 s), bool (yes/no), device (backend and
# device name), limit (what limited the batch, with the share of waiting steps it limited), saving (a fraction as a
# percentage with the PagedAttention paper's definition beside it: blocks or pages held over those needed unshared,
# summed over steps), str.
FORMATS = ("bytes", "int", "pct", "rate", "time", "ms", "secs", "bool", "device", "limit", "saving", "str")

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
    SummaryRow("max_batch", "largest batch (sequences)", "int"),
    SummaryRow("mean_batch", "mean batch", "rate"),
    SummaryRow("batch_limited_by", "batch limited by", "limit"),
    SummaryRow("queue_p50_s", "queueing delay p50", "secs"),
    SummaryRow("queue_p99_s", "queueing delay p99", "secs"),
    SummaryRow("ttft_p50_s", "time to first token p50", "secs"),
    SummaryRow("ttft_p90_s", "time to first token p90", "secs"),
    SummaryRow("ttft_p99_s", "time to first token p99", "secs"),
    SummaryRow("tpot_p50_s", "time per output token p50", "secs"),
    SummaryRow("tpot_p99_s", "time per output token p99", "secs"),
    None,
    SummaryRow("peak_used_bytes", "peak used", "bytes"),
    SummaryRow("peak_reserved_bytes", "peak reserved", "bytes"),
    SummaryRow("peak_waste_bytes", "peak waste", "bytes"),
    SummaryRow("retained_end_bytes", "retained after the last step", "bytes"),
    SummaryRow("peaks", "peaks taken", "str"),
    SummaryRow("mean_waste_fraction", "mean waste / reserved", "pct"),
    SummaryRow("peak_cached_idle_bytes", "peak cached-idle", "bytes"),
    SummaryRow("sharing_saved_bytes_peak", "peak sharing savings", "bytes"),
    SummaryRow("sharing_saving_mean", "sharing saving (paper's)", "saving"),
    SummaryRow("prefix_hit_tokens", "prefix-cache hit tokens", "int"),
    SummaryRow("prefix_hit_rate", "prefix-cache hit rate", "pct"),
    SummaryRow("cpu_tier_hit_tokens", "CPU-tier hit tokens", "int", 0),
    SummaryRow("cpu_tier_offloaded_blocks", "blocks offloaded to CPU", "int", 0),
    SummaryRow("pcie_bytes", "CPU-tier PCIe traffic", "bytes", 0),
    SummaryRow("miss_cold_tokens", "prompt misses: cold", "int", 0),
    SummaryRow("miss_evicted_tokens", "prompt misses: evicted", "int", 0),
    SummaryRow("miss_floor_tokens", "prompt misses: block floor", "int", 0),
    SummaryRow("miss_gap_tokens", "prompt misses: after a gap", "int", 0),
    None,
    SummaryRow("world_size", "ranks (TP / DCP)", "int", 1),
    SummaryRow("kv_duplication", "KV copies of each head", "int", 1),
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

# The rows of an imported KV-event stream (kvscope.analysis.cache.cache_summary), after SUMMARY_ROWS; their keys
# are absent from other traces' summaries (and SUMMARY_ROWS' engine keys from theirs), so each trace shows its own.
KV_EVENT_ROWS: list[SummaryRow | None] = [
    SummaryRow("source", "source", "str"),
    SummaryRow("messages", "KV-event messages", "int"),
    SummaryRow("store_events", "BlockStored events", "int"),
    SummaryRow("blocks_stored", "blocks stored", "int"),
    SummaryRow("blocks_removed", "blocks removed (BlockRemoved)", "int"),
    SummaryRow("cleared", "cache cleared (AllBlocksCleared)", "int"),
    SummaryRow("cached_blocks_peak", "peak cached blocks", "int"),
    SummaryRow("cached_blocks_end", "cached blocks at the end", "int"),
    SummaryRow("distinct_hashes", "distinct block hashes stored", "int"),
    SummaryRow("restored_after_eviction", "blocks stored again after their eviction", "int"),
    SummaryRow("median_block_lifetime_s", "median block lifetime (vLLM's clock)", "secs"),
    SummaryRow("messages_missing", "messages missing (stream gaps)", "int"),
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
    if how == "secs":
        seconds = float(value)
        return f"{1e3 * seconds:.1f} ms" if abs(seconds) < 1 else f"{seconds:,.2f} s"
    if how == "limit":
        share = summary.get("batch_limited_share")
        if value == "arrivals" or share is None:
            return f"{value} (no request waited)" if value == "arrivals" else str(value)
        return f"{value} ({100 * float(share):.0f}% of steps with requests waiting)"
    if how == "saving":
        return f"{100 * float(value):.1f}% (1 - held / unshared units, all steps)"
    if how == "bool":
        return "yes" if value else "no"
    if how == "device":
        name = summary.get("device_name")
        return f"{value} ({name})" if name and name != value else str(value)
    return str(value)


def _rows_for(summaries: Sequence[Mapping[str, Any]]) -> list[SummaryRow | None]:
    """SUMMARY_ROWS then KV_EVENT_ROWS, without the rows no summary has a key for (an imported KV-event stream has
    no engine figures, kvscope's runs no KV-event ones), and without the section rules that would then be empty."""
    rows: list[SummaryRow | None] = []
    for row in [*SUMMARY_ROWS, None, *KV_EVENT_ROWS]:
        if row is None:
            if rows and rows[-1] is not None:
                rows.append(None)
        elif any(row.key in s for s in summaries) and not (
            row.unused is not None and all(s.get(row.key, row.unused) == row.unused for s in summaries)
        ):
            rows.append(row)
    return rows[:-1] if rows and rows[-1] is None else rows


def summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, str] | None]:
    """(label, value) for one run, in SUMMARY_ROWS order (None separates groups)."""
    return [
        None if row is None else (row.label, format_value(summary, row.key, row.how)) for row in _rows_for([summary])
    ]


def summary_columns(summaries: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[str]] | None]:
    """(label, [value per run]) for runs side by side, in SUMMARY_ROWS order (None separates groups)."""
    return [
        None if row is None else (row.label, [format_value(s, row.key, row.how) for s in summaries])
        for row in _rows_for(summaries)
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
    if isinstance(value, float):
        # Workload statistics are computed floats (p90=381.60000000000014): six significant digits say enough.
        return f"{value:,.0f}" if value.is_integer() and abs(value) < 1e15 else f"{value:.6g}"
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
