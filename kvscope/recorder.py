"""Buffered, low-overhead event sink that writes the trace incrementally.

`emit` appends one row of ten integers to a flat int64 buffer (a few hundred nanoseconds); every `flush_events`
events, or at a step end once `flush_seconds` have passed, the buffer becomes one Arrow record batch appended to an
Arrow IPC stream, with its checksum (kvscope.events.batch_crc32) in the batch message's custom metadata. A run
killed at any point therefore leaves every batch written before it readable (see `kvscope.trace`). Two batched
paths write the rows that many emits would, in the same order, with one clock read a call: `emit_rows` (rows of
one instant or one operation: a step's samples, a release's frees, packed in one struct call) and `emit_appends`
(a decode step's APPEND rows and the BLOCK_ALLOCs of its block crossings, kept as columns and put in place when
the batch is built).

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

# This module is longer than 400 lines: the one-event path, the two batched paths and the batch they all end in
# share one buffer, one lock and one all-or-nothing contract, and the batch builder must know every path's layout.

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


_PACKERS: dict[int, Any] = {}


def _values_packer(n: int) -> Any:
    """struct's pack of n int64 values: one C call converts and checks them all (about twice as fast as
    array.fromlist)."""
    pack = _PACKERS.get(n)
    if pack is None:
        pack = struct.Struct(f"={n}q").pack
        if len(_PACKERS) < 2048:
            _PACKERS[n] = pack
    return pack


def _packer(rows: int) -> Any:
    """struct's pack of `rows` rows (emit_rows)."""
    return _values_packer(_ROW * rows)


