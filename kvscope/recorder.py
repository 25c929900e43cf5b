"""Buffered, low-overhead event sink that writes the trace incrementally.

`emit` appends one row of ten integers to a flat int64 buffer (a few hundred nanoseconds); every `flush_events`
events, or at a step end once `flush_seconds` have passed, the buffer becomes one Arrow record batch appended to an
Arrow IPC stream, with its checksum (kvscope.events.batch_crc32) in the batch message's custom metadata. A run
killed at any point therefore leaves every batch written before it readable (see `kvscope.trace`).

What it guarantees, and why it holds:
- One emit is all or nothing. The row is packed into 80 bytes first (struct checks every value, so a value that
  does not fit raises OverflowError, a non-integer TypeError, naming the column, before anything is appended), then
  appended with one `frombytes`. A Ctrl-C (KeyboardInterrupt) cannot land between two columns: Python delivers
  signals between bytecodes, and the append is one C call.
- Emitting from several threads is safe: the buffer is read, appended to, measured and swapped only under `_lock`,
  and flushes are serialized by `_write_lock`, so batches reach the file in the order their events were emitted.
- A flush writes whole batches: SIGINT is deferred (`defer_sigint`) from the moment the buffer is swapped out until
  its batch is written, so a Ctrl-C can neither drop the swapped-out events nor leave half a message in the file.

A Recorder with `path=None` keeps its batches in memory (`to_table()`), which is what tests and notebooks use.
`open(path, meta)` later turns it into a file recorder: the trace's metadata is written with its schema, before the
first event, but part of it (the allocator's own config) only exists once the allocator is built, and building the
allocator already emits events (VMM_RESERVE, PAGE_CREATE). So the engine records into memory first, then `open`
completes the metadata, creates the file and writes the staged batches first; the allocator keeps the same recorder.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
import zlib
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kvscope import __version__
from kvscope.events import (
    BATCH_CRC_KEY,
    COLUMNS,
    FORMAT_VERSION,
    KIND_NAMES,
    META_CRC_KEY,
    META_KEY,
    VERSION_KEY,
    Kind,
    arrow_schema,
    batch_crc32,
)

_KIND_DICTIONARY = pa.array(KIND_NAMES, pa.string())
_ROW = len(COLUMNS)  # values per event in the flat buffer (row-major: t_ns, step, kind, seq, ..., dur_ns)
_KIND_LIMIT = len(KIND_NAMES)  # kind codes are indexes into the dictionary
_STEP_MIN, _STEP_LIMIT = -1, 1 << 31  # `step` is stored as int32; -1 outside steps
_DTYPES = {name: np.int16 if name == "kind" else np.int32 if name == "step" else np.int64 for name in COLUMNS}
# One row as native int64 bytes. struct checks every value before it writes any, so a row is packed whole or not
# at all, and `frombytes` then appends it in one copy (about twice as fast as ten appends, or extend by a tuple).
_pack_row = struct.Struct(f"={_ROW}q").pack
_INT64_MIN, _INT64_LIMIT = -(1 << 63), 1 << 63


def _bad_row(step: int, *values: Any, t_ns: Any = 0) -> Exception:
    """The error for a row struct refused, naming the column (struct's own message does not)."""
    for name, value in zip(COLUMNS, (t_ns, step, *values), strict=True):
        if not isinstance(value, int) and not hasattr(value, "__index__"):
            return TypeError(f"event column {name!r} takes an integer, got {type(value).__name__} {value!r}")
        if not _INT64_MIN <= int(value) < _INT64_LIMIT:
            return OverflowError(f"event column {name!r}: {value!r} does not fit in int64")
    return ValueError(f"event row not representable: {(t_ns, step, *values)!r}")


@contextmanager
def defer_sigint() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) back until the block is done, then deliver it to the handler that was in place.

    Python runs signal handlers only in the main thread, between bytecodes; so elsewhere, or when SIGINT has no
    Python handler (ignored, or the default action that kills the process), this does nothing. Nests: an inner block
    hands a deferred signal to the outer block's handler, which defers it again."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    pending: list[Any] = []
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            previous(signal.SIGINT, pending[0])  # default_int_handler raises KeyboardInterrupt here


