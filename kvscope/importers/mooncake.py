"""Mooncake's request traces (FAST'25 release: `conversation_trace.jsonl`, `synthetic_trace.jsonl`) -> kvscope.

One JSON object a line: `timestamp` (ms since the trace starts), `input_length` and `output_length` (tokens) and
`hash_ids`, one id per 512-token block of the prompt (the last one partly filled): equal ids mean equal content and,
because Mooncake hashes each block together with its prefix, equal prefixes, so a trace's ids form prefix chains.

`load_mooncake` reads and checks a file into flat numpy arrays (the policy lab replays those directly);
`to_requests` turns it into kvscope workload requests whose `prompt_blocks` carry the ids, so that the paged
allocator's token hashing, at any block size, shares exactly the blocks whose ids agree (kvscope.workload). What a
trace cannot tell (the tokens themselves, the generated text, which requests belong to one conversation) is not
invented: tokens come from a deterministic stream per block id, and outputs are never shared.

Every problem is a ValueError naming the file, the line and the field.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvscope.workload import MAX_REQUEST_TOKENS, MAX_REQUESTS, PromptBlocks, Request

BLOCK_TOKENS = 512  # Mooncake's block: one hash id per 512 prompt tokens
FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")
_MAX_ID = 2**63 - 1
_MAX_LINE_BYTES = 1 << 24  # 16 MiB: 16 Mi tokens are 32 Ki ids; a longer line is not a Mooncake request


@dataclass(frozen=True)
class MooncakeTrace:
    """A checked trace, in file order: request i's ids are hash_ids[offsets[i]:offsets[i + 1]]."""

    path: Path
    timestamp_ms: np.ndarray  # float64
    input_length: np.ndarray  # int64
    output_length: np.ndarray  # int64
    offsets: np.ndarray  # int64, len = requests + 1
    hash_ids: np.ndarray  # int64
    block_tokens: int = BLOCK_TOKENS

    def __len__(self) -> int:
        return len(self.input_length)

    def ids(self, i: int) -> np.ndarray:
        return self.hash_ids[self.offsets[i] : self.offsets[i + 1]]

    def block_fill(self) -> np.ndarray:
        """Tokens in each block of hash_ids (flat): block_tokens, except each request's last block."""
        fill = np.full(len(self.hash_ids), self.block_tokens, dtype=np.int64)
        last = self.offsets[1:] - 1
        fill[last] = self.input_length - self.block_tokens * (np.diff(self.offsets) - 1)
        return fill

    def describe(self) -> dict[str, Any]:
        blocks = len(self.hash_ids)
        unique = len(np.unique(self.hash_ids))
        return {
            "requests": len(self),
            "blocks": blocks,
            "unique_blocks": unique,
            # the hit rate of an infinite cache: every block but the first use of each id
            "max_block_hit_rate": round(1 - unique / blocks, 4) if blocks else 0.0,
            "mean_input": round(float(self.input_length.mean()), 1),
            "mean_output": round(float(self.output_length.mean()), 1),
            "duration_s": round(float(self.timestamp_ms.max() - self.timestamp_ms.min()) / 1000, 3),
        }