def _fits(values: list[Any]) -> bool:
    try:
        _pack_row(*values)
    except struct.error:
        return False
    return True


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
        # emit_appends' rows until the batch is built: (rows of _buf before, count, t_ns, step, where its seq, aux
        # and BLOCK_ALLOC values start, BLOCK_ALLOC count)
        self._runs: list[tuple[int, ...]] = []
        self._run_seqs, self._run_held = array("q"), array("q")
        self._run_allocs = array("q")  # emit_appends' BLOCK_ALLOC rows, 4 values each
        self._gathered = 0  # rows emit_appends holds (APPEND and BLOCK_ALLOC)
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

    def emit_rows(self, rows: list[int]) -> None:
        """Rows of all ten columns (kvscope.events.COLUMNS order), ten values a row, written in order with one clock
        read: each row's t_ns and step are the recorder's (the list's values there are overwritten; pass 0). For
        samples of one instant (a step's accounting) and runs of one operation's events (a release's BLOCK_FREEs).
        All or nothing, like emit."""
        m, rest = divmod(len(rows), _ROW)
        if rest:
            raise ValueError(f"emit_rows: {len(rows)} values are not rows of {_ROW}")
        if not m:
            return
        kinds = rows[2::_ROW]
        if min(kinds) < 0 or max(kinds) >= _KIND_LIMIT:
            raise ValueError(f"unknown event kind in {kinds!r}")
        pack = _packer(m)
        with self._lock:
            rows[0::_ROW] = [time.perf_counter_ns() - self._t0] * m
            rows[1::_ROW] = [self._step] * m
            try:  # struct checks every value before it writes any: all rows or none
                data = pack(*rows)
            except struct.error:
                bad = next(r for r in range(m) if not _fits(rows[_ROW * r : _ROW * (r + 1)]))
                raise _bad_row(*rows[_ROW * bad + 1 : _ROW * (bad + 1)], t_ns=rows[_ROW * bad]) from None
            buf = self._buf
            buf.frombytes(data)
            full = len(buf) + _ROW * self._gathered >= self._flush_len
        if full:
            self.flush()

    def emit_appends(self, seqs: list[int], held: list[int], allocs: list[int] | None = None) -> None:
        """The rows `emit(Kind.APPEND, seq=seqs[i], n=1, aux=held[i])` would write for each i, in order, with one
        clock read: kept as columns and a marker of their place, put there when the batch is built (_columns), so
        that a step's decode appends, most of a trace's events, cost no emit each. `allocs`, four values a row
        (i, block, addr, bytes): the row `emit(Kind.BLOCK_ALLOC, seq=seqs[i], block=block, addr=addr, bytes=bytes)`
        goes right before APPEND i (a decode append that takes a new block), i increasing. All or nothing, like
        emit."""
        k = len(seqs)
        if not k:
            return
        if k != len(held):
            raise ValueError(f"emit_appends: {k} sequences but {len(held)} token counts")
        m = 0
        if allocs:
            m, rest = divmod(len(allocs), 4)
            at = allocs[::4]
            if rest or at[0] < 0 or at[-1] >= k or any(x >= y for x, y in zip(at, at[1:], strict=False)):
                raise ValueError("emit_appends: allocs must be (i, block, addr, bytes) rows with 0 <= i < len(seqs), "
                                 "i increasing")  # fmt: skip
        with self._lock:
            buf = self._buf
            s0, h0, a0 = len(self._run_seqs), len(self._run_held), len(self._run_allocs)
            try:  # struct converts and checks every value of a column before any is added
                pack = _values_packer(k)
                self._run_seqs.frombytes(pack(*seqs))
                self._run_held.frombytes(pack(*held))
                if allocs:
                    self._run_allocs.frombytes(_values_packer(4 * m)(*allocs))
            except (struct.error, TypeError) as e:
                # values a refused call did add are named by no marker, so never read (as a Ctrl-C's would be)
                raise OverflowError(f"an APPEND or BLOCK_ALLOC value is not an int64: {e}") from None
            # the marker last, naming where its values start: values of a call a Ctrl-C cut short are never read
            self._runs.append((len(buf) // _ROW, k, time.perf_counter_ns() - self._t0, self._step, s0, h0, a0, m))
            self._gathered += k + m
            full = len(buf) + _ROW * self._gathered >= self._flush_len
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
                allocs, self._run_allocs = self._run_allocs, array("q")
                self._gathered = 0
            if not buf and not runs:
                return
            batch = self._to_batch(self._columns(buf, runs, seqs, held, allocs))
            if self._writer is not None:
                self._write_to_file(batch)
            else:
                self._batches.append(batch)
            self.events_written += batch.num_rows
            self._last_flush = time.monotonic()

    @staticmethod
    def _columns(buf: array, runs: list[tuple[int, ...]], seqs: array, held: array, allocs: array) -> list[np.ndarray]:
        """One array per column (schema dtypes), rows in emitted order: emit's, and emit_appends' runs in place
        (each run's BLOCK_ALLOC rows before the APPEND they name)."""
        rows = np.frombuffer(buf, dtype=np.int64).reshape(-1, _ROW)
        if not runs:
            return [rows[:, i].astype(_DTYPES[name]) for i, name in enumerate(COLUMNS)]
        marks = np.array(runs, np.int64).reshape(len(runs), 8)
        at, counts, t_ns, steps, s0, h0, a0, m = marks.T
        nruns = len(runs)
        total = int(counts.sum())
        first = np.cumsum(counts) - counts  # each run's first APPEND among all of them
        seq_all, held_all = np.frombuffer(seqs, np.int64), np.frombuffer(held, np.int64)
        seq_v, held_v = seq_all, held_all
        if not (len(seq_all) == len(held_all) == total and np.array_equal(s0, first) and np.array_equal(h0, first)):
            # values of calls a Ctrl-C cut short (or refused) sit between runs' values: the markers skip them
            run_of = np.repeat(np.arange(nruns), counts)
            within = np.arange(total) - first[run_of]
            seq_v, held_v = seq_all[s0[run_of] + within], held_all[h0[run_of] + within]
        nalloc = int(m.sum())
        sizes = counts + m  # rows of each run: its APPENDs and its BLOCK_ALLOCs
        gathered = int(sizes.sum())
        n_all = len(rows) + gathered
        # Where the rows go: emit rows before the first run, the run's rows, emit rows up to the next run, ...
        lengths = np.empty(2 * nruns + 1, dtype=np.int64)
        lengths[0:-1:2] = np.diff(at, prepend=0)
        lengths[1::2] = sizes
        lengths[-1] = len(rows) - at[-1]
        is_run = np.repeat(np.resize(np.array([False, True]), 2 * nruns + 1), lengths)
        run_pos = np.flatnonzero(is_run)  # the runs' rows, in their order
        emit_pos = np.flatnonzero(~is_run)
        if nalloc:
            alloc_run = np.repeat(np.arange(nruns), m)
            base = a0[alloc_run] + 4 * (np.arange(nalloc) - (np.cumsum(m) - m)[alloc_run])
            table = np.frombuffer(allocs, np.int64)
            # each BLOCK_ALLOC among the runs' rows: right before the APPEND (over all runs) it names
            at_alloc = first[alloc_run] + table[base] + np.arange(nalloc)
            is_app = np.ones(gathered, dtype=bool)
            is_app[at_alloc] = False
            app_pos, alloc_pos = run_pos[is_app], run_pos[at_alloc]
            alloc_values = {
                "kind": int(Kind.BLOCK_ALLOC),
                "seq": seq_v[at_alloc - np.arange(nalloc)],
                "block": table[base + 1],
                "n": 0,
                "bytes": table[base + 3],
                "addr": table[base + 2],
                "aux": -1,
            }
        else:
            app_pos, alloc_pos, alloc_values = run_pos, run_pos[:0], {}
        # each column: its value in the APPEND rows (a scalar when constant), then BLOCK_ALLOC's, then emit's rows
        append_values: dict[str, Any] = {
            "kind": int(Kind.APPEND),
            "seq": seq_v,
            "block": -1,
            "n": 1,
            "bytes": 0,
            "addr": -1,
            "aux": held_v,
            "dur_ns": 0,
        }
        columns = []
        for i, name in enumerate(COLUMNS):
            dtype = _DTYPES[name]
            if name in ("t_ns", "step"):  # one value a run
                out = np.empty(n_all, dtype=dtype)
                out[run_pos] = np.repeat(t_ns if name == "t_ns" else steps, sizes)
            else:
                value = append_values[name]
                if isinstance(value, int):
                    out = np.full(n_all, value, dtype=dtype)
                else:
                    out = np.empty(n_all, dtype=dtype)
                    out[app_pos] = value
                if name in alloc_values:
                    out[alloc_pos] = alloc_values[name]
            out[emit_pos] = rows[:, i]
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

    def emit_appends(self, seqs, held, allocs=None) -> None:
        pass

    def emit_rows(self, rows) -> None:
        pass
