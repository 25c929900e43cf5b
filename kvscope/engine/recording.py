"""A Recorder whose file is opened after construction.

The trace's metadata is written with its schema, before the first event, but part of it (the allocator's own
config: number of blocks, pages, rows) only exists once the allocator is built, and building the allocator already
emits events (VMM_RESERVE, PAGE_CREATE). StagedRecorder keeps events in memory until `open(path, meta)` completes
the metadata and starts the file, then writes what was staged first; the allocator keeps the same recorder object.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from kvscope.events import FORMAT_VERSION, META_KEY, VERSION_KEY, arrow_schema
from kvscope.recorder import Recorder


class StagedRecorder(Recorder):
    def __init__(self, meta: dict[str, Any] | None = None, *, compression: str | None = "zstd", **kwargs: Any) -> None:
        super().__init__(None, meta, compression=compression, **kwargs)
        self._compression = compression

    def open(self, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
        """Add `meta`, create the file and write every event staged so far into it."""
        if self.path is not None:
            raise RuntimeError(f"recorder already writes to {self.path}")
        if meta:
            self.meta.update(meta)
        self.schema = arrow_schema(
            {META_KEY: json.dumps(self.meta, default=str).encode(), VERSION_KEY: str(FORMAT_VERSION).encode()}
        )
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self.path), "wb")
        options = pa.ipc.IpcWriteOptions(compression=self._compression)
        self._writer = pa.ipc.new_stream(self._sink, self.schema, options=options)
        staged, self._batches = self._batches, []
        for batch in staged:  # in order: staged batches first, then the events still in the buffer
            self._writer.write_batch(pa.RecordBatch.from_arrays(batch.columns, schema=self.schema))
        self.flush()
        self._sink.flush()

    def update_meta(self, meta: dict[str, Any]) -> None:
        """Complete the metadata of an in-memory recorder (no file)."""
        if self.path is not None:
            raise RuntimeError("metadata is already written to the file")
        self.meta.update(meta)
        self.schema = arrow_schema(
            {META_KEY: json.dumps(self.meta, default=str).encode(), VERSION_KEY: str(FORMAT_VERSION).encode()}
        )
        self._batches = [pa.RecordBatch.from_arrays(b.columns, schema=self.schema) for b in self._batches]
