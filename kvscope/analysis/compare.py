"""Several runs side by side: one row per trace, the summary's figures as columns."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from kvscope.analysis.summary import summarize

# Summary keys that are not single figures (nested dicts) stay out of the table.
_SKIP = {"allocator_config"}


def compare_runs(traces: Iterable | Mapping) -> pd.DataFrame:
    """One row per trace, in the order given: label (the mapping's key, else trace.label; made unique with a
    ' (2)', ' (3)' suffix when two runs share one), name (file name or allocator), then every summary figure
    (kvscope.analysis.summary.summarize) plus waste_bytes_saved_vs_worst (how much less peak waste than the most
    wasteful run of the set) and used_per_reserved (peak used / peak reserved)."""
    items = list(traces.items()) if isinstance(traces, Mapping) else [(None, t) for t in traces]
    rows = []
    seen: dict[str, int] = {}
    for label, trace in items:
        s = summarize(trace)
        base = str(label) if label is not None else str(s.get("label") or trace.name)
        seen[base] = seen.get(base, 0) + 1
        unique = base if seen[base] == 1 else f"{base} ({seen[base]})"
        row = {"label": unique, "name": trace.name}
        row.update({k: v for k, v in s.items() if k not in _SKIP and k != "label"})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame({"label": pd.Series([], dtype=object), "name": pd.Series([], dtype=object)})
    frame["waste_bytes_saved_vs_worst"] = frame["peak_waste_bytes"].max() - frame["peak_waste_bytes"]
    reserved = frame["peak_reserved_bytes"].where(frame["peak_reserved_bytes"] > 0)
    frame["used_per_reserved"] = (frame["peak_used_bytes"] / reserved).fillna(0.0)
    return frame.reset_index(drop=True)
