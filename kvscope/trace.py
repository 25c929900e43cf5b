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

# This module is longer than 400 lines: loading tells a cut-off stream from a damaged one (the checks themselves are
# kvscope.trace_format's) and defers a digested trace's events; both belong to one load.

from __future__ import annotations

import os
import struct
import threading
import warnings
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
from kvscope.events import KIND_NAMES
from kvscope.trace_format import (  # the file's checks; TraceError and the checks are named here too
    _CONTINUATION,
    _MAX_HEADER,
    TraceError,
    _body_length,
    _fail,
    _first_line,
    batch_problem,
    format_version,
    meta_problem,
    read_meta,
)

__all__ = [
    "TRACE_SUFFIX",
    "DamagedTraceWarning",
    "Trace",
    "TraceError",
    "TruncatedTraceWarning",
    "batch_problem",
    "format_version",
    "load_trace",
    "meta_problem",
    "read_meta",
    "read_table",
    "table_to_frame",
    "trace_from_recorder",
]

TRACE_SUFFIX = ".kvtrace"


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
    from a DataFrame keeps that frame as its `events` and builds its store from it when the analysis asks. A trace
    file with a digest (kvscope.digest: whole-run results written when its run closed) loads as its metadata and
    those results only; its store is read, verified as any trace's, when an analysis first asks for it
    (`events_loaded` says whether that happened; `num_events`, `count_of` and `kind_counts` answer either way)."""

    # what the `events` and `store` properties below read and set (set first: __init__ assigns in this order)
    _events: pd.DataFrame | None = field(default=None, init=False, repr=False, compare=False)
    _store: EventStore | None = field(default=None, init=False, repr=False, compare=False)
    _deferred: DeferredStore | None = field(default=None, init=False, repr=False, compare=False)
    meta: dict[str, Any]  # (the fields __init__ does not take may come first)
    events: pd.DataFrame = field(default=None, repr=False)  # a property: see below
    path: Path | None = None
    truncated: bool = False  # the stream ended mid-batch or without the RUN_END event, or was salvaged
    _cache: dict = field(default_factory=dict, repr=False)
    store: EventStore = field(default=None, repr=False)  # type: ignore[assignment]  # a property: see below

    def __post_init__(self) -> None:
        if self._events is None and self._store is None and self._deferred is None:
            raise TypeError("Trace needs events (a DataFrame) or a store")

    @property
    def num_events(self) -> int:
        if self._store is None and self._events is None and self._deferred is not None:
            return self._deferred.events
        return len(self._store) if self._store is not None else len(self.events)

    def count_of(self, kinds: list[int]) -> int:
        """Events of these kinds (Kind values): from the digest's counts while the events are not read yet."""
        if not self.events_loaded and self._deferred is not None:
            wanted = {KIND_NAMES[k] for k in kinds if 0 <= k < len(KIND_NAMES)}
            return sum(n for name, n in self._deferred.kind_counts if name in wanted)
        return self.store.count(kinds)

    def kind_counts(self) -> list[tuple[str, int]]:
        """(kind name, events) for every name of the kind dictionary, in its order (EventStore.kind_counts)."""
        if not self.events_loaded and self._deferred is not None:
            return list(self._deferred.kind_counts)
        return self.store.kind_counts()

    @property
    def events_loaded(self) -> bool:
        """Whether the events are in memory (a trace with a digest reads them on first use: kvscope.digest)."""
        return self._store is not None or self._events is not None

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
        self._events = self.store.frame()  # (a deferred store is read first)
    return self._events


def _set_events(self: Trace, frame: pd.DataFrame | None) -> None:
    self._events = frame
    self._store = None


def _store(self: Trace) -> EventStore:
    """The events by kind (what the analysis reads)."""
    if self._store is None:
        if self._events is None and self._deferred is not None:
            self._store = self._deferred.get()
        else:
            assert self._events is not None
            self._store = EventStore.from_frame(self._events)
    return self._store


def _set_store(self: Trace, store: EventStore | DeferredStore | None) -> None:
    if isinstance(store, DeferredStore):
        self._deferred = store
    elif store is not None:
        self._store = store


