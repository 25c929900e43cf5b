"""Load and validate a trace file (.kvtrace: an Arrow IPC stream) -> Trace(meta, events DataFrame).

Nothing here unpickles: Arrow IPC carries only typed columns, and the metadata is JSON. Errors a user can cause
(a missing, foreign, damaged or newer file, or metadata of the wrong shape) raise TraceError with one line naming the
file and the problem.

Integrity. Every batch is checked before anything reads its values: `validate(full=True)` (offsets, dictionary
indexes and the dictionary itself in bounds: pyarrow does not check this on read, and a bad string offset would
otherwise crash the process), no nulls, and, from format version 2 on, its checksum (kvscope.events.batch_crc32,
stored in the batch message's custom metadata) and the metadata's (`kvscope.meta_crc32` in the schema metadata).
Version-1 traces have no checksums: they are validated only, so damage that stays valid Arrow goes unnoticed there.

Two ways a file can be incomplete, told apart by where the stream stops:
- Cut off: the stream simply ends (a killed run, a truncated copy): the last message runs past the end of the file,
  or the file ends at a message boundary without RUN_END. It loads up to its last complete batch, warning with
  TruncatedTraceWarning. A file cut inside its first message (the schema, which holds the metadata) has nothing to
  load and is a TraceError.
- Damaged: a complete message that does not decode, fails validation or its checksum, or bytes that cannot be a
  message. A TraceError naming the file and the batch index; `load_trace(path, salvage=True)` (the CLI's
  `--salvage`) instead loads the verified batches before it, warning with DamagedTraceWarning.
A damaged length field can make a message near the end look as if it ran past the end of the file: that reads as
cut off, which is still safe, since every batch returned was verified.
"""

# This module is longer than 400 lines: reading must tell a cut-off stream from a damaged one, which needs the
# Arrow IPC framing read by hand next to the checksum and metadata checks; splitting them would split one decision.

from __future__ import annotations

import json
import math
import os
import struct
import warnings
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd
import pyarrow as pa

from kvscope.alloc.registry import label_of
from kvscope.event_store import EventStore, StoreBuilder
from kvscope.events import (
    BATCH_CRC_KEY,
    COLUMNS,
    FORMAT_VERSION,
    KIND_NAMES,
    META_CRC_KEY,
    META_KEY,
    VERSION_KEY,
    arrow_schema,
    batch_crc32,
)

TRACE_SUFFIX = ".kvtrace"


class TraceError(ValueError):
    """A trace file that cannot be read. str(err) is one line: '<path>: <problem>'."""


class TruncatedTraceWarning(UserWarning):
    """The trace ends mid-stream (a killed run or a cut copy); everything up to the last complete batch loaded."""


class DamagedTraceWarning(TruncatedTraceWarning):
    """load_trace(salvage=True) met a damaged batch and loaded the verified batches before it."""


@dataclass
class Trace:
    """One loaded trace: its run metadata and its events.

    The events are held by kind in an EventStore (kvscope.event_store: about 0.3 GB for a 21-million-event
    trace), which is what kvscope.analysis reads, a kind at a time. `events`, the DataFrame of every event (int
    columns, `kind` a categorical over the kind dictionary), is built from it on first use and kept; a Trace made
    from a DataFrame keeps that frame as its `events` and builds its store from it when the analysis asks."""

    # what the `events` and `store` properties below read and set (set first: __init__ assigns in this order)
    _events: pd.DataFrame | None = field(default=None, init=False, repr=False, compare=False)
    _store: EventStore | None = field(default=None, init=False, repr=False, compare=False)
    meta: dict[str, Any]  # (the fields __init__ does not take may come first)
    events: pd.DataFrame = field(default=None, repr=False)  # a property: see below
    path: Path | None = None
    truncated: bool = False  # the stream ended mid-batch or without the RUN_END event, or was salvaged
    _cache: dict = field(default_factory=dict, repr=False)
    store: EventStore = field(default=None, repr=False)  # type: ignore[assignment]  # a property: see below

    def __post_init__(self) -> None:
        if self._events is None and self._store is None:
            raise TypeError("Trace needs events (a DataFrame) or a store")

    @property
    def num_events(self) -> int:
        return len(self._store) if self._store is not None else len(self.events)

    @property
    def name(self) -> str:
        if self.path is not None:
            return self.path.name.removesuffix(TRACE_SUFFIX)
        return str(self.meta.get("allocator", "trace"))

    @cached_property
    def label(self) -> str:
        """Short human name: the label the allocator wrote into its config, e.g. 'paged b16' or 'vmm 2 MiB'
        (traces recorded before configs carried one get it from the allocator registry)."""
        cfg = self.meta.get("allocator_config") or {}
        return label_of(str(self.meta.get("allocator", "?")), cfg if isinstance(cfg, dict) else {})

    @property
    def bytes_per_token(self) -> int:
        return int((self.meta.get("spec") or {}).get("bytes_per_token", 0))


