"""Decoded KV-event batches -> rows of a kvscope trace (the KV_* kinds of kvscope.events), through a Recorder.

One writer serves the file importer and the live listener: batches are written in the order given, each one all
or nothing (its rows are built and checked first, then emitted with Ctrl-C held back), so a trace cut at any point
holds whole messages only. What KV events cannot tell is written into the metadata (`cannot_see`), which the views'
captions repeat; nothing is made up for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvscope.events import Kind
from kvscope.importers.codec import bytes_chunks, name_chunks, u64_to_i64
from kvscope.importers.vllm_events import AllBlocksCleared, Batch, BlockRemoved, BlockStored, EventFormatError, Hash
from kvscope.recorder import Recorder, defer_sigint

SOURCE = "vllm-kv-events"
_STEP_LIMIT = 1 << 31  # `step` is int32
_I64 = 1 << 63

# What the trace cannot say, in words the views show (meta["kv_events"]["cannot_see"]).
CANNOT_SEE = [
    "which physical block holds a hash: vLLM's events carry no block ids, so `block` numbers hashes (nodes), not "
    "blocks, and two blocks stored under one hash are two stores of one node",
    "blocks that are never hashed (partly filled last blocks, decode blocks of running requests): they are "
    "allocated and freed without any event",
    "requests and their block tables: events name no request, so no per-request memory, waits or hits",
    "prefix-cache hits: a hit stores nothing and removes nothing, so it sends no event",
    "the pool's size and its free blocks: only the cached blocks are known",
    "engine steps: `step` is the message's sequence number and time is vLLM's batch ts",
]

Row = tuple[int, dict[str, int]]  # (kind, columns)


@dataclass
class WriterState:
    nodes: dict[tuple[int | None, Hash], int] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    events: int = 0
    last_seq: int | None = None
    last_t_ns: int = 0
    gaps: int = 0
    missing: int = 0  # messages lost for good (not recovered through replay)


def trace_meta(
    *, input: str, form: str, ts_origin_s: float, keep_tokens: bool, command: str | None = None
) -> dict[str, Any]:
    """The metadata of a trace of KV events: its source, what `step`, `block` and t_ns hold, and what it cannot see."""
    meta: dict[str, Any] = {
        "source": SOURCE,
        "allocator": "vllm",
        "allocator_config": {"label": "vLLM KV events"},
        "kv_events": {
            "input": input,
            "form": form,  # msgpack | jsonl | zmq
            "ts_origin_s": ts_origin_s,
            "step": "the message's sequence number (a file's messages are numbered by position); no engine steps",
            "time": "t_ns = (batch ts - ts_origin_s) in ns: vLLM's own clock (time.time() on its host)",
            "block": "a node: one (group, hash) pair, numbered in the order first met; vLLM sends no block ids",
            "hash": "KV_HASH rows: aux holds an integer hash's 64 bits as int64; hash = aux mod 2**64",
            "token_ids_kept": keep_tokens,
            "extra_keys": "not kept (vLLM's hash already stands for them)",
            "cannot_see": CANNOT_SEE,
        },
    }
    if command:
        meta["command"] = command
    return meta


class KVTraceWriter:
    """Writes batches into `recorder` (opened by the caller; its `step` is set per message)."""

    def __init__(self, recorder: Recorder, ts_origin_s: float, *, keep_tokens: bool = False) -> None:
        self.recorder = recorder
        self.ts_origin_s = ts_origin_s
        self.keep_tokens = keep_tokens
        self.state = WriterState()
        self._closed = False

    # ---- one message ------------------------------------------------------------------------------------------
    def write(self, batch: Batch, seq: int, where: str, *, replayed: bool = False) -> None:
        """Write message `seq` (`where` names it in errors). All of its rows or none."""
        if not 0 <= seq < _STEP_LIMIT:
            raise EventFormatError(f"{where}: sequence number {seq} does not fit the trace's step (int32)")
        t_ns = round((batch.ts - self.ts_origin_s) * 1e9)
        if not -_I64 <= t_ns < _I64:
            raise EventFormatError(f"{where}.ts: {batch.ts} is too far from the trace's origin {self.ts_origin_s}")
        nodes = dict(self.state.nodes)  # committed only once every row is emitted
        names = dict(self.state.names)
        rows: list[Row] = [
            (
                Kind.KV_BATCH,
                {"n": len(batch.events), "aux": _opt(batch.data_parallel_rank), "addr": 1 if replayed else 0},
            )
        ]
        for i, event in enumerate(batch.events):
            self._event_rows(event, rows, nodes, names, f"{where}, event {i}")
        for kind, cols in rows:
            for name, value in cols.items():
                if not -_I64 <= value < _I64:
                    raise EventFormatError(f"{where}: {Kind(kind).name.lower()} {name}={value} does not fit int64")
        rec = self.recorder
        with defer_sigint():
            rec.step = seq
            for kind, cols in rows:
                rec.emit_at(t_ns, kind, **cols)
            self.state.nodes, self.state.names = nodes, names
            self.state.batches += 1
            self.state.events += len(batch.events)
            self.state.last_seq = seq
            self.state.last_t_ns = t_ns
        rec.end_step()  # flushes a batch once flush_seconds have passed: a killed listener loses at most that

    def gap(self, first_missing: int, missing: int, recovered: int) -> None:
        """Record that `missing` messages from `first_missing` on did not arrive in order, `recovered` of them
        through the replay socket (written before the replayed batches, at the time of the last batch written)."""
        with defer_sigint():
            self.recorder.step = min(first_missing, _STEP_LIMIT - 1)
            self.recorder.emit_at(self.state.last_t_ns, Kind.KV_GAP, addr=first_missing, n=missing, aux=recovered)
        self.state.gaps += 1
        self.state.missing += missing - recovered

    def close(self, at_ts: float | None = None) -> None:
        """End the trace with RUN_END (n = messages written), stamped at vLLM time `at_ts` (default: the last
        batch), so that every row of the trace is on one clock. Safe to call twice."""
        if self._closed:
            return
        t_ns = self.state.last_t_ns
        if at_ts is not None:
            t_ns = max(t_ns, round((at_ts - self.ts_origin_s) * 1e9))
        with defer_sigint():
            self.recorder.emit_at(t_ns, Kind.RUN_END, n=self.state.batches)
            self.recorder.abort()  # closes the file; RUN_END is already in it
        self._closed = True

    def abort(self) -> None:
        """Close without RUN_END (the trace reads as cut off): every message written so far stays."""
        self.recorder.abort()
        self._closed = True

    # ---- rows of one event --------------------------------------------------------------------------------------
    def _event_rows(self, event: Any, rows: list[Row], nodes: dict, names: dict, where: str) -> None:
        if isinstance(event, AllBlocksCleared):
            rows.append((Kind.KV_CLEARED, {}))
        elif isinstance(event, BlockRemoved):
            medium = _name(event.medium, rows, names)
            for h in event.block_hashes:
                node = _node(event.group_idx, h, rows, nodes)
                rows.append((Kind.KV_REMOVED, {"block": node, "addr": medium}))
        elif isinstance(event, BlockStored):
            self._stored_rows(event, rows, nodes, names)
        else:  # decode_event makes only the three
            raise EventFormatError(f"{where}: not a KV event ({type(event).__name__})")

    def _stored_rows(self, event: BlockStored, rows: list[Row], nodes: dict, names: dict) -> None:
        medium = _name(event.medium, rows, names)
        lora_name = _name(event.lora_name, rows, names)
        spec = _name(event.kv_cache_spec_kind, rows, names)
        group = event.group_idx
        parent = -1 if event.parent_block_hash is None else _node(group, event.parent_block_hash, rows, nodes)
        header = {
            "n": len(event.block_hashes),
            "aux": parent,
            "addr": medium,
            "block": _opt(event.lora_id),
            "seq": lora_name,
            "bytes": event.block_size,
            "dur_ns": spec,
        }
        rows.append((Kind.KV_STORE, header))
        if event.kv_cache_spec_sliding_window is not None:
            rows.append((Kind.KV_WINDOW, {"n": event.kv_cache_spec_sliding_window}))
        for i, h in enumerate(event.block_hashes):
            node = _node(group, h, rows, nodes)
            tokens = event.block_tokens(i)
            rows.append((Kind.KV_STORED, {"block": node, "aux": parent, "n": len(tokens), "addr": medium}))
            if self.keep_tokens:
                rows.extend((Kind.KV_TOKEN, {"block": node, "addr": j, "aux": t}) for j, t in enumerate(tokens))
            parent = node


def _opt(value: int | None) -> int:
    return -1 if value is None else value


def _name(value: str | None, rows: list[Row], names: dict[str, int]) -> int:
    """The name id of a string, declaring it (KV_NAME rows) when first met; -1 for None."""
    if value is None:
        return -1
    known = names.get(value)
    if known is not None:
        return known
    ident = names[value] = len(names)
    length, chunks = name_chunks(value)
    rows.extend((Kind.KV_NAME, {"block": ident, "n": length, "addr": i, "aux": c}) for i, c in enumerate(chunks))
    return ident


def _node(group: int | None, h: Hash, rows: list[Row], nodes: dict[tuple[int | None, Hash], int]) -> int:
    """The node of (group, hash), declaring it (KV_HASH rows) when first met."""
    key = (group, h)
    known = nodes.get(key)
    if known is not None:
        return known
    node = nodes[key] = len(nodes)
    if isinstance(h, int):
        rows.append((Kind.KV_HASH, {"block": node, "addr": _opt(group), "n": 0, "aux": u64_to_i64(h)}))
    else:
        rows.extend(
            (Kind.KV_HASH, {"block": node, "addr": _opt(group), "n": len(h), "seq": i, "aux": c})
            for i, c in enumerate(bytes_chunks(h))
        )
    return node
