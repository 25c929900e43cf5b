"""Writing a trace's digest (kvscope.digest says what it is and reads it): the whole-run results computed by
kvscope.analysis from the closed trace, appended as the stream's last message. Apart from the reading side so that
kvscope.trace, which reads digests, does not import the analysis that computes them.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import struct
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from kvscope import digest
from kvscope.analysis import block_tables, fragmentation
from kvscope.analysis._events import acct_last
from kvscope.analysis.replay import ReplayError
from kvscope.analysis.summary import summarize
from kvscope.digest import (  # (fingerprint and read_digest through the module: tests replace them)
    _DICTIONARY,
    _EOS,
    _SCHEMA,
    DIGEST_KEY,
    DIGEST_VERSION,
    FIRST_DIGEST_FORMAT,
    _last_digest,
    _messages,
    _read,
    crc_prefix,
    disabled,
)
from kvscope.events import BATCH_CRC_KEY, Kind, batch_crc32
from kvscope.present.views import CATALOG, MAP_MAX_STEPS, MAP_MAX_UNITS, VIEWS, start_step
from kvscope.trace import load_trace
from kvscope.trace_format import _body_length, format_version


def _table_b64(frame: pd.DataFrame) -> str:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return base64.b64encode(sink.getvalue().to_pybytes()).decode("ascii")


def _json_value(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# Whole-run frames kept by kvscope.analysis under these cache keys ("analysis.<key>"), with the function building each
_FRAMES = {
    "memory_timeline": ("kvscope.analysis.memory", "memory_timeline"),
    "request_lifetimes": ("kvscope.analysis.requests", "request_lifetimes"),
    "throughput_timeline": ("kvscope.analysis.throughput", "throughput_timeline"),
    "step_clock": ("kvscope.analysis._events", "step_clock"),
}


def results(trace) -> dict[str, Any]:
    """The digest's results for a loaded trace: the summary, the event counts, the per-step and per-request books
    (memory and throughput timelines, step clock, request lifetimes), the surfaces' fragmentation map, and the
    block states and tables at the steps the surfaces open on (each stepped view's snapshot, the sliders' start)."""
    out: dict[str, Any] = {
        "summary": summarize(trace),
        "kind_counts": [[name, n] for name, n in trace.store.kind_counts()],
        "values": {},
        "frames": {},
        "steps": [],
        "maps": [],
    }
    if not VIEWS["fragmentation"].applies(trace):  # an imported KV-event stream: the engine's books do not apply
        return out
    out["values"][f"acct_last.{int(Kind.ACCT_CAPACITY)}"] = acct_last(trace, Kind.ACCT_CAPACITY)  # pool_geometry's
    for key, (module, name) in _FRAMES.items():
        out["frames"][key] = _table_b64(getattr(importlib.import_module(module), name)(trace))
    try:
        steps = sorted({int(start_step(trace))} | {view.snapshot_step(trace) for view in CATALOG if view.stepped})
        for step in steps:
            entry: dict[str, Any] = {"step": step, "block_states": _table_b64(fragmentation.block_states(trace, step))}
            if block_tables.has_block_tables(trace):
                entry["block_tables"] = _table_b64(block_tables.block_tables(trace, step))
            out["steps"].append(entry)
    except (ReplayError, ValueError):  # a trace the block views cannot be drawn for: the surfaces say why, as before
        out["steps"] = []
    args = (trace, MAP_MAX_UNITS, MAP_MAX_STEPS)
    try:
        state, fill = fragmentation.state_matrix(*args), fragmentation.fill_matrix(*args)
    except (ReplayError, ValueError):  # a trace the map cannot be drawn for: the surfaces say why, as before
        return out
    out["maps"].append(
        {"max_units": MAP_MAX_UNITS, "max_steps": MAP_MAX_STEPS, "state": _table_b64(state), "fill": _table_b64(fill)}
    )
    return out


_WRITE_LOCK = threading.Lock()


def write_digest(path: str | os.PathLike) -> bool:
    """Compute the digest of a closed trace file and append it (the end-of-stream marker moves after it), in place
    of a digest already there that is out of date (another kvscope's). False, leaving the file as it was, when the
    trace does not qualify (not a complete run, an older format, several kind dictionaries) or its digest is
    current."""
    if disabled():
        return False
    path = Path(path)
    size = path.stat().st_size
    messages = _messages(path, size)
    if not messages or messages[0][2] != _SCHEMA:
        return False
    if sum(1 for m in messages if m[2] == _DICTIONARY) != 1:
        return False
    schema = pa.ipc.open_stream(pa.py_buffer(_read(path, *messages[0][:2]) + _EOS)).schema
    if format_version(schema, path) < FIRST_DIGEST_FORMAT or digest.read_digest(path) is not None:
        return False
    end = messages[-1][0] if _last_digest(path, messages) is not None else size - len(_EOS)  # where the digest goes
    trace = load_trace(path, warn=False)
    if trace.truncated:
        return False
    payload: dict[str, Any] = {
        "digest_version": DIGEST_VERSION,
        "fingerprint": digest.fingerprint(),
        "stream_bytes": end,
        "stream_crc32": crc_prefix(path, end),
        "events": trace.num_events,
        **results(trace),
    }
    message = _digest_message(path, schema, messages, json.dumps(payload, default=_json_value))
    with _WRITE_LOCK, open(path, "r+b") as f:
        if os.fstat(f.fileno()).st_size != size:
            return False  # the file changed meanwhile: leave it
        f.seek(end)
        f.write(message + _EOS)
        f.truncate()
    return True


def _digest_message(path: Path, schema: pa.Schema, messages: list, text: str) -> bytes:
    """The IPC message of an empty record batch carrying the digest: written into a stream of its own (schema,
    dictionary, batch) and cut out of it. Its checksum counts the trace's own kind dictionary, which readers of the
    trace decode it with."""
    dictionary_message = next(m for m in messages if m[2] == _DICTIONARY)
    head = _read(path, *messages[0][:2]) + _read(path, *dictionary_message[:2])
    kinds = pa.ipc.open_stream(pa.py_buffer(head + _EOS)).schema.field("kind").type
    # the trace's dictionary as its readers see it: decode the dictionary message with an empty batch after it
    arrays = [
        pa.DictionaryArray.from_arrays(pa.array([], kinds.index_type), pa.array([], pa.string()))
        if name == "kind"
        else pa.array([], schema.field(name).type)
        for name in schema.names
    ]
    empty = pa.RecordBatch.from_arrays(arrays, schema=schema.remove_metadata())
    decoded = pa.ipc.open_stream(pa.py_buffer(head + _batch_message(empty, {}) + _EOS)).read_next_batch()
    custom = {BATCH_CRC_KEY: str(batch_crc32(decoded)).encode(), DIGEST_KEY: text.encode()}
    return _batch_message(empty, custom)


def _batch_message(batch: pa.RecordBatch, custom: dict[bytes, bytes]) -> bytes:
    """The IPC message (framing included) of one record batch with this custom metadata."""
    sink = pa.BufferOutputStream()
    writer = pa.ipc.new_stream(sink, batch.schema)
    writer.write_batch(batch, custom_metadata=custom or None)
    writer.close()
    return _last_message(sink.getvalue().to_pybytes())


def _last_message(stream: bytes) -> bytes:
    """The last message (framing included) before the end-of-stream marker of an in-memory IPC stream."""
    pos, last = 0, b""
    while pos < len(stream) - len(_EOS):
        _, length = struct.unpack_from("<Ii", stream, pos)
        body = _body_length(stream[pos + 8 : pos + 8 + length]) or 0
        last = stream[pos : pos + 8 + length + body]
        pos += 8 + length + body
    return last