def _events(self: Trace) -> pd.DataFrame:
    """Every event as a DataFrame (built from the store on first use: for a large trace, gigabytes)."""
    if self._events is None:
        assert self._store is not None
        self._events = self._store.frame()
    return self._events


def _set_events(self: Trace, frame: pd.DataFrame | None) -> None:
    self._events = frame
    self._store = None


def _store(self: Trace) -> EventStore:
    """The events by kind (what the analysis reads)."""
    if self._store is None:
        assert self._events is not None
        self._store = EventStore.from_frame(self._events)
    return self._store


def _set_store(self: Trace, store: EventStore | None) -> None:
    if store is not None:
        self._store = store


# `events` and `store` are dataclass fields (Trace(meta, events=...) and dataclasses.replace keep working) read
# through properties, so that a loaded trace builds its DataFrame only when asked.
Trace.events = property(_events, _set_events)
Trace.store = property(_store, _set_store)  # type: ignore[assignment]


def _fail(path: Path, problem: str) -> TraceError:
    return TraceError(f"{path}: {problem}")


def _first_line(error: BaseException, limit: int = 160) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---- metadata -----------------------------------------------------------------------------------------------------
# The fields kvscope's analysis and surfaces read (RunMeta in kvscope.events), checked at load so that a wrong type
# is one line here rather than a traceback deep in an analysis. Absent fields, and null, are fine: importers and
# hand-made traces have fewer. Integers must be JSON-safe (below 2**53) and not below the given minimum.
_JSON_INT_LIMIT = 1 << 53
_META_STR = ("kvscope_version", "allocator", "device", "device_name", "model", "start_time", "command")
_META_INT = {"format_version": 1, "seed": -_JSON_INT_LIMIT}
_META_DICT = ("allocator_config", "spec", "versions", "engine_config", "workload", "requests")
_NESTED: dict[str, tuple[dict[str, int], tuple[str, ...], tuple[str, ...]]] = {
    # section: (integer fields with their minimum, boolean fields, string fields)
    "spec": ({"bytes_per_token": 0, "num_layers": 0, "num_kv_heads": 0, "head_dim": 0}, (), ("name", "dtype")),
    "allocator_config": (
        {"block_size": 1, "page_size": 1, "pages": 0, "num_blocks": 0, "buffer_row_bytes": 0, "rows": 0},
        ("megacache", "prefix_caching", "deferred_reclaim"),
        ("variant", "backend"),
    ),
    "engine_config": (
        {"max_len": 0, "max_batch": 0, "max_tokens_per_step": 0, "kv_memory": 0, "swap_space": 0},
        ("chunked_prefill", "prefix_caching"),
        ("preemption", "clock"),
    ),
}
_REQUEST_INT_COLUMNS = {"seq": 0, "prompt_len": 0, "output_len": 0, "n": 0, "shared_prefix_len": 0}


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value < _JSON_INT_LIMIT


def _type_problem(where: str, value: Any, want: str) -> str:
    return f"metadata {where} should be {want}, got {type(value).__name__} {json.dumps(value, default=str)[:40]}"


