"""Where each msgpack value of a file starts and ends, without decoding it.

A file of vLLM KV events holds many payloads (one array of them, or one after another). Decoding the whole file at
once would say only "truncated" or "invalid" for a damaged file; walking the values' headers first gives every
payload its byte span, so that errors name the message index and every complete message before the damage can be
kept. Only headers are read (lengths and counts, per the msgpack spec); msgspec decodes each span afterwards.
"""

from __future__ import annotations

Span = tuple[int, int]  # [start, end) byte offsets of one value


class FrameError(ValueError):
    """The file's framing breaks at some value: `complete` holds the spans of the values before it."""

    def __init__(self, complete: list[Span], problem: str) -> None:
        super().__init__(problem)
        self.complete = complete
        self.problem = problem


# type byte -> (bytes of the length field, extra bytes after it) for str / bin / ext with an explicit length
_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}
_EXT = {0xC7: 1, 0xC8: 2, 0xC9: 4}  # ext 8/16/32: length field, then a type byte, then the data
_FIXED = {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}
_FIXED |= {0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}  # fixext 1/2/4/8/16 (type byte + data)
_CONTAINERS = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # array/map 16/32: (count bytes, items each)


def _uint(data: bytes, pos: int, size: int) -> int:
    if pos + size > len(data):
        raise FrameError([], f"cut off at byte {len(data)} (inside a length field at byte {pos})")
    return int.from_bytes(data[pos : pos + size], "big")


def skip(data: bytes, pos: int) -> int:
    """The end of the complete value starting at `pos`; FrameError when it runs past the end or is not msgpack."""
    start, pending = pos, 1  # values still to skip (a container adds its items)
    while pending:
        if pos >= len(data):
            raise FrameError([], f"cut off at byte {len(data)} (a value starting at byte {start} is incomplete)")
        b = data[pos]
        pending -= 1
        if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):  # fixint, nil, bool
            pos += 1
        elif b <= 0x8F:  # fixmap
            pending, pos = pending + 2 * (b & 0x0F), pos + 1
        elif b <= 0x9F:  # fixarray
            pending, pos = pending + (b & 0x0F), pos + 1
        elif b <= 0xBF:  # fixstr
            pos += 1 + (b & 0x1F)
        elif b in _SIZED:
            size, _ = _SIZED[b]
            pos += 1 + size + _uint(data, pos + 1, size)
        elif b in _EXT:
            size = _EXT[b]
            pos += 2 + size + _uint(data, pos + 1, size)
        elif b in _FIXED:
            pos += _FIXED[b]
        elif b in _CONTAINERS:
            size, each = _CONTAINERS[b]
            pending, pos = pending + each * _uint(data, pos + 1, size), pos + 1 + size
        else:  # 0xC1 is never used
            raise FrameError([], f"byte {pos} (0x{b:02x}) is not msgpack")
    if pos > len(data):
        raise FrameError([], f"cut off at byte {len(data)} (a value starting at byte {start} needs {pos - start})")
    return pos


def _array_header(data: bytes, pos: int) -> tuple[int, int] | None:
    """(element count, position of the first element) when an array starts at `pos`, else None."""
    if pos >= len(data):
        return None
    b = data[pos]
    if 0x90 <= b <= 0x9F:
        return b & 0x0F, pos + 1
    if b in (0xDC, 0xDD):
        size = 2 if b == 0xDC else 4
        return _uint(data, pos + 1, size), pos + 1 + size
    return None


def _is_container(byte: int) -> bool:
    return 0x80 <= byte <= 0x9F or byte >= 0xDC and byte <= 0xDF


def _spans(data: bytes, pos: int, count: int | None) -> list[Span]:
    """Spans of `count` values from `pos` (None: until the end of the data)."""
    spans: list[Span] = []
    while (count is None and pos < len(data)) or (count is not None and len(spans) < count):
        try:
            end = skip(data, pos)
        except FrameError as e:
            raise FrameError(spans, e.problem) from None
        spans.append((pos, end))
        pos = end
    if pos != len(data):
        raise FrameError(spans, f"{len(data) - pos} bytes after the array of {len(spans)} payloads")
    return spans


def payload_spans(data: bytes) -> list[Span]:
    """The payloads of a file: the elements of one top-level array of payloads (each a KVEventBatch: an array or a
    map), or top-level values one after another (a file whose first value is itself a batch, [ts, ...])."""
    try:
        header = _array_header(data, 0)
    except FrameError as e:
        raise FrameError([], e.problem) from None
    if header is not None:
        count, first = header
        if count == 0 or (first < len(data) and _is_container(data[first])):
            return _spans(data, first, count)
    return _spans(data, 0, None)
