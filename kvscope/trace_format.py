"""What a valid trace file is: its metadata (format version, checksum, JSON, field types, columns), its record
batches (validation, no nulls, checksums) and the Arrow IPC stream's framing as read by hand; the checks that
kvscope.trace (loading) and kvscope.digest (a trace's appended results) both make, in a module of their own so
that neither imports the other. Errors raise TraceError: one line, '<path>: <problem>'.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa

from kvscope.events import (
    BATCH_CRC_KEY,
    COLUMNS,
    FORMAT_VERSION,
    META_CRC_KEY,
    META_KEY,
    VERSION_KEY,
    arrow_schema,
    batch_crc32,
)


class TraceError(ValueError):
    """A trace file that cannot be read. str(err) is one line: '<path>: <problem>'."""


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
def batch_problem(batch: pa.RecordBatch, custom: Any, version: int, *, checksum: bool = True) -> str | None:
    """What is wrong with one record batch as read, or None. Validation comes first: until then its offsets and
    indexes may point anywhere, and reading its values (the checksum included) could crash. checksum=False leaves
    the checksum out, for a stream whose bytes were verified as a whole (a digest's stream_crc32)."""
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
    if not checksum:
        return None
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