def _section_problem(section: str, values: dict[str, Any]) -> str | None:
    ints, bools, strs = _NESTED[section]
    for key, minimum in ints.items():
        value = values.get(key)
        if value is not None and not _is_int(value, minimum):
            return _type_problem(f"{section}.{key}", value, f"an integer >= {minimum}")
    for key in bools:
        value = values.get(key)
        if value is not None and not isinstance(value, bool):
            return _type_problem(f"{section}.{key}", value, "true or false")
    for key in strs:
        value = values.get(key)
        if value is not None and not isinstance(value, str):
            return _type_problem(f"{section}.{key}", value, "a string")
    return None


def _requests_problem(requests: dict[str, Any]) -> str | None:
    lengths = set()
    for key, column in requests.items():
        if not isinstance(column, list):
            return _type_problem(f"requests.{key}", column, "a list (one value per request)")
        lengths.add(len(column))
        minimum = _REQUEST_INT_COLUMNS.get(key)
        if minimum is not None and not _all_ints(column, minimum):
            bad = next(v for v in column if not _is_int(v, minimum))
            return _type_problem(f"requests.{key}[...]", bad, f"an integer >= {minimum}")
        if key == "arrival" and not all(_is_number(v) for v in column):
            bad = next(v for v in column if not _is_number(v))
            return _type_problem("requests.arrival[...]", bad, "a finite number of seconds")
    if len(lengths) > 1:
        return f"metadata requests columns have different lengths ({', '.join(map(str, sorted(lengths)))})"
    return None


def _all_ints(column: list, minimum: int) -> bool:
    """Whether every value is an int (not a bool) in [minimum, 2**53): _is_int on each, in one pass of C loops."""
    if not all(type(v) is int for v in column):  # JSON gives plain ints; bool, a subclass, is not one
        return all(_is_int(v, minimum) for v in column)
    return not column or (min(column) >= minimum and max(column) < _JSON_INT_LIMIT)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a trace's metadata, or None: the checks load_trace makes."""
    for key in _META_STR:
        if meta.get(key) is not None and not isinstance(meta[key], str):
            return _type_problem(key, meta[key], "a string")
    for key, minimum in _META_INT.items():
        if meta.get(key) is not None and not _is_int(meta[key], minimum):
            return _type_problem(key, meta[key], f"an integer >= {minimum}")
    for key in _META_DICT:
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            return _type_problem(key, meta[key], "an object")
    for section in _NESTED:
        problem = _section_problem(section, meta.get(section) or {})
        if problem:
            return problem
    return _requests_problem(meta.get("requests") or {})


def format_version(schema: pa.Schema, path: Path) -> int:
    """The trace's format version; TraceError for files that are not kvscope traces or are newer than this reader."""
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
    return version


def _check_meta_crc(md: dict[bytes, bytes], version: int, path: Path) -> None:
    if META_CRC_KEY not in md:
        if version >= 2:
            raise _fail(path, "metadata has no checksum (kvscope.meta_crc32); the file is damaged")
        return
    try:
        stored = int(md[META_CRC_KEY])
    except ValueError:
        raise _fail(path, "metadata checksum is unreadable; the file is damaged") from None
    if zlib.crc32(md[META_KEY]) != stored:
        raise _fail(path, "metadata is damaged (checksum mismatch)")


def _check_columns(schema: pa.Schema, path: Path) -> None:
    expected = arrow_schema()
    for name in COLUMNS:
        if schema.get_field_index(name) < 0:
            raise _fail(path, f"missing column {name!r}")
        got, want = schema.field(name).type, expected.field(name).type
        if name == "kind":
            ok = pa.types.is_dictionary(got) and pa.types.is_integer(got.index_type)
            if not ok or not pa.types.is_string(got.value_type):
                raise _fail(path, f"column 'kind' has type {got}, expected {want}")
        elif got != want:
            raise _fail(path, f"column {name!r} has type {got}, expected {want}")