class DeferredStore:
    """The events of a trace file with a digest, read on first use, once however many threads ask. Verified as
    load_trace verifies any trace, except that the stream's bytes are checked as a whole against the digest's
    stream_crc32 (one CRC-32 over the compressed bytes, several times less work) instead of batch by batch over
    the decompressed values. Refuses a file changed since its digest was read: its results would not be its own."""

    def __init__(self, path: Path, digest: Any) -> None:
        self.path = path
        self.events: int = digest.events
        self.kind_counts: list[tuple[str, int]] = digest.kind_counts
        self.stamp: tuple[int, int] = digest.stamp  # (st_mtime_ns, st_size) when the digest was read
        self.stream = (int(digest.payload["stream_bytes"]), int(digest.payload["stream_crc32"]))
        self._lock = threading.Lock()
        self._store: EventStore | None = None

    def __getstate__(self) -> dict[str, Any]:  # (picklable, as a Trace holding a store is: the lock stays behind)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def get(self) -> EventStore:
        with self._lock:
            if self._store is None:
                try:
                    st = self.path.stat()
                    changed = (st.st_mtime_ns, st.st_size) != self.stamp
                except OSError:
                    changed = True
                from kvscope.digest import crc_prefix

                if changed or crc_prefix(self.path, self.stream[0]) != self.stream[1]:
                    raise _fail(self.path, "changed on disk since it was loaded; load it again")
                stream = _load_stream(self.path, salvage=False, checksums=False)
                assert stream.store is not None
                if stream.cut or stream.store.kind_counts() != self.kind_counts:
                    raise _fail(self.path, "changed on disk since it was loaded; load it again")
                self._store = stream.store
            return self._store


# `events` and `store` are dataclass fields (Trace(meta, events=...) and dataclasses.replace keep working) read
# through properties, so that a loaded trace builds its DataFrame only when asked.
Trace.events = property(_events, _set_events)
Trace.store = property(_store, _set_store)  # type: ignore[assignment]


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
    checksums: bool = True,
) -> tuple[int, str | None, bool]:
    """Hands every verified batch to `keep`, in order, and returns (how many, what is wrong with the next one or
    None at a clean end, whether the stream is cut off there). Only a message pyarrow could not read can be a cut;
    one that decoded and then failed its checks was complete, so that is damage."""
    kept = 0
    ended = False  # the last batch kept ends with RUN_END: only a digest (kvscope.digest) may follow
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
            problem = batch_problem(batch, custom, version, checksum=checksums)
            if problem is None:
                keep(batch)
                kept += 1
                if batch.num_rows:
                    kind = batch.column("kind")
                    ended = kind.dictionary[kind.indices[-1].as_py()].as_py() == "run_end"
                continue
            return kept, problem, False
        # A digest's header holds its results (megabytes): a cut inside it is a cut, not damage
        return kept, problem, _runs_past_end(raw, pos, size, max_header=1 << 31 if ended else _MAX_HEADER)


def _read_stream(path: Path, *, salvage: bool, as_table: bool = False, checksums: bool = True) -> _Stream:
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
            kept, problem, cut = _read_batches(reader, f, raw, size, version, hand, checksums)
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


def _load_stream(path: Path, *, salvage: bool, as_table: bool = False, checksums: bool = True) -> _Stream:
    _check_file(path)
    try:
        return _read_stream(path, salvage=salvage, as_table=as_table, checksums=checksums)
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
    damaged file loads its verified batches before the damage instead, warning with DamagedTraceWarning.

    A file whose digest checks out (kvscope.digest.read_digest: the CRC-32 of every byte before it, kvscope's own
    analysis code) is complete and undamaged: it loads without reading its events (they are read on first use),
    and with the digest's results in its cache. Any other file is read batch by batch, as without digests."""
    path = Path(path)
    _check_file(path)
    from kvscope.digest import read_digest

    digest = read_digest(path)  # (verified: else None, and the file is read batch by batch as ever)
    if digest is not None:
        deferred = DeferredStore(path, digest)
        trace = Trace(meta=digest.meta, path=path, truncated=False, store=deferred)  # type: ignore[arg-type]
        digest.seed(trace._cache)
        return trace
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