class Recorder:
    def __init__(
        self,
        path: str | os.PathLike | None = None,
        meta: dict[str, Any] | None = None,
        *,
        flush_events: int = 1 << 16,
        flush_seconds: float = 1.0,
        compression: str | None = "zstd",
    ) -> None:
        self.path: Path | None = None  # set by open()
        base = {"kvscope_version": __version__, "format_version": FORMAT_VERSION}
        self.meta: dict[str, Any] = base | dict(meta or {})
        self.flush_events = flush_events
        self.flush_seconds = flush_seconds
        self._step = -1  # the engine sets `step` at the start of every step
        self.events_written = 0
        self._t0 = time.perf_counter_ns()
        self._last_flush = time.monotonic()
        # One flat typed array of rows (8 bytes a value, no Python objects for the GC to walk; numpy reads it by
        # buffer). `_lock` guards it so that a background thread (the VMM mapper overlapping a GPU step) can emit;
        # uncontended it costs a few tens of nanoseconds. `_write_lock` keeps flushes in order.
        self._buf = array("q")
        # emit_appends' rows until the batch is built: (rows of _buf before, count, t_ns, step, seq and aux start)
        self._runs: list[tuple[int, ...]] = []
        self._run_seqs, self._run_held = array("q"), array("q")
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._batches: list[pa.RecordBatch] = []
        self._closed = False
        self._compression = compression
        self.schema = self._schema_with_meta()
        self._sink: pa.OSFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        if path is not None:
            self.open(path)

    @property
    def step(self) -> int:
        """The engine step events are stamped with (-1 outside steps)."""
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        # Checked here, once per step, rather than in every emit: an out-of-range step would only fail at the
        # next flush, taking the whole buffer with it.
        if not _STEP_MIN <= value < _STEP_LIMIT:
            raise ValueError(f"step {value!r} is outside the trace's int32 range ({_STEP_MIN} .. {_STEP_LIMIT - 1})")
        self._step = value

    @property
    def flush_events(self) -> int:
        return self._flush_events

    @flush_events.setter
    def flush_events(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"flush_events must be at least 1, got {value}")
        self._flush_events = value
        self._flush_len = value * _ROW  # buffer length (in values) at which the batch is full

    # ---- metadata and file ------------------------------------------------------------------------------------
    def _schema_with_meta(self) -> pa.Schema:
        meta = json.dumps(self.meta, default=str).encode()
        return arrow_schema(
            {
                META_KEY: meta,
                VERSION_KEY: str(FORMAT_VERSION).encode(),
                META_CRC_KEY: str(zlib.crc32(meta)).encode(),
            }
        )

    def update_meta(self, meta: dict[str, Any]) -> None:
        """Add to the metadata while it is not written yet (no file open): batches recorded so far take it too."""
        if self._writer is not None:
            raise RuntimeError(f"metadata is already written to {self.path}")
        self.meta.update(meta)
        self.schema = self._schema_with_meta()
        self._batches = [batch.replace_schema_metadata(self.schema.metadata) for batch in self._batches]

    def open(self, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
        """Add `meta`, create the file and write every batch recorded in memory so far into it, then the events
        still buffered; from here on batches go to the file."""
        if self._writer is not None:
            raise RuntimeError(f"recorder already writes to {self.path}")
        if self._closed:
            raise RuntimeError("recorder is closed")
        if meta:
            self.update_meta(meta)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._write_lock, defer_sigint():
            self._sink = pa.OSFile(str(self.path), "wb")
            options = pa.ipc.IpcWriteOptions(compression=self._compression)
            self._writer = pa.ipc.new_stream(self._sink, self.schema, options=options)
            staged, self._batches = self._batches, []
            for batch in staged:  # in order: staged batches first, then the events still in the buffer
                self._write_to_file(batch)
        self.flush()

    # ---- hot path ------------------------------------------------------------------------------------------
    def emit(
        self,
        kind: Kind | int,
        seq: int = -1,
        block: int = -1,
        n: int = 0,
        bytes: int = 0,  # noqa: A002 - the column is called bytes
        addr: int = -1,
        aux: int = -1,
        dur_ns: int = 0,
    ) -> None:
        if not 0 <= kind < _KIND_LIMIT:  # an unknown code would only fail at the flush, with the whole batch
            raise ValueError(f"unknown event kind {kind!r}")
        with self._lock:
            try:
                row = _pack_row(
                    time.perf_counter_ns() - self._t0, self._step, kind, seq, block, n, bytes, addr, aux, dur_ns
                )
            except struct.error:
                raise _bad_row(self._step, kind, seq, block, n, bytes, addr, aux, dur_ns) from None
            buf = self._buf
            buf.frombytes(row)
            full = len(buf) >= self._flush_len
        if full:
            self.flush()

    def emit_at(
        self,
        t_ns: int,
        kind: Kind | int,
        *,
        seq: int = -1,
        block: int = -1,
        n: int = 0,
        bytes: int = 0,  # noqa: A002 - the column is called bytes
        addr: int = -1,
        aux: int = -1,
        dur_ns: int = 0,
    ) -> None:
        """Emit with an explicit `t_ns` (on this recorder's clock, see now_ns): for samples taken on another thread
        and emitted later (NVML), so they keep the time they were taken. It repeats emit's body rather than emit
        calling it: emit is the hot path (one call per event) and reads the clock inside the lock."""
        if not 0 <= kind < _KIND_LIMIT:
            raise ValueError(f"unknown event kind {kind!r}")
        with self._lock:
            try:
                row = _pack_row(t_ns, self._step, kind, seq, block, n, bytes, addr, aux, dur_ns)
            except struct.error:
                raise _bad_row(self._step, kind, seq, block, n, bytes, addr, aux, dur_ns, t_ns=t_ns) from None
            buf = self._buf
            buf.frombytes(row)
            full = len(buf) >= self._flush_len
        if full:
            self.flush()

    def emit_appends(self, seqs: list[int], held: list[int]) -> None:
        """The rows `emit(Kind.APPEND, seq=seqs[i], n=1, aux=held[i])` would write for each i, in order, with one
        clock read: kept as two columns and a marker of their place, put there when the batch is built (_columns),
        so that a step's decode appends, most of a trace's events, cost no emit each. All or nothing, like emit."""
        k = len(seqs)
        if not k:
            return
        if k != len(held):
            raise ValueError(f"emit_appends: {k} sequences but {len(held)} token counts")
        try:  # converted whole before anything is kept: a value that does not fit leaves nothing behind
            seq_col, held_col = array("q", seqs), array("q", held)
        except (OverflowError, TypeError) as e:
            raise OverflowError(f"event column 'seq' or 'aux' of an APPEND does not fit in int64: {e}") from None
        with self._lock:
            buf = self._buf
            # the marker last, naming where its values start: values of a call a Ctrl-C cut short are never read
            s0, h0 = len(self._run_seqs), len(self._run_held)
            self._run_seqs += seq_col
            self._run_held += held_col
            self._runs.append((len(buf) // _ROW, k, time.perf_counter_ns() - self._t0, self._step, s0, h0))
            full = len(buf) + _ROW * len(self._run_seqs) >= self._flush_len
        if full:
            self.flush()

    def now_ns(self) -> int:
        """Nanoseconds since the run started, on the clock `t_ns` uses."""
        return time.perf_counter_ns() - self._t0

    def end_step(self) -> None:
        """Called by the engine after each step: flushes when the buffer is old enough, so a killed run loses
        at most `flush_seconds` of steps."""
        if (len(self._buf) or self._runs) and time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    # ---- batches --------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Turn the buffered events into one record batch: written to the file, or kept in memory before open()."""
        with self._write_lock, defer_sigint():
            with self._lock:
                buf, self._buf = self._buf, array("q")
                runs, self._runs = self._runs, []
                seqs, self._run_seqs = self._run_seqs, array("q")
                held, self._run_held = self._run_held, array("q")
            if not buf and not runs:
                return
            batch = self._to_batch(self._columns(buf, runs, seqs, held))
            if self._writer is not None:
                self._write_to_file(batch)
            else:
                self._batches.append(batch)
            self.events_written += batch.num_rows
            self._last_flush = time.monotonic()

    @staticmethod
    def _columns(buf: array, runs: list[tuple[int, ...]], seqs: array, held: array) -> list[np.ndarray]:
        """One array per column (schema dtypes), rows in emitted order: emit's, and emit_appends' runs in place."""
        rows = np.frombuffer(buf, dtype=np.int64).reshape(-1, _ROW)
        at, counts, t_ns, steps, s0, h0 = np.array(runs, np.int64).reshape(-1, 6).T
        total = int(counts.sum())
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)  # each value's place in its run
        is_append = np.zeros(len(rows) + total, dtype=bool)
        is_append[np.repeat(at, counts) + np.arange(total)] = True  # emit rows + APPEND rows before each
        appended: dict[str, np.ndarray | int] = {"kind": int(Kind.APPEND), "block": -1, "n": 1, "bytes": 0, "addr": -1}
        appended |= {"dur_ns": 0, "t_ns": np.repeat(t_ns, counts), "step": np.repeat(steps, counts)}
        appended["seq"] = np.frombuffer(seqs, np.int64)[np.repeat(s0, counts) + within]
        appended["aux"] = np.frombuffer(held, np.int64)[np.repeat(h0, counts) + within]
        columns, others = [], ~is_append
        for i, name in enumerate(COLUMNS):
            out = np.empty(len(is_append), dtype=_DTYPES[name])
            out[is_append] = appended[name]
            out[others] = rows[:, i]
            columns.append(out)
        return columns

    def _to_batch(self, columns: list[np.ndarray]) -> pa.RecordBatch:
        # Every value was range-checked on the way in (int64 by the array, kind and step by emit / the setter),
        # so nothing here can fail on the data and lose the swapped-out buffer.
        arrays = [
            pa.DictionaryArray.from_arrays(values, _KIND_DICTIONARY) if name == "kind" else pa.array(values)
            for name, values in zip(COLUMNS, columns, strict=True)
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)

    def _write_to_file(self, batch: pa.RecordBatch) -> None:
        if self._closed:
            raise RuntimeError(f"recorder for {self.path} is closed")
        crc = {BATCH_CRC_KEY: str(batch_crc32(batch)).encode()}
        assert self._writer is not None and self._sink is not None  # only called once open() made them
        self._writer.write_batch(batch, custom_metadata=crc)
        self._sink.flush()

    def close(self, steps: int | None = None) -> None:
        """Write RUN_END and close the file. Safe to call twice."""
        if self._closed:
            return
        self.emit(Kind.RUN_END, n=steps if steps is not None else max(self.step + 1, 0))
        self._finish()

    def abort(self) -> None:
        """Flush every event recorded so far and close without RUN_END (the trace then reads as cut off)."""
        if self._closed:
            return
        self._finish()

    def _finish(self) -> None:
        # Deferred as a whole: a second Ctrl-C while an interrupted run closes its file must not cut it short.
        with defer_sigint():
            self.flush()
            with self._write_lock:
                self._closed = True
                if self._writer is not None and self._sink is not None:
                    self._writer.close()
                    self._sink.close()

    def to_table(self) -> pa.Table:
        """The events recorded so far (in-memory recorders, or after flush for file recorders' pending batches)."""
        self.flush()
        return pa.Table.from_batches(self._batches, schema=self.schema)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class NullRecorder(Recorder):
    """Discards everything: for allocators used without tracing (and to measure the recorder's own overhead)."""

    def __init__(self) -> None:
        super().__init__(None)

    def emit(self, kind, seq=-1, block=-1, n=0, bytes=0, addr=-1, aux=-1, dur_ns=0) -> None:  # noqa: A002
        pass

    def emit_at(self, t_ns, kind, **columns) -> None:
        pass

    def emit_appends(self, seqs, held) -> None:
        pass
