"""The summary rows as a DataFrame, for the surfaces that show tables as frames (notebooks, the dashboard)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from kvscope.analysis.summary import summarize
from kvscope.present.rows import summary_columns
from kvscope.trace import Trace


def summary_frame(traces: Sequence[Trace], names: Sequence[str] | None = None) -> pd.DataFrame:
    """The `kvscope summary` table (same rows, labels and formatting as the CLI and the report): one row per
    figure, one column per trace (named `names`, else the traces' names; a repeated name gets its position)."""
    names = list(names) if names is not None else [t.name for t in traces]
    if len(names) != len(traces):
        raise ValueError(f"summary_frame: {len(traces)} traces but {len(names)} names")
    rows = [row for row in summary_columns([summarize(t) for t in traces]) if row is not None]
    columns: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        key = name if name not in columns else f"{name} ({i + 1})"
        columns[key] = [values[i] for _, values in rows]
    return pd.DataFrame(columns, index=pd.Index([label for label, _ in rows], name="figure"))
