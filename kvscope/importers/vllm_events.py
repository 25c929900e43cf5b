"""vLLM's KV-cache events, decoded: payloads of its ZMQ publisher (msgpack) and the JSON-lines form -> Batch.

On the wire (vllm/distributed/kv_events.py) one message is `[topic, sequence number, payload]`, the payload a
msgpack `KVEventBatch`: `[ts, [event, ...], data_parallel_rank]` (array-like; a map with those keys is accepted
too), each event a map tagged by `"type"`: `BlockStored` (block_hashes, parent_block_hash, token_ids, block_size,
lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window),
`BlockRemoved` (block_hashes, medium, group_idx) or `AllBlocksCleared`. Older publishers encoded events array-like,
tag first (`["BlockStored", block_hashes, ...]` in the field order above); both forms decode.

Block hashes are unsigned 64-bit integers when vLLM publishes int hashes (its default), or bytes (a sha256 digest)
otherwise; both are kept exactly as given. Decoding is generic (msgspec builds plain Python values, so no integer
is ever narrowed) and every field is then checked here, so a foreign or damaged payload is one line naming the
message, the event and the field, never a traceback or a silently wrong trace.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from kvscope.importers.msgpack_frames import FrameError, payload_spans

Hash = int | bytes  # vLLM's ExternalBlockHash: an unsigned 64-bit int, or the digest's bytes
U64_LIMIT = 1 << 64

# Field order of the array-like (older) encodings; map-form payloads name their fields.
STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
)
REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
EVENT_TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared")


class EventFormatError(ValueError):
    """A payload that is not a valid KVEventBatch: one line naming where (message, event, field) and what."""


@dataclass(frozen=True)
class BlockStored:
    block_hashes: tuple[Hash, ...]
    parent_block_hash: Hash | None  # None: the first block starts a chain
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: tuple[Any, ...] | None = None  # one entry per block (multimodal ids, salt, ...), kept as decoded
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None

    def block_tokens(self, i: int) -> tuple[int, ...]:
        """The token ids of block i (block_size of them for a full block; vLLM hashes only full blocks)."""
        return self.token_ids[i * self.block_size : (i + 1) * self.block_size]


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[Hash, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True)
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True)
class Batch:
    """One KVEventBatch: vLLM's `ts` (seconds: time.time() on the engine's host) and its events in order."""

    ts: float
    events: tuple[Event, ...]
    data_parallel_rank: int | None = None


# ---- checks: each returns the value or raises EventFormatError naming `where` -------------------------------------
def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "str", bytes: "bytes", list: "array", dict: "map"}.get(
        type(value), type(value).__name__
    )


def _bad(where: str, want: str, value: Any) -> EventFormatError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return EventFormatError(f"{where}: expected {want}, got {_kind(value)} {shown}")


def _int(value: Any, where: str, *, minimum: int | None = None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(where, "an integer" + (" or null" if optional else ""), value)
    if minimum is not None and value < minimum:
        raise EventFormatError(f"{where}: {value} is below {minimum}")
    return value


def _str(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _bad(where, "a string or null", value)
    return value


def _hash(value: Any, where: str) -> Hash:
    if isinstance(value, bytes) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < U64_LIMIT:
            raise EventFormatError(f"{where}: {value} is not an unsigned 64-bit block hash")
        return value
    raise _bad(where, "a block hash (unsigned 64-bit integer or bytes)", value)


def _hashes(value: Any, where: str) -> tuple[Hash, ...]:
    if not isinstance(value, list):
        raise _bad(where, "an array of block hashes", value)
    return tuple(_hash(h, f"{where}[{i}]") for i, h in enumerate(value))


def _fields(obj: Any, names: tuple[str, ...], where: str, tag: str) -> dict[str, Any]:
    """An event's fields by name, from the map form (unknown keys ignored, as msgspec does: newer vLLM adds
    fields) or the array form (tag first, then the fields in order; trailing ones may be missing)."""
    if isinstance(obj, dict):
        return {name: obj.get(name) for name in names} | {"_present": set(obj)}
    values = obj[1:]
    if len(values) > len(names):
        raise EventFormatError(f"{where}: {tag} has {len(values)} fields, at most {len(names)} known")
    return dict.fromkeys(names) | dict(zip(names, values, strict=False)) | {"_present": set(names[: len(values)])}


def _require(fields: dict[str, Any], names: tuple[str, ...], where: str, tag: str) -> None:
    missing = [n for n in names if n not in fields["_present"]]
    if missing:
        raise EventFormatError(f"{where}: {tag} lacks {', '.join(missing)}")


def decode_event(obj: Any, where: str) -> Event:
    """One event from its decoded msgpack/JSON value."""
    if isinstance(obj, dict):
        tag = obj.get("type")
    elif isinstance(obj, list) and obj:
        tag = obj[0]
    else:
        raise _bad(where, "an event (a map with a 'type', or a tagged array)", obj)
    if tag not in EVENT_TYPES:
        raise EventFormatError(f"{where}: unknown event type {tag!r} (known: {', '.join(EVENT_TYPES)})")
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if tag == "BlockRemoved":
        f = _fields(obj, REMOVED_FIELDS, where, tag)
        _require(f, ("block_hashes",), where, tag)
        return BlockRemoved(
            _hashes(f["block_hashes"], f"{where}.block_hashes"),
            _str(f["medium"], f"{where}.medium"),
            _int(f["group_idx"], f"{where}.group_idx", minimum=0, optional=True),
        )
    f = _fields(obj, STORED_FIELDS, where, tag)
    _require(f, ("block_hashes", "parent_block_hash", "token_ids", "block_size"), where, tag)
    parent = f["parent_block_hash"]
    tokens = f["token_ids"]
    if not isinstance(tokens, list):
        raise _bad(f"{where}.token_ids", "an array of token ids", tokens)
    extra = f["extra_keys"]
    if extra is not None and not isinstance(extra, list):
        raise _bad(f"{where}.extra_keys", "an array (one entry per block) or null", extra)
    block_size = _int(f["block_size"], f"{where}.block_size", minimum=1)
    assert block_size is not None  # not optional
    return BlockStored(
        block_hashes=_hashes(f["block_hashes"], f"{where}.block_hashes"),
        parent_block_hash=None if parent is None else _hash(parent, f"{where}.parent_block_hash"),
        token_ids=tuple(_int(t, f"{where}.token_ids[{i}]", minimum=0) or 0 for i, t in enumerate(tokens)),
        block_size=block_size,
        lora_id=_int(f["lora_id"], f"{where}.lora_id", optional=True),
        medium=_str(f["medium"], f"{where}.medium"),
        lora_name=_str(f["lora_name"], f"{where}.lora_name"),
        extra_keys=None if extra is None else tuple(extra),
        group_idx=_int(f["group_idx"], f"{where}.group_idx", minimum=0, optional=True),
        kv_cache_spec_kind=_str(f["kv_cache_spec_kind"], f"{where}.kv_cache_spec_kind"),
        kv_cache_spec_sliding_window=_int(
            f["kv_cache_spec_sliding_window"], f"{where}.kv_cache_spec_sliding_window", minimum=0, optional=True
        ),
    )


def decode_batch(obj: Any, where: str) -> Batch:
    """A Batch from a decoded KVEventBatch value: `[ts, events, data_parallel_rank?]` or a map of those keys."""
    if isinstance(obj, dict):
        if "ts" not in obj or "events" not in obj:
            keys = sorted(map(str, obj))[:6]
            raise EventFormatError(f"{where}: not a vLLM KVEventBatch (a map needs 'ts' and 'events', has {keys})")
        ts, events, rank = obj["ts"], obj["events"], obj.get("data_parallel_rank")
    elif isinstance(obj, list) and 2 <= len(obj) <= 3:
        ts, events, rank = obj[0], obj[1], obj[2] if len(obj) == 3 else None
    else:
        raise _bad(where, "a vLLM KVEventBatch ([ts, events, data_parallel_rank])", obj)
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise _bad(f"{where}.ts", "a finite number of seconds", ts)
    if not isinstance(events, list):
        raise _bad(f"{where}.events", "an array of events", events)
    decoded = tuple(decode_event(e, f"{where}, event {i}") for i, e in enumerate(events))
    return Batch(float(ts), decoded, _int(rank, f"{where}.data_parallel_rank", minimum=0, optional=True))


_GENERIC = msgspec.msgpack.Decoder()  # no type: plain Python values, every integer exact


def decode_payload(payload: bytes, where: str) -> Batch:
    """One message's third frame (msgpack KVEventBatch) -> Batch; EventFormatError naming `where`."""
    try:
        obj = _GENERIC.decode(payload)
    except msgspec.DecodeError as e:
        raise EventFormatError(f"{where}: not a msgpack KVEventBatch ({e})") from None
    return decode_batch(obj, where)