def read_meta(schema: pa.Schema, path: Path) -> dict[str, Any]:
    """The run metadata of a trace's schema, checked (version, checksum, JSON, field types, columns)."""
    version = format_version(schema, path)
    md = schema.metadata
    _check_meta_crc(md, version, path)
    try:
        meta = json.loads(md[META_KEY])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"metadata is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(meta, dict):
        raise _fail(path, "metadata is not a JSON object")
    problem = meta_problem(meta)
    if problem:
        raise _fail(path, problem)
    _check_columns(schema, path)
    return meta


# ---- batches ------------------------------------------------------------------------------------------------------
def batch_problem(batch: pa.RecordBatch, custom: Any, version: int) -> str | None:
    """What is wrong with one record batch as read, or None. Validation comes first: until then its offsets and
    indexes may point anywhere, and reading its values (the checksum included) could crash."""
    try:
        batch.validate(full=True)
        kind = batch.column("kind")
        kind.dictionary.validate(full=True)
    except (pa.ArrowException, KeyError) as e:
        return f"invalid content: {_first_line(e)}"
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if column.null_count:
            return f"column {name!r} has {column.null_count} nulls"
    names = kind.dictionary.to_pylist()
    if len(set(names)) != len(names):
        return "the kind dictionary repeats a name"
    stored = custom.get(BATCH_CRC_KEY) if custom is not None else None
    if stored is None:
        return "no checksum (kvscope.crc32)" if version >= 2 else None
    try:
        expected = int(stored)
    except ValueError:
        return "unreadable checksum"
    if batch_crc32(batch) != expected:
        return "checksum mismatch"
    return None


# The stream's framing, read by hand only after pyarrow failed, to tell a cut from damage. A message is
# 0xFFFFFFFF, an int32 length L of its flatbuffer header (L % 8 == 0), the header, then its body (bodyLength bytes, a
# multiple of 8); L == 0 is the end-of-stream marker. The header's tables, as in Arrow's Message.fbs:
#   Message: 0 version, 1 header_type (1 schema, 2 dictionary batch, 3 record batch), 2 header, 3 bodyLength
#   DictionaryBatch: 0 id, 1 data (a RecordBatch)        RecordBatch: 0 length, 1 nodes, 2 buffers ({offset, length})
_CONTINUATION = 0xFFFFFFFF
_MAX_HEADER = 1 << 13  # kvscope's batch headers are under 1 KiB; only the schema's is big (it holds the metadata)
_BODY_SLACK = 128  # bodyLength is the end of the last buffer, padded (8 bytes in Arrow's writer; allow up to 64)


def _unpack(fmt: str, data: bytes, at: int | None) -> int:
    if at is None or at < 0 or at + struct.calcsize(fmt) > len(data):
        raise struct.error("out of bounds")
    return struct.unpack_from(fmt, data, at)[0]


def _field(data: bytes, table: int, index: int) -> int | None:
    """Where field `index` of the flatbuffer table at `table` is stored; None when it is absent (its default)."""
    vtable = table - _unpack("<i", data, table)
    slot = 4 + 2 * index  # the vtable: its own size, the table's size, then one uint16 offset per field
    if slot + 2 > _unpack("<H", data, vtable):
        return None
    offset = _unpack("<H", data, vtable + slot)
    return table + offset if offset else None


def _deref(data: bytes, at: int | None) -> int:
    if at is None:  # an absent field where the format requires one: the caller's struct.error path reports it
        raise struct.error("required flatbuffer field is absent")
    return _unpack("<I", data, at) + at


def _buffers_end(data: bytes, message: int, header_type: int) -> int:
    """The end of the last body buffer a (dictionary or record) batch header lists."""
    batch = _deref(data, _field(data, message, 2))
    if header_type == 2:
        batch = _deref(data, _field(data, batch, 1))
    where = _field(data, batch, 2)
    if where is None:
        return 0
    vector = _deref(data, where)
    count = _unpack("<I", data, vector)
    ends = (_unpack("<q", data, vector + 4 + 16 * i) + _unpack("<q", data, vector + 12 + 16 * i) for i in range(count))
    return max(ends, default=0)


