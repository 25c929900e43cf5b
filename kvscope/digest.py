"""A trace's digest: whole-run results written into the trace when its run closes (format version 3), so that the
surfaces read megabytes instead of replaying every event.

What is in it (`results`): the `summarize` dict, the event count of every kind, the per-step and per-request books
(memory_timeline, throughput_timeline, step_clock, request_lifetimes), the fragmentation map at the surfaces'
resolution (state_matrix and fill_matrix over the whole run, the figures that sweep every event), and the block
states and block tables at the steps the surfaces open on (each stepped view's snapshot step, the step sliders'
start), each exactly as kvscope.analysis computes it from the loaded trace at that moment. A trace that has one
loads lazily (`load_trace`): its metadata and the digest's results at once (put into its cache under the keys the
analysis keeps them by), its events only when an analysis asks for something else.

Where it is. The last message of the Arrow IPC stream, after the batch holding RUN_END: a record batch of no rows
whose custom metadata holds `kvscope.digest` (JSON, below) next to its `kvscope.crc32`. Plain Arrow readers see an
empty batch; kvscope 2 readers refuse the file (format version 3 is newer than they read). The JSON:

    digest_version   DIGEST_VERSION
    fingerprint      kvscope's version and a CRC-32 of the analysis sources (`fingerprint()`): a digest written by
                     other analysis code is ignored, and the results are computed from the events as before
                     (write_digest then replaces it)
    stream_bytes     where the digest message starts: the stream before it (schema, batches) is bytes [0, this)
    stream_crc32     zlib.crc32 of those bytes: any change to them (damage, an edit) and the digest is ignored, so
                     that load_trace then reads every batch and reports the damage as it would without a digest
    events           the number of events
    kind_counts      [[kind name, events], ...] in the kind dictionary's order (EventStore.kind_counts)
    summary          summarize(trace) (JSON: its values are JSON already)
    values           {cache key: int}: acct_last of ACCT_CAPACITY (what pool_geometry reads)
    frames           {cache key: frame}: the books above
    steps            [{"step", "block_states", "block_tables"}]: the frames at those steps
    maps             [{"max_units", "max_steps", "state", "fill"}]: the two map frames
Every frame is an Arrow IPC stream (zstd) of the DataFrame (pyarrow's pandas metadata keeps its dtypes), base64.
For the 50,000-request benchmark trace (96 MiB) the digest is about 11 MB and reads back in about 0.2 s, most of
it the CRC-32 over the stream.

A digest is written only for a run that closed cleanly (the file ends with the end-of-stream marker, RUN_END is its
last event, one kind dictionary) and only where it pays (DIGEST_MIN_BYTES: smaller traces analyse in seconds
without one).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

import kvscope
from kvscope.trace_format import _body_length, _field, _unpack, batch_problem, format_version, read_meta

DIGEST_KEY = b"kvscope.digest"  # custom metadata of the digest's (empty) record batch: the JSON above
DIGEST_VERSION = 1
# record_run writes a digest into traces of at least this size. Writing one reads the closed trace back and analyses
# it (3.4 CPU s for the 19 MB, 10,000-request benchmark run, 10 s for the 92 MB, 50,000-request one), which pays only
# where analysing from the events is slow: a 19 MB trace's report takes about 2 s without a digest.
DIGEST_MIN_BYTES = 48 << 20
FIRST_DIGEST_FORMAT = 3  # the format version from which a trace may end with a digest
NO_DIGEST_ENV = "KVSCOPE_NO_DIGEST"  # set (to anything but '' or '0'): digests are neither read nor written

_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_CONTINUATION = 0xFFFFFFFF
_SCHEMA, _DICTIONARY, _RECORD_BATCH = 1, 2, 3
_CHUNK = 8 << 20

# What the digest's results depend on: their sources. A change to any of them and older digests are ignored.
_SOURCES = (
    "analysis",
    "event_store.py",
    "events.py",
    "trace.py",
    "trace_format.py",
    "digest.py",
    "digest_write.py",
    "alloc/registry.py",
    "present/views.py",
)


def disabled() -> bool:
    return os.environ.get(NO_DIGEST_ENV, "") not in ("", "0")


@lru_cache(maxsize=1)
def fingerprint() -> str:
    """kvscope's version and a CRC-32 over the analysis sources (path and text of each, sorted by path)."""
    root = Path(kvscope.__file__).resolve().parent
    crc = 0
    for name in _SOURCES:
        where = root / name
        files = sorted(where.rglob("*.py")) if where.is_dir() else [where]
        for f in files:
            try:
                data = f.read_bytes()
            except OSError:
                continue
            crc = zlib.crc32(f.relative_to(root).as_posix().encode() + b"\0", crc)
            crc = zlib.crc32(data, crc)
    return f"{kvscope.__version__}:{crc:08x}"


