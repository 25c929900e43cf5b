"""A file of vLLM KV events (msgpack payloads or JSON lines) -> a kvscope trace.

Every message is decoded and checked before the trace is created, so a damaged or foreign file is one line naming
the file and the message and leaves no output behind; with `salvage`, the complete messages before the damage are
imported instead (the trace says so in meta["kv_events"]["salvaged"]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvscope.importers.kv_trace import KVTraceWriter, trace_meta
from kvscope.importers.vllm_events import EventFormatError, FileMessage, read_messages
from kvscope.recorder import Recorder


@dataclass(frozen=True)
class ImportResult:
    messages: int
    events: int
    nodes: int  # distinct (group, hash) pairs
    damage: str | None  # the error met, when salvage kept the messages before it


def import_vllm_events(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    form: str | None = None,
    keep_tokens: bool = False,
    salvage: bool = False,
    command: str | None = None,
) -> ImportResult:
    """Write the trace of the KV events in `path` to `out`; EventFormatError (a ValueError, one line) for a bad file."""
    messages: list[FileMessage] = []
    damage = None
    try:
        for message in read_messages(path, form):
            messages.append(message)
    except EventFormatError as e:
        if not salvage or not messages:
            raise
        damage = str(e)
    first = messages[0]
    head = Path(path).read_bytes()[:64]
    meta = trace_meta(
        input=os.fspath(path),
        form=form or _form(head),
        ts_origin_s=first.batch.ts,
        keep_tokens=keep_tokens,
        command=command,
    )
    if damage is not None:
        meta["kv_events"]["salvaged"] = f"imported the {len(messages)} messages before: {damage}"
    rec = Recorder(out, meta)
    try:
        writer = KVTraceWriter(rec, first.batch.ts, keep_tokens=keep_tokens)
        for message in messages:
            writer.write(message.batch, message.index, f"{path}: message {message.index}")
    except BaseException:
        rec.abort()  # every message before the failing one stays readable
        raise
    writer.close()
    return ImportResult(len(messages), writer.state.events, len(writer.state.nodes), damage)


def _form(head: bytes) -> str:
    return "jsonl" if head.lstrip()[:1] in (b"[", b"{") else "msgpack"