def _body_length(header: bytes) -> int | None:
    """Message.bodyLength of a flatbuffer message header, or None when the header is not consistent: unparseable,
    or a batch whose bodyLength does not match the buffers it lists (so a damaged bodyLength is not taken for a
    message that runs past the end of the file)."""
    try:
        message = _unpack("<I", header, 0)
        where = _field(header, message, 3)
        body = _unpack("<q", header, where) if where is not None else 0
        where = _field(header, message, 1)
        header_type = _unpack("<B", header, where) if where is not None else 0
        if header_type in (2, 3):
            end = _buffers_end(header, message, header_type)
            if not end <= body < end + _BODY_SLACK:
                return None
        return body
    except struct.error:
        return None


def _runs_past_end(raw: BinaryIO, pos: int, size: int, max_header: int = _MAX_HEADER) -> bool:
    """Whether the messages from byte `pos` on run past the end of the file before anything malformed or the
    end-of-stream marker: then the stream was cut there, and a read error at `pos` is the cut, not damage."""
    while pos < size:
        raw.seek(pos)
        head = raw.read(8)
        if len(head) < 8:
            return True
        marker, length = struct.unpack("<Ii", head)
        if marker != _CONTINUATION or length < 0 or length % 8 or length > max_header:
            return False
        if length == 0:
            return False
        if pos + 8 + length > size:
            return True
        body = _body_length(raw.read(length))
        if body is None or body < 0 or body % 8:
            return False
        pos += 8 + length + body
    return pos > size


@dataclass
class _Stream:
    """What reading a trace's stream found: the verified batches, as an EventStore or (read_table) an Arrow table."""

    meta: dict[str, Any]
    store: EventStore | None = None
    table: pa.Table | None = None
    cut: bool = False  # the stream stops mid-message
    damage: str | None = None  # salvaged: 'batch <i> is damaged (...)'


_READ_ERRORS = (pa.ArrowException, OSError, EOFError, MemoryError)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a directory, not a trace file")
    if path.stat().st_size == 0:
        raise _fail(path, "empty file")


def _open_stream(f: pa.NativeFile, raw: BinaryIO, path: Path, size: int) -> pa.ipc.RecordBatchStreamReader:
    try:
        return pa.ipc.open_stream(f)
    except _READ_ERRORS as e:
        if _runs_past_end(raw, 0, size, max_header=1 << 31):
            raise _fail(path, "cut off inside its first message (the schema and metadata): nothing to load") from None
        raise _fail(path, f"not a kvscope trace (not an Arrow IPC stream: {_first_line(e)})") from None


def _read_batches(
    reader: pa.ipc.RecordBatchStreamReader,
    f: pa.NativeFile,
    raw: BinaryIO,
    size: int,
    version: int,
    keep: Callable[[pa.RecordBatch], None],
) -> tuple[int, str | None, bool]:
    """Hands every verified batch to `keep`, in order, and returns (how many, what is wrong with the next one or
    None at a clean end, whether the stream is cut off there). Only a message pyarrow could not read can be a cut;
    one that decoded and then failed its checks was complete, so that is damage."""
    kept = 0
    while True:
        pos = f.tell()  # the reader takes exactly one message at a time: the next one starts here
        try:
            batch, custom = reader.read_next_batch_with_custom_metadata()
        except StopIteration:
            if f.tell() >= size:
                return kept, None, False
            # an end-of-stream marker before the end of the file: a damaged length, unless a cut explains it
            problem: str | None = f"the stream ends {size - f.tell()} bytes before the file does"
        except _READ_ERRORS as e:
            problem = f"unreadable: {_first_line(e)}"
        else:
            problem = batch_problem(batch, custom, version)
            if problem is None:
                keep(batch)
                kept += 1
                continue
            return kept, problem, False
        return kept, problem, _runs_past_end(raw, pos, size)


