"""Buffered, low-overhead event sink that writes the trace incrementally.

`emit` appends nine integers to Python lists (about a microsecond); every `flush_events` events, or at a step end
once `flush_seconds` have passed, the buffer becomes one Arrow record batch appended to an Arrow IPC stream. A run
killed at any point therefore leaves every batch written before it readable (see `kvscope.trace`).

A Recorder with `path=None` keeps its batches in memory (`to_table()`), which is what tests and notebooks use.
`open(path, meta)` later turns it into a file recorder: the trace's metadata is written with its schema, before the
first event, but part of it (the allocator's own config) only exists once the allocator is built, and building the
allocator already emits events (VMM_RESERVE, PAGE_CREATE). So the engine records into memory first, then `open`
completes the metadata, creates the file and writes the staged batches first; the allocator keeps the same recorder.
"""

from __future__ import annotations

import json
import os
import threading
import time
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kvscope import __version__
from kvscope.events import COLUMNS, FORMAT_VERSION, KIND_NAMES, META_KEY, VERSION_KEY, Kind, arrow_schema

_KIND_DICTIONARY = pa.array(KIND_NAMES, pa.string())


def _new_columns() -> list[array]:
    return [array("q") for _ in COLUMNS]


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
        self.step = -1  # the engine sets this at the start of every step
        self.events_written = 0
        self._t0 = time.perf_counter_ns()
        self._last_flush = time.monotonic()
        # Ten typed arrays (8 bytes a value, no Python objects for the GC to walk; pyarrow reads them by buffer).
        # The lock lets a background thread (the VMM mapper overlapping a GPU step) emit safely; uncontended it
        # costs a few tens of nanoseconds.
        self._cols = _new_columns()
        self._lock = threading.Lock()
        self._batches: list[pa.RecordBatch] = []
        self._closed = False
        self._compression = compression
        self.schema = self._schema_with_meta()
        self._sink: pa.OSFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        if path is not None:
            self.open(path)

    # ---- metadata and file ------------------------------------------------------------------------------------
    def _schema_with_meta(self) -> pa.Schema:
        return arrow_schema(
            {META_KEY: json.dumps(self.meta, default=str).encode(), VERSION_KEY: str(FORMAT_VERSION).encode()}
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
        self._sink = pa.OSFile(str(self.path), "wb")
        options = pa.ipc.IpcWriteOptions(compression=self._compression)
        self._writer = pa.ipc.new_stream(self._sink, self.schema, options=options)
        staged, self._batches = self._batches, []
        for batch in staged:  # in order: staged batches first, then the events still in the buffer
            self._writer.write_batch(batch)
        self.flush()
        self._sink.flush()

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
        c = self._cols
        with self._lock:
            c[0].append(time.perf_counter_ns() - self._t0)
            c[1].append(self.step)
            c[2].append(kind)
            c[3].append(seq)
            c[4].append(block)
            c[5].append(n)
            c[6].append(bytes)
            c[7].append(addr)
            c[8].append(aux)
            c[9].append(dur_ns)
        if len(c[0]) >= self.flush_events:
            self.flush()

    def emit_at(self, t_ns: int, kind: Kind | int, **columns: int) -> None:
        """Emit with an explicit `t_ns` (on this recorder's clock, see now_ns): for samples taken on another thread
        and emitted later (NVML), so they keep the time they were taken."""
        c = self._cols
        get = columns.get
        with self._lock:
            c[0].append(t_ns)
            c[1].append(self.step)
            c[2].append(kind)
            c[3].append(get("seq", -1))
            c[4].append(get("block", -1))
            c[5].append(get("n", 0))
            c[6].append(get("bytes", 0))
            c[7].append(get("addr", -1))
            c[8].append(get("aux", -1))
            c[9].append(get("dur_ns", 0))

    def now_ns(self) -> int:
        """Nanoseconds since the run started, on the clock `t_ns` uses."""
        return time.perf_counter_ns() - self._t0

    def end_step(self) -> None:
        """Called by the engine after each step: flushes when the buffer is old enough, so a killed run loses
        at most `flush_seconds` of steps."""
        if self._cols[0] and time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    # ---- batches --------------------------------------------------------------------------------------------
    def flush(self) -> None:
        with self._lock:
            cols, self._cols = self._cols, _new_columns()
        if not cols[0]:
            return
        arrays = []
        for name, values in zip(COLUMNS, cols, strict=True):
            values = np.frombuffer(values, dtype=np.int64)
            if name == "kind":
                arrays.append(pa.DictionaryArray.from_arrays(values.astype(np.int16), _KIND_DICTIONARY))
            else:
                arrays.append(pa.array(values, self.schema.field(name).type))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        self.events_written += batch.num_rows
        self._last_flush = time.monotonic()
        if self._writer is not None:
            self._writer.write_batch(batch)
            self._sink.flush()
        else:
            self._batches.append(batch)

    def close(self, steps: int | None = None) -> None:
        """Write RUN_END and close the file. Safe to call twice."""
        if self._closed:
            return
        self.emit(Kind.RUN_END, n=steps if steps is not None else max(self.step + 1, 0))
        self.flush()
        self._closed = True
        if self._writer is not None:
            self._writer.close()
            self._sink.close()

    def abort(self) -> None:
        """Flush what was recorded and close without RUN_END (the trace then reads as cut off)."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._writer is not None:
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