# ---- files ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileMessage:
    index: int  # the message's position in the file: stands for its sequence number
    batch: Batch


def sniff_format(path: Path, head: bytes) -> str:
    """'jsonl' or 'msgpack', from the first bytes: JSON lines start with '[' or '{' (after blanks); a msgpack
    array or map starts with a type byte (0x80-0x9f, 0xdc-0xdf) that is not printable text."""
    stripped = head.lstrip()
    if stripped[:1] in (b"[", b"{"):
        return "jsonl"
    if head[:1] and (0x80 <= head[0] <= 0x9F or 0xDC <= head[0] <= 0xDF):
        return "msgpack"
    if not head:
        raise EventFormatError(f"{path}: empty file, no KV events in it")
    raise EventFormatError(
        f"{path}: not vLLM KV events (neither a msgpack array of KVEventBatch payloads nor JSON lines; "
        f"starts with {head[:8]!r})"
    )


def read_messages(path: str | os.PathLike, fmt: str | None = None) -> Iterator[FileMessage]:
    """The file's batches in order; EventFormatError naming the file and the message index at the first bad one
    (messages before it have been yielded: the caller decides whether to keep them).

    msgpack: one array whose element i is message i's payload (the shared data's form), or payloads one after
    another. jsonl: one KVEventBatch as JSON per line (blank lines skipped)."""
    path = Path(path)
    data = path.read_bytes()
    fmt = fmt or sniff_format(path, data[:64])
    if fmt == "jsonl":
        yield from _jsonl_messages(path, data)
    elif fmt == "msgpack":
        yield from _msgpack_messages(path, data)
    else:
        raise ValueError(f"unknown KV-event file format {fmt!r} (jsonl or msgpack)")


