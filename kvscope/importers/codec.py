"""How KV-event rows hold what an int64 column cannot: unsigned 64-bit hashes, bytes hashes and strings.

The trace's columns are int64 and its metadata is written before the first event (so a live listener cannot add a
table of hashes or names to it later). So the values travel in the rows themselves (kvscope.events, KV_HASH and
KV_NAME):
- an integer hash h (0 <= h < 2**64) is stored as its 64 bits read as a signed int64: aux = h - 2**64 when
  h >= 2**63, else h. Back: h = aux mod 2**64 (numpy: aux.view(np.uint64)). Exact, both ways.
- a bytes hash (vLLM's default digest when it does not publish ints) is split into 8-byte chunks, big-endian,
  the last zero-padded, with its length in n.
- a string is its UTF-8 in 8-byte chunks, little-endian, the last zero-padded, with its byte length in n.
Both directions live here, so the importer and the analysis cannot disagree; tests round-trip the real streams.
"""

from __future__ import annotations

from collections.abc import Iterable

U64 = 1 << 64
I64 = 1 << 63


def u64_to_i64(h: int) -> int:
    """The int64 holding an unsigned 64-bit hash's bits."""
    if not 0 <= h < U64:
        raise ValueError(f"{h} is not an unsigned 64-bit integer")
    return h - U64 if h >= I64 else h


def i64_to_u64(aux: int) -> int:
    """The unsigned 64-bit hash an int64 column value holds (the inverse of u64_to_i64)."""
    return aux % U64


def _chunks(data: bytes, byteorder: str) -> list[int]:
    padded = data + b"\0" * (-len(data) % 8)
    return [
        int.from_bytes(padded[i : i + 8], byteorder, signed=True)  # type: ignore[arg-type]
        for i in range(0, len(padded), 8)
    ]


def _join(chunks: Iterable[int], length: int, byteorder: str) -> bytes:
    data = b"".join(int(c).to_bytes(8, byteorder, signed=True) for c in chunks)  # type: ignore[arg-type]
    return data[:length]


def bytes_chunks(data: bytes) -> list[int]:
    """A bytes hash as int64 chunks (big-endian, zero-padded)."""
    return _chunks(data, "big")


def bytes_from_chunks(chunks: Iterable[int], length: int) -> bytes:
    return _join(chunks, length, "big")


def name_chunks(name: str) -> tuple[int, list[int]]:
    """(UTF-8 length, int64 chunks, little-endian, zero-padded) of a string; an empty string has one chunk 0."""
    data = name.encode()
    return len(data), _chunks(data, "little") or [0]


def name_from_chunks(chunks: Iterable[int], length: int) -> str:
    return _join(chunks, length, "little").decode()


def hash_u64(h: int | bytes) -> int:
    """One unsigned 64-bit number per hash, for tables and hovers: an integer hash itself; for a bytes hash its
    last 8 bytes big-endian, which is the integer vLLM publishes for it in its int-hash mode."""
    return h if isinstance(h, int) else int.from_bytes(h[-8:], "big")