# ---- the stream's framing ---------------------------------------------------------------------------------------
def _messages(path: Path, size: int) -> list[tuple[int, int, int]] | None:
    """(start, length, header type) of every message before the end-of-stream marker, found by hopping from header
    to header (bodies are skipped, never read); None when the file is not a complete stream of well-formed
    messages ending with the marker at the very end."""
    out: list[tuple[int, int, int]] = []
    with open(path, "rb") as f:
        f.seek(size - len(_EOS))
        if f.read(len(_EOS)) != _EOS:
            return None
        pos = 0
        while pos < size - len(_EOS):
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                return None
            marker, length = struct.unpack("<Ii", head)
            if marker != _CONTINUATION or length <= 0 or length % 8:
                return None
            header = f.read(length)
            body = _body_length(header) if len(header) == length else None
            if body is None or body < 0 or body % 8:
                return None
            try:
                message = _unpack("<I", header, 0)
                where = _field(header, message, 1)
                kind = _unpack("<B", header, where) if where is not None else 0
            except struct.error:
                return None
            out.append((pos, 8 + length + body, kind))
            pos += 8 + length + body
    return out if pos == size - len(_EOS) else None


def _read(path: Path, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


def crc_prefix(path: Path, end: int) -> int:
    """zlib.crc32 of the file's bytes [0, end)."""
    crc = 0
    with open(path, "rb") as f:
        left = end
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return crc


def _frame(text: str) -> pd.DataFrame:
    return pa.ipc.open_stream(pa.py_buffer(base64.b64decode(text))).read_all().to_pandas()


# ---- reading ----------------------------------------------------------------------------------------------------
class Digest:
    """A verified digest: the trace's run metadata (checked as load_trace checks it), the results, and the file's
    stamp when read."""

    def __init__(self, meta: dict[str, Any], payload: dict[str, Any], stamp: tuple[int, int]) -> None:
        self.meta = meta
        self.payload = payload
        self.stamp = stamp  # (st_mtime_ns, st_size) of the file it was read from

    @property
    def events(self) -> int:
        return int(self.payload["events"])

    @property
    def kind_counts(self) -> list[tuple[str, int]]:
        return [(str(name), int(n)) for name, n in self.payload["kind_counts"]]

    def seed(self, cache: dict) -> None:
        """Put the results into a Trace's cache, under the keys kvscope.analysis keeps them by."""
        cache["analysis.summary"] = dict(self.payload["summary"])
        for key, value in self.payload.get("values", {}).items():
            cache[f"analysis.{key}"] = value
        for key, text in self.payload.get("frames", {}).items():
            cache[f"analysis.{key}"] = _frame(text)
        for entry in self.payload.get("steps", []):
            step = int(entry["step"])
            for key in ("block_states", "block_tables"):
                if key in entry:
                    cache.setdefault(f"analysis.at_step.{key}", {})[step] = _frame(entry[key])
        maps = cache.setdefault("analysis.fragmentation_maps", {})
        for m in self.payload.get("maps", []):
            units, steps = int(m["max_units"]), int(m["max_steps"])
            maps[("state_matrix", units, steps, None, None)] = _frame(m["state"])
            maps[("fill_matrix", units, steps, None, None)] = _frame(m["fill"])


def read_digest(path: str | os.PathLike) -> Digest | None:
    """The digest of a trace file when it has a valid one (complete stream, checksums, fingerprint); else None.
    Never raises for a bad file: whatever is wrong, the caller reads the trace the ordinary way and reports it."""
    if disabled():
        return None
    path = Path(path)
    try:
        return _read_digest(path)
    except (OSError, ValueError, KeyError, TypeError, struct.error, pa.ArrowException):
        return None


def _last_digest(path: Path, messages: list[tuple[int, int, int]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(run metadata, JSON payload) of the stream's last message when that is a digest batch with a valid
    checksum."""
    if not messages or messages[0][2] != _SCHEMA or messages[-1][2] != _RECORD_BATCH:
        return None
    dictionaries = [m for m in messages if m[2] == _DICTIONARY]
    if len(dictionaries) != 1:
        return None
    last = messages[-1]
    parts = [_read(path, *messages[0][:2]), _read(path, *dictionaries[0][:2]), _read(path, *last[:2]), _EOS]
    reader = pa.ipc.open_stream(pa.py_buffer(b"".join(parts)))
    version = format_version(reader.schema, path)
    if version < FIRST_DIGEST_FORMAT:
        return None
    meta = read_meta(reader.schema, path)  # (raises TraceError, a ValueError, for bad metadata: then no digest)
    batch, custom = reader.read_next_batch_with_custom_metadata()
    if batch.num_rows or custom is None or DIGEST_KEY not in custom or batch_problem(batch, custom, version):
        return None
    payload = json.loads(custom[DIGEST_KEY])
    return (meta, payload) if isinstance(payload, dict) else None


def _read_digest(path: Path) -> Digest | None:
    st = path.stat()
    size = st.st_size
    messages = _messages(path, size)
    found = _last_digest(path, messages) if messages else None
    if found is None or not messages:
        return None
    meta, payload = found
    last = messages[-1]
    ok = (
        payload.get("digest_version") == DIGEST_VERSION
        and payload.get("fingerprint") == fingerprint()
        and payload.get("stream_bytes") == last[0]
        and isinstance(payload.get("summary"), dict)
        and isinstance(payload.get("kind_counts"), list)
    )
    if not ok or crc_prefix(path, last[0]) != payload.get("stream_crc32"):
        return None
    return Digest(meta, payload, (st.st_mtime_ns, size))
