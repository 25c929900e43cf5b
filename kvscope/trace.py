"""Load and validate a trace file (.kvtrace: an Arrow IPC stream) -> Trace(meta, events DataFrame).

Nothing here unpickles: Arrow IPC carries only typed columns, and the metadata is JSON. Errors a user can cause
(a missing, foreign, corrupt or newer file) raise TraceError with one line naming the file and the problem.
A stream cut off mid-write (a killed run, a truncated copy) loads up to its last complete batch and warns.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from kvscope.events import COLUMNS, FORMAT_VERSION, KIND_NAMES, META_KEY, VERSION_KEY, arrow_schema

TRACE_SUFFIX = ".kvtrace"


class TraceError(ValueError):
    """A trace file that cannot be read. str(err) is one line: '<path>: <problem>'."""


class TruncatedTraceWarning(UserWarning):
    """The trace ends mid-stream (a killed run or a cut copy); everything up to the last complete batch loaded."""


@dataclass
class Trace:
    meta: dict[str, Any]
    events: pd.DataFrame
    path: Path | None = None
    truncated: bool = False  # the stream ended mid-batch, or without the RUN_END event
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        if self.path is not None:
            return self.path.name.removesuffix(TRACE_SUFFIX)
        return str(self.meta.get("allocator", "trace"))

    @cached_property
    def label(self) -> str:
        """Short human name: allocator and its main setting, e.g. 'paged b16' or 'vmm 2 MiB'."""
        from kvscope.units import format_bytes

        alloc = self.meta.get("allocator", "?")
        cfg = self.meta.get("allocator_config", {}) or {}
        if alloc == "paged" and "block_size" in cfg:
            return f"paged b{cfg['block_size']}"
        if alloc == "vmm" and "page_size" in cfg:
            mega = " megacache" if cfg.get("megacache") else ""
            return f"vmm {format_bytes(cfg['page_size'])}{mega}"
        if alloc == "static" and "variant" in cfg:
            return f"static {cfg['variant']}"
        return str(alloc)

    @property
    def bytes_per_token(self) -> int:
        return int((self.meta.get("spec") or {}).get("bytes_per_token", 0))


def _fail(path: Path, problem: str) -> TraceError:
    return TraceError(f"{path}: {problem}")


def read_meta(schema: pa.Schema, path: Path) -> dict[str, Any]:
    md = schema.metadata or {}
    if META_KEY not in md or VERSION_KEY not in md:
        raise _fail(path, "not a kvscope trace (an Arrow stream without kvscope metadata)")
    try:
        version = int(md[VERSION_KEY])
    except ValueError:
        raise _fail(path, f"unreadable format version {md[VERSION_KEY]!r}") from None
    if version > FORMAT_VERSION:
        newer = f"format version {version} is newer than this kvscope reads ({FORMAT_VERSION}); upgrade kvscope"
        raise _fail(path, newer)
    if version < 1:
        raise _fail(path, f"unknown format version {version}")
    try:
        meta = json.loads(md[META_KEY])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"metadata is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(meta, dict):
        raise _fail(path, "metadata is not a JSON object")
    expected = arrow_schema()
    for name in COLUMNS:
        if schema.get_field_index(name) < 0:
            raise _fail(path, f"missing column {name!r}")
        got, want = schema.field(name).type, expected.field(name).type
        if name != "kind" and got != want:
            raise _fail(path, f"column {name!r} has type {got}, expected {want}")
    return meta


def read_table(path: str | os.PathLike) -> tuple[dict[str, Any], pa.Table, bool]:
    """(meta, Arrow table, truncated) for a trace file; raises TraceError."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a directory, not a trace file")
    if path.stat().st_size == 0:
        raise _fail(path, "empty file")
    batches: list[pa.RecordBatch] = []
    truncated = False
    try:
        with pa.OSFile(str(path), "rb") as f:
            try:
                reader = pa.ipc.open_stream(f)
            except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
                raise _fail(path, f"not a kvscope trace (not an Arrow IPC stream: {str(e).splitlines()[0]})") from None
            meta = read_meta(reader.schema, path)
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
                except (pa.ArrowInvalid, pa.ArrowIOError, OSError, EOFError):
                    truncated = True
                    break
            schema = reader.schema
    except TraceError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise _fail(path, f"unreadable ({str(e).splitlines()[0]})") from None
    table = pa.Table.from_batches(batches, schema=schema)
    return meta, table, truncated


def table_to_frame(table: pa.Table) -> pd.DataFrame:
    """Events as a DataFrame: int columns stay int64/int32, `kind` becomes a categorical over every kind name."""
    df = table.to_pandas(types_mapper=None, categories=None)
    kind = table.column("kind")
    if pa.types.is_dictionary(kind.type):
        names = kind.combine_chunks().dictionary.to_pylist() if table.num_rows else KIND_NAMES
        codes = kind.combine_chunks().indices.to_numpy(zero_copy_only=False) if table.num_rows else []
        df["kind"] = (
            pd.Categorical.from_codes(codes, categories=names)
            if table.num_rows
            else pd.Categorical([], categories=names)
        )
    else:
        df["kind"] = pd.Categorical(df["kind"].astype(str), categories=KIND_NAMES)
    return df


def load_trace(path: str | os.PathLike, *, warn: bool = True) -> Trace:
    """Load a .kvtrace file. Raises TraceError for files that are not readable traces; warns
    (TruncatedTraceWarning) when the run was cut off and returns what was complete."""
    path = Path(path)
    meta, table, truncated = read_table(path)
    events = table_to_frame(table)
    ended = bool(len(events)) and events["kind"].iloc[-1] == "run_end"
    if not ended:
        truncated = True
    if truncated and warn:
        warnings.warn(
            f"{path}: trace is cut off (killed run or partial copy); loaded {len(events)} events up to the last "
            "complete batch",
            TruncatedTraceWarning,
            stacklevel=2,
        )
    return Trace(meta=meta, events=events, path=path, truncated=truncated)


def trace_from_recorder(recorder) -> Trace:
    """An in-memory Trace from a Recorder created with path=None (notebooks, tests)."""
    table = recorder.to_table()
    return Trace(meta=dict(recorder.meta), events=table_to_frame(table), path=None, truncated=False)