def load_mooncake(path: str | os.PathLike, block_tokens: int = BLOCK_TOKENS, limit: int | None = None) -> MooncakeTrace:
    """Read and check a Mooncake trace (the first `limit` requests if given). ValueError('FILE:LINE: ...')."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a Mooncake trace")
    if not path.is_file():
        raise ValueError(f"{path}: no such Mooncake trace")
    stamps: list[float] = []
    inputs: list[int] = []
    outputs: list[int] = []
    lengths: list[int] = []
    ids: list[int] = []
    parent_of: dict[int, tuple[int, int]] = {}  # id -> (the id before it, or -1; line where first seen)
    with path.open("rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(_MAX_LINE_BYTES + 1), b""), start=1):
            where = f"{path}:{lineno}"
            if len(raw) > _MAX_LINE_BYTES:
                raise ValueError(f"{where}: line longer than {_MAX_LINE_BYTES >> 20} MiB; not a Mooncake request")
            if not raw.strip():
                continue
            if limit is not None and len(inputs) >= limit:
                break
            if len(inputs) >= MAX_REQUESTS:
                raise ValueError(f"{where}: more than {MAX_REQUESTS:,} requests; import a slice of the trace")
            row = _parse(raw, where)
            stamp, n_in, n_out, chain = _check_row(row, where, block_tokens)
            for i, h in enumerate(chain):
                before = chain[i - 1] if i else -1
                seen = parent_of.setdefault(h, (before, lineno))
                if seen[0] != before:
                    raise ValueError(
                        f"{where}: field 'hash_ids': id {h} follows {_name(before)} here but {_name(seen[0])} on "
                        f"line {seen[1]}; equal ids must mean equal prefixes"
                    )
            stamps.append(stamp)
            inputs.append(n_in)
            outputs.append(n_out)
            lengths.append(len(chain))
            ids.extend(chain)
    if not inputs:
        raise ValueError(f"{path}: no requests in the file")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return MooncakeTrace(
        path=path,
        timestamp_ms=np.asarray(stamps, dtype=np.float64),
        input_length=np.asarray(inputs, dtype=np.int64),
        output_length=np.asarray(outputs, dtype=np.int64),
        offsets=offsets,
        hash_ids=np.asarray(ids, dtype=np.int64),
        block_tokens=block_tokens,
    )


def _name(h: int) -> str:
    return "the start of the prompt" if h < 0 else f"id {h}"


def _parse(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
    except (RecursionError, ValueError):  # nested too deeply, or an integer past Python's digit limit
        raise ValueError(f"{where}: not valid JSON") from None


def _check_row(row: Any, where: str, block_tokens: int) -> tuple[float, int, int, list[int]]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, got {type(row).__name__}")
    for name in FIELDS:
        if name not in row:
            raise ValueError(f"{where}: field {name!r}: missing (a Mooncake request has {', '.join(FIELDS)})")
    stamp = row["timestamp"]
    if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp) or stamp < 0:
        raise ValueError(f"{where}: field 'timestamp': must be milliseconds >= 0, got {_short(stamp)}")
    if stamp > 1e12:  # 31 years in ms: kvscope's arrival limit (1e9 s)
        raise ValueError(f"{where}: field 'timestamp': {_short(stamp)} ms is beyond kvscope's 1e9 s of arrivals")
    n_in = _int(row, "input_length", where, 1)
    n_out = _int(row, "output_length", where, 1)
    chain = row["hash_ids"]
    if not isinstance(chain, list) or not chain:
        raise ValueError(f"{where}: field 'hash_ids': must be a non-empty list of block ids, got {_short(chain)}")
    for i, h in enumerate(chain):
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h <= _MAX_ID:
            raise ValueError(f"{where}: field 'hash_ids': id {i} must be an integer in 0..2**63-1, got {_short(h)}")
    expected = -(-n_in // block_tokens)
    if len(chain) != expected:
        raise ValueError(
            f"{where}: field 'hash_ids': {len(chain)} ids, but input_length {n_in} in blocks of {block_tokens} "
            f"needs {expected}"
        )
    if len(set(chain)) != len(chain):
        raise ValueError(f"{where}: field 'hash_ids': an id repeats within one prompt; ids must form a prefix chain")
    return float(stamp), n_in, n_out, chain


def _int(row: dict, name: str, where: str, minimum: int) -> int:
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: field {name!r}: must be an integer >= {minimum}, got {_short(value)}")
    if value > MAX_REQUEST_TOKENS:
        raise ValueError(f"{where}: field {name!r}: {value:,} tokens, more than the {MAX_REQUEST_TOKENS:,} allowed")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def to_requests(trace: MooncakeTrace, prefix: str = "mc") -> list[Request]:
    """kvscope requests, in file order: id PREFIX<line index>, arrival = timestamp / 1000 s, the prompt as
    `prompt_blocks` of the trace's ids (size = its block size), output_len = output_length."""
    out: list[Request] = []
    size = trace.block_tokens
    for i in range(len(trace)):
        out.append(
            Request(
                id=f"{prefix}{i}",
                arrival=float(trace.timestamp_ms[i]) / 1000.0,
                prompt_len=int(trace.input_length[i]),
                output_len=int(trace.output_length[i]),
                prompt_blocks=PromptBlocks(size, tuple(trace.ids(i).tolist())),
            )
        )
    return out
