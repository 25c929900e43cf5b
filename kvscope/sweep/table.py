"""The sweep's table: one row per run, as Arrow in memory and Parquet on disk (duckdb, polars and pandas read it
without kvscope). What the sweep was (its grid, the executor, when and how long) travels in the schema's metadata
under the key `kvscope.sweep`, as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

META_KEY = b"kvscope.sweep"


def build_table(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> pa.Table:
    """Rows (dicts; a key missing from a row is null there) -> an Arrow table with the sweep's metadata. Columns
    keep the order in which they first appear: the configuration first, then the summary's fields."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {name: pa.array([row.get(name) for row in rows]) for name in names}
    table = pa.table(columns) if columns else pa.table({"run": pa.array([], pa.int64())})
    return table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True, default=str).encode()})


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    pq.write_table(table, path)


def read_table(path: str | os.PathLike) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A sweep's Parquet file -> (one row per run, the sweep's metadata); ValueError for a file that is not one."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path}: a Parquet file, but not a kvscope sweep (no {META_KEY.decode()} metadata)")
    return table.to_pandas(), json.loads(raw)


def table_meta(table: pa.Table) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}