def _jsonl_messages(path: Path, data: bytes) -> Iterator[FileMessage]:
    index = 0
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}: message {index}"
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            raise EventFormatError(f"{where}: not JSON ({str(e).splitlines()[0]})") from None
        yield FileMessage(index, decode_batch(obj, where))
        index += 1
    if index == 0:
        raise EventFormatError(f"{path}: no KV-event batches in it")


def _msgpack_messages(path: Path, data: bytes) -> Iterator[FileMessage]:
    try:
        spans, damage = payload_spans(data), None
    except FrameError as e:
        spans, damage = e.complete, e.problem
    if not spans and damage is None:
        raise EventFormatError(f"{path}: no KV-event batches in it")
    for index, (start, end) in enumerate(spans):
        yield FileMessage(index, decode_payload(data[start:end], f"{path}: message {index}"))
    if damage is not None:  # after the complete messages before it, so that a salvaging caller keeps them
        raise EventFormatError(f"{path}: message {len(spans)}: {damage}")


def to_jsonable(batch: Batch) -> list:
    """A Batch back in vLLM's JSON-lines form (the inverse of decode_batch for map-form events), for tests and
    for writing a capture as text."""
    events = []
    for e in batch.events:
        if isinstance(e, AllBlocksCleared):
            events.append({"type": "AllBlocksCleared"})
            continue
        fields: dict[str, Any] = {"type": type(e).__name__}
        for name, value in e.__dict__.items():
            fields[name] = list(value) if isinstance(value, tuple) else value
        events.append(fields)
    return [batch.ts, events, batch.data_parallel_rank]