def _read_stream(path: Path, *, salvage: bool, as_table: bool = False) -> _Stream:
    """The verified batches go straight into an EventStore (one decoded batch in memory at a time), or, with
    as_table, into an Arrow table."""
    size = path.stat().st_size
    builder = StoreBuilder()
    batches: list[pa.RecordBatch] = []
    with pa.OSFile(str(path), "rb") as f, open(path, "rb") as raw:
        reader = _open_stream(f, raw, path, size)
        version = format_version(reader.schema, path)
        meta = read_meta(reader.schema, path)
        worker = _Worker(builder.add) if not as_table else None
        try:
            hand = batches.append if worker is None else worker
            kept, problem, cut = _read_batches(reader, f, raw, size, version, hand)
        finally:
            if worker is not None:
                worker.close()  # every batch handed over is in the store (or its error is raised) after this
        schema = reader.schema
    store, table = (None, _table(batches, schema)) if as_table else (builder.finish(), None)
    if problem is None or cut:
        return _Stream(meta, store, table, cut=cut)
    damage = f"batch {kept} is damaged ({problem})"
    if not salvage:
        keep = f"load_trace(..., salvage=True) or --salvage keeps the {kept} batches before it"
        raise _fail(path, f"{damage}; {keep}")
    return _Stream(meta, store, table, damage=damage)


class _Worker:
    """Calls fn(item) for every item handed to it, in order, on one thread of its own: the store is built from one
    batch while the next is read, decompressed and checked (pyarrow and zlib release the GIL for that), so loading
    takes about the longer of the two rather than their sum. At most `depth` batches wait, bounding the memory; the
    first error is raised to the loading thread (by the call after it, or by close)."""

    def __init__(self, fn: Callable[[Any], None], depth: int = 4) -> None:
        self.fn = fn
        self.depth = depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvscope-load")
        self.pending: deque[Future] = deque()

    def __call__(self, item: Any) -> None:
        self.pending.append(self.pool.submit(self.fn, item))
        while len(self.pending) > self.depth or (self.pending and self.pending[0].done()):
            self.pending.popleft().result()

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _table(batches: list[pa.RecordBatch], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_batches(batches, schema=schema)


def _load_stream(path: Path, *, salvage: bool, as_table: bool = False) -> _Stream:
    _check_file(path)
    try:
        return _read_stream(path, salvage=salvage, as_table=as_table)
    except TraceError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise _fail(path, f"unreadable ({_first_line(e)})") from None


def read_table(path: str | os.PathLike, *, salvage: bool = False) -> tuple[dict[str, Any], pa.Table, bool]:
    """(meta, Arrow table, cut off mid-stream or salvaged) for a trace file; raises TraceError."""
    stream = _load_stream(Path(path), salvage=salvage, as_table=True)
    assert stream.table is not None
    return stream.meta, stream.table, stream.cut or stream.damage is not None


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


def load_trace(path: str | os.PathLike, *, warn: bool = True, salvage: bool = False) -> Trace:
    """Load a .kvtrace file. Raises TraceError for files that are not readable traces, damaged ones included;
    warns (TruncatedTraceWarning) when the run was cut off and returns what was complete. With salvage=True a
    damaged file loads its verified batches before the damage instead, warning with DamagedTraceWarning."""
    path = Path(path)
    stream = _load_stream(path, salvage=salvage)
    store = stream.store
    assert store is not None
    n_events = len(store)
    ended = bool(n_events) and store.names[int(store.index[-1])] == "run_end"
    truncated = stream.cut or stream.damage is not None or not ended
    if warn and stream.damage is not None:
        message = f"{path}: {stream.damage}; salvaged {n_events} events from the batches before it"
        warnings.warn(message, DamagedTraceWarning, stacklevel=2)
    elif warn and truncated:
        how = (
            "mid-stream (killed run or partial copy); loaded {} events up to the last complete batch"
            if stream.cut
            else "without RUN_END (an interrupted or killed run); loaded its {} events"
        )
        warnings.warn(f"{path}: trace is cut off {how.format(n_events)}", TruncatedTraceWarning, stacklevel=2)
    return Trace(meta=stream.meta, path=path, truncated=truncated, store=store)


def trace_from_recorder(recorder) -> Trace:
    """An in-memory Trace from a Recorder created with path=None (notebooks, tests)."""
    builder = StoreBuilder()
    builder.add(recorder.to_table())
    return Trace(meta=dict(recorder.meta), path=None, truncated=False, store=builder.finish())
