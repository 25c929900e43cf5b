"""Requests: the record, deterministic token ids, the JSONL file format (contract) and named workloads.

File format: one JSON object per line (blank lines are skipped)::

    {"id": "r0", "arrival": 0.0, "prompt_len": 161, "output_len": 338}
    {"id": "r1", "arrival": 0.12, "prompt": [1, 2, 3], "output_len": 8, "n": 4}
    {"id": "r2", "arrival": 0.3, "prompt_len": 700, "output_len": 90, "shared_prefix": {"id": "system-0", "len": 256}}
    {"id": "c0-t1", "arrival": 5.1, "prompt_len": 900, "output_len": 80, "conversation": "c0"}
    {"id": "mc7", "arrival": 0.5, "prompt_len": 1100, "output_len": 4, "prompt_blocks": {"size": 512, "ids": [0, 9, 8]}}

`arrival` is seconds since the run starts; `n` (default 1) is the number of parallel samples; `beam` (default 1: no
beam search) is a beam width K: the request decodes K beams at once, vLLM v0's way (see kvscope.engine.scheduler);
`prompt` (explicit token ids) may replace or accompany `prompt_len`::

    {"id": "r3", "arrival": 0.5, "prompt_len": 19, "output_len": 58, "beam": 4}

`prompt_blocks` describes the prompt as a chain of content blocks
(imported traces such as Mooncake's, whose `hash_ids` name each 512-token block): block j holds tokens
j*size..(j+1)*size-1, the last one partly filled, and `ids` has exactly ceil(prompt_len / size) entries.

Token ids. Prefix caching hashes token ids, so every request has deterministic ones without storing them: token i
comes from a named stream, a counter-based hash (splitmix64 of the stream's seed and the absolute position i) taken
mod VOCAB_SIZE. Which stream:
  - positions below `shared_prefix.len`: the prefix's stream, so every request naming that prefix starts with the
    same tokens (a shared system prompt);
  - the rest of the prompt, and the generated tokens of sample 0: the conversation's stream if the request names
    one, else the request's own stream;
  - the generated tokens of samples 1..n-1: a stream of their own per sample; with beam search, beams 1..K-1 and
    every beam forked later (numbered on from K) continue the tokens of the beam they were forked from and then
    follow a stream of their own per beam (`beam_tokens`).
  - with `prompt_blocks`: each block's tokens come from the stream of its id (`block:SIZE:ID`, positions from 0), so
    two requests whose block ids agree up to block j have the same first (j+1)*size tokens, and a prefix cache
    hashing tokens (at any block size) shares exactly what the ids share; the ids must form prefix chains (an id
    always follows the same id), as Mooncake's do.
A conversation is one growing token sequence of which each turn is a prefix: turn k+1's prompt (previous prompt,
previous answer, new user text) reads the same positions of the same streams as turn k did, so it begins with turn
k's prompt and sample-0 answer token for token, and a prefix cache holding turn k serves turn k+1. A conversation
may also use a shared system prompt (its turns all name the same `shared_prefix`).
"""

# This module is longer than 400 lines: the request record, the JSONL format and its field-by-field checks, token
# streams and the produced-distribution description are one contract (the workload file format) kept in one place.

from __future__ import annotations

import hashlib
import itertools
import json
import math
import numbers
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

# What a JSON or Python caller may give as an integer (bools are refused apart): plain and numpy ints.
_INTEGERS = (int, np.integer)
VOCAB_SIZE = 32000
_MAX_TOKEN_ID = 2**31 - 1  # token ids travel as int32

# Sane bounds, checked when a request is built, before any token id exists: a typo like prompt_len 1e9 must be one
# line, not 7.45 GiB of token ids. 16 Mi tokens is beyond every model's context; 65,536 samples beyond any n anyone
# samples; 1e9 s (31 years) keeps arrival * 1e9 (the simulated clock, int64 ns) far from overflow.
MAX_REQUEST_TOKENS = 1 << 24
MAX_SAMPLES = 1 << 16
MAX_ARRIVAL_S = 1e9
MAX_REQUESTS = 1_000_000  # generated or kept per run; a million requests is about 30 min of --device sim already
_MAX_LINE_BYTES = 1 << 27  # 128 MiB: a workload line longer than that is not a request (explicit prompts included)
_TOKEN_CHUNK = 1 << 20  # stream_tokens hashes this many positions at a time, bounding its temporaries

# splitmix64 constants (Steele, Lea, Flood 2014): a strong, vectorizable counter-based hash.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@lru_cache(maxsize=1 << 16)
def stream_seed(name: str) -> int:
    """64-bit seed of a named token stream; stable across processes and machines (unlike Python's hash())."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def stream_tokens(name: str, start: int, count: int) -> np.ndarray:
    """Token ids at absolute positions start..start+count-1 of the named stream (int32, in [0, VOCAB_SIZE))."""
    out = np.empty(count, dtype=np.int32)
    seed = np.uint64(stream_seed(name))
    # In chunks: the uint64 temporaries of one pass are 8x the int32 result, so a long prompt would need several
    # times its own size at once.
    for lo in range(0, count, _TOKEN_CHUNK):
        hi = min(lo + _TOKEN_CHUNK, count)
        z = np.arange(start + lo + 1, start + hi + 1, dtype=np.uint64) * _GAMMA + seed
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z ^= z >> np.uint64(31)
        out[lo:hi] = z % np.uint64(VOCAB_SIZE)
    return out


@dataclass(frozen=True)
class SharedPrefix:
    """The first `len` prompt tokens are the same in every request naming prefix `id` (e.g. a system prompt)."""

    id: str
    len: int

    def __post_init__(self) -> None:
        _check_str("shared_prefix.id", self.id)
        object.__setattr__(self, "len", _check_int("shared_prefix.len", self.len, 1, MAX_REQUEST_TOKENS))


@dataclass(frozen=True)
class PromptBlocks:
    """The prompt as a chain of content blocks of `size` tokens: equal ids = equal content (and, the ids being
    prefix chains, equal prefixes). See the module docstring for the token ids they stand for."""

    size: int
    ids: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _check_int("prompt_blocks.size", self.size, 1, MAX_REQUEST_TOKENS))
        ids = self.ids
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"field 'prompt_blocks.ids': must be a non-empty list of block ids, got {_short(ids)}")
        for i, b in enumerate(ids):
            if isinstance(b, bool) or not isinstance(b, _INTEGERS) or not 0 <= b <= _MAX_BLOCK_ID:
                raise ValueError(f"field 'prompt_blocks.ids': id {i} must be an integer in 0..2**63-1, got {_short(b)}")
        object.__setattr__(self, "ids", tuple(int(b) for b in ids))

    def tokens(self, prompt_len: int) -> np.ndarray:
        parts = [_block_tokens(self.size, b) for b in self.ids]
        return np.concatenate(parts)[:prompt_len] if len(parts) > 1 else parts[0][:prompt_len].copy()


_MAX_BLOCK_ID = 2**63 - 1


@lru_cache(maxsize=4096)
def _block_tokens(size: int, block_id: int) -> np.ndarray:
    # Cached: a shared system-prompt block is in most requests of a trace. Read-only so no caller changes the cache.
    tokens = stream_tokens(f"block:{size}:{block_id}", 0, size)
    tokens.flags.writeable = False
    return tokens


@dataclass(frozen=True)
class Request:
    """One request. Invalid values raise ValueError("field 'NAME': ...") so the file loader can say where."""

    id: str
    arrival: float
    prompt_len: int
    output_len: int
    n: int = 1
    prompt: tuple[int, ...] | None = field(default=None, repr=False)
    shared_prefix: SharedPrefix | None = None
    conversation: str | None = None
    beam: int = 1
    prompt_blocks: PromptBlocks | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalize numpy scalars and arrays to plain Python values once
        _check_str("id", self.id)
        set_(self, "arrival", _check_arrival(self.arrival))
        set_(self, "prompt_len", _check_int("prompt_len", self.prompt_len, 1, MAX_REQUEST_TOKENS))
        set_(self, "output_len", _check_int("output_len", self.output_len, 1, MAX_REQUEST_TOKENS))
        set_(self, "n", _check_int("n", self.n, 1, MAX_SAMPLES))
        set_(self, "beam", _check_int("beam", self.beam, 1, MAX_SAMPLES))
        if self.beam > 1 and self.n > 1:
            # vLLM v0 returns the best n of the K beams; kvscope runs the K beams and keeps no ranking, so n > 1
            # would change nothing the memory sees: refused rather than silently ignored.
            raise ValueError(f"field 'beam': beam search (beam={self.beam}) takes n=1, got n={self.n}")
        if self.prompt is not None:
            prompt = _check_prompt(self.prompt)
            if len(prompt) != self.prompt_len:
                raise ValueError(
                    f"field 'prompt_len': {self.prompt_len} disagrees with the prompt's {len(prompt)} tokens"
                )
            set_(self, "prompt", prompt)
        if self.shared_prefix is not None:
            if not isinstance(self.shared_prefix, SharedPrefix):
                raise ValueError(f"field 'shared_prefix': must be a SharedPrefix, got {self.shared_prefix!r}")
            if self.shared_prefix.len > self.prompt_len:
                raise ValueError(
                    f"field 'shared_prefix.len': {self.shared_prefix.len} exceeds the prompt length {self.prompt_len}"
                )
        if self.conversation is not None:
            _check_str("conversation", self.conversation)
        if self.prompt_blocks is not None:
            self._check_blocks()

    def _check_blocks(self) -> None:
        blocks = self.prompt_blocks
        if not isinstance(blocks, PromptBlocks):
            raise ValueError(f"field 'prompt_blocks': must be a PromptBlocks, got {blocks!r}")
        for other in ("prompt", "shared_prefix"):
            if getattr(self, other) is not None:
                raise ValueError(f"field 'prompt_blocks': cannot be combined with {other!r} (both give the prompt)")
        expected = -(-self.prompt_len // blocks.size)
        if len(blocks.ids) != expected:
            raise ValueError(
                f"field 'prompt_blocks.ids': {len(blocks.ids)} ids, but prompt_len {self.prompt_len} in blocks of "
                f"{blocks.size} needs {expected}"
            )

    @property
    def width(self) -> int:
        """Sequences the request decodes at once: its n parallel samples, or its beam width."""
        return self.beam if self.beam > 1 else self.n

    @property
    def _tail_stream(self) -> str:
        # Namespaced so a prefix, a conversation and a request that happen to share a name never share tokens.
        return f"conv:{self.conversation}" if self.conversation is not None else f"req:{self.id}"

    def prompt_tokens(self) -> np.ndarray:
        """The prompt's token ids (int32, length prompt_len): explicit if given, else from the streams."""
        if self.prompt is not None:
            return np.asarray(self.prompt, dtype=np.int32)
        if self.prompt_blocks is not None:
            return self.prompt_blocks.tokens(self.prompt_len)
        prefix = self.shared_prefix
        shared = prefix.len if prefix is not None else 0
        tail = stream_tokens(self._tail_stream, shared, self.prompt_len - shared)
        if prefix is None or not shared:
            return tail
        return np.concatenate([stream_tokens(f"prefix:{prefix.id}", 0, shared), tail])

    def output_tokens(self, sample: int, start: int, count: int) -> np.ndarray:
        """Generated token ids of sample `sample` at output positions start..start+count-1 (int32)."""
        if not 0 <= sample < self.n:
            raise ValueError(f"request {self.id!r}: sample {sample} out of range (n={self.n})")
        if start < 0 or count < 0 or start + count > self.output_len:
            raise ValueError(
                f"request {self.id!r}: output positions {start}..{start + count} outside 0..{self.output_len}"
            )
        stream = self._tail_stream if sample == 0 else f"req:{self.id}#{sample}"
        return stream_tokens(stream, self.prompt_len + start, count)

    def beam_tokens(self, beam: int, start: int, count: int) -> np.ndarray:
        """Generated token ids of beam `beam` (any beam number >= 1: beams forked during decode are numbered on
        from the width) at output positions start..start+count-1: the beam's own stream."""
        if self.beam <= 1:
            raise ValueError(f"request {self.id!r}: not a beam search request")
        if beam < 1 or start < 0 or count < 0 or start + count > self.output_len:
            raise ValueError(f"request {self.id!r}: beam {beam} output positions {start}..{start + count} invalid")
        return stream_tokens(f"req:{self.id}~beam{beam}", self.prompt_len + start, count)

    def to_json(self) -> dict[str, Any]:
        """The JSONL object (defaults left out)."""
        d: dict[str, Any] = {"id": self.id, "arrival": self.arrival, "prompt_len": self.prompt_len}
        if self.prompt is not None:
            d["prompt"] = list(self.prompt)
        d["output_len"] = self.output_len
        if self.n != 1:
            d["n"] = self.n
        if self.beam != 1:
            d["beam"] = self.beam
        if self.shared_prefix is not None:
            d["shared_prefix"] = {"id": self.shared_prefix.id, "len": self.shared_prefix.len}
        if self.conversation is not None:
            d["conversation"] = self.conversation
        if self.prompt_blocks is not None:
            d["prompt_blocks"] = {"size": self.prompt_blocks.size, "ids": list(self.prompt_blocks.ids)}
        return d

    @classmethod
    def from_json(cls, d: Any) -> Request:
        """Build from a parsed JSONL object; raises ValueError("field 'NAME': ...") naming the bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - _JSON_FIELDS)
        if unknown:
            raise ValueError(f"field {unknown[0]!r}: unknown field (known: {', '.join(sorted(_JSON_FIELDS))})")
        for name in ("id", "arrival", "output_len"):
            if name not in d:
                raise ValueError(f"field {name!r}: missing")
        if "prompt_len" not in d and "prompt" not in d:
            raise ValueError("field 'prompt_len': missing (give prompt_len or prompt)")
        prompt = d.get("prompt")
        prompt_len = d.get("prompt_len")
        if prompt is not None:
            prompt = _check_prompt(prompt)
            if prompt_len is None:
                prompt_len = len(prompt)
        shared = d.get("shared_prefix")
        if shared is not None:
            shared = SharedPrefix(*_sub_object("shared_prefix", shared, ("id", "len"), repr(shared)))
        blocks = d.get("prompt_blocks")
        if blocks is not None:
            blocks = PromptBlocks(*_sub_object("prompt_blocks", blocks, ("size", "ids"), _short(blocks)))
        return cls(
            id=d["id"],
            arrival=d["arrival"],
            prompt_len=prompt_len,  # type: ignore[arg-type]  # None only when absent, refused above
            output_len=d["output_len"],
            n=d.get("n", 1),
            beam=d.get("beam", 1),
            prompt=prompt,
            shared_prefix=shared,
            conversation=d.get("conversation"),
            prompt_blocks=blocks,
        )


_JSON_FIELDS = {
    "id", "arrival", "prompt_len", "prompt", "output_len", "n", "beam", "shared_prefix", "conversation",
    "prompt_blocks",
}  # fmt: skip


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"field {name!r}: must be a non-empty string, got {value!r}")


def _check_int(name: str, value: Any, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, _INTEGERS) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"field {name!r}: must be {what}, got {_short(value)}")
    if value > maximum:
        raise ValueError(f"field {name!r}: must be at most {maximum:,}, got {_short(value)}")
    return int(value)


def _check_arrival(value: Any) -> float:
    # Huge ints (400 digits) must not reach float(): it raises OverflowError, not the ValueError the loader names.
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if ok and isinstance(value, _INTEGERS):
        ok = 0 <= int(value) <= MAX_ARRIVAL_S
    elif ok:
        ok = math.isfinite(value) and 0 <= value <= MAX_ARRIVAL_S
    if not ok:
        raise ValueError(
            f"field 'arrival': must be a finite number of seconds >= 0 (at most {MAX_ARRIVAL_S:.0e}), "
            f"got {_short(value)}"
        )
    return float(value)


def _sub_object(field: str, value: Any, keys: tuple[str, str], shown: str) -> list[Any]:
    """The values of an object field's keys, in `keys` order; one-line ValueError naming the field otherwise (not
    an object, a key missing, a key unknown)."""
    if not isinstance(value, dict):
        raise ValueError(f"field {field!r}: must be an object with {' and '.join(keys)}, got {shown}")
    for name in keys:
        if name not in value:
            raise ValueError(f"field '{field}.{name}': missing")
    extra = sorted(set(value) - set(keys))
    if extra:
        raise ValueError(f"field '{field}.{extra[0]}': unknown field (known: {', '.join(keys)})")
    return [value[name] for name in keys]


def _short(value: Any) -> str:
    """repr(value), cut to one readable piece: a 400-digit number or a long list must not flood the error line."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        # bit_length, not str(): str() of an int past 4300 digits raises ValueError itself
        return f"an integer of about {int(abs(value).bit_length() * math.log10(2)) + 1:,} digits"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _check_prompt(prompt: Any) -> tuple[int, ...]:
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or prompt.dtype.kind not in "iu":
            raise ValueError(
                f"field 'prompt': must be a 1-D array of integer token ids, got {prompt.dtype}{prompt.shape}"
            )
        values = prompt.tolist()
    elif isinstance(prompt, (list, tuple)):
        values = list(prompt)
    else:
        raise ValueError(f"field 'prompt': must be a list of token ids, got {type(prompt).__name__}")
    if not values:
        raise ValueError("field 'prompt': must not be empty")
    if len(values) > MAX_REQUEST_TOKENS:
        raise ValueError(f"field 'prompt': {len(values):,} tokens, more than the {MAX_REQUEST_TOKENS:,} allowed")
    for i, t in enumerate(values):
        if isinstance(t, bool) or not isinstance(t, _INTEGERS) or not 0 <= t <= _MAX_TOKEN_ID:
            raise ValueError(f"field 'prompt': token {i} must be an integer id in 0..{_MAX_TOKEN_ID}, got {_short(t)}")
    return tuple(int(t) for t in values)


# ---------------------------------------------------------------------------------------------------- file format


def load_workload(path: str | os.PathLike) -> list[Request]:
    """Read a JSONL workload, sorted by arrival (ties keep file order). Errors: ValueError('FILE:LINE: ...')."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a workload file")
    if not path.is_file():
        raise ValueError(f"{path}: no such workload file")
    requests: list[Request] = []
    first_line: dict[str, int] = {}
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            req = Request.from_json(_parse_json(line))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if req.id in first_line:
            raise ValueError(f"{where}: field 'id': duplicate id {_short(req.id)} (first on line {first_line[req.id]})")
        first_line[req.id] = lineno
        requests.append(req)
    if not requests:
        raise ValueError(f"{path}: no requests in the file")
    _check_explicit_prefixes(requests, path, first_line)
    return sort_by_arrival(requests)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, refusing binary content and absurdly long lines with the line number."""
    with path.open("rb") as f:
        for lineno in itertools.count(1):
            raw = f.readline(_MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > _MAX_LINE_BYTES:
                raise ValueError(f"{path}:{lineno}: line longer than {_MAX_LINE_BYTES >> 20} MiB; not a workload line")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _parse_json(line: str) -> Any:
    """One JSON value; every way json can fail becomes ValueError('not valid JSON: ...')."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:  # "[[[[..." 100,000 deep: the C parser gives up with RecursionError
        raise ValueError("not valid JSON: nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits (Python's int-conversion limit)
        raise ValueError(f"not valid JSON: {str(e).split(':')[0]}") from None


def _check_explicit_prefixes(requests: list[Request], path: Path, line_of: dict[str, int]) -> None:
    """Requests naming one shared prefix must agree on its tokens; only explicit prompts can disagree."""
    groups: dict[str, list[Request]] = {}
    for r in requests:
        if r.shared_prefix is not None:
            groups.setdefault(r.shared_prefix.id, []).append(r)
    for prefix_id, group in groups.items():
        if all(r.prompt is None for r in group):
            continue
        ref = group[0]
        ref_tokens = ref.prompt_tokens()
        for r in group[1:]:
            assert ref.shared_prefix is not None and r.shared_prefix is not None  # grouped by it above
            m = min(ref.shared_prefix.len, r.shared_prefix.len)
            if not np.array_equal(r.prompt_tokens()[:m], ref_tokens[:m]):
                raise ValueError(
                    f"{path}:{line_of[r.id]}: field 'prompt': its first {m} tokens differ from request {ref.id!r} "
                    f"(line {line_of[ref.id]}) although both name shared prefix {prefix_id!r}"
                )


def save_workload(requests: Iterable[Request], path: str | os.PathLike) -> None:
    """Write requests as JSONL (one compact object per line), in the order given. An OSError always names `path`
    (a full disk fails in write or close, whose errors carry no file name)."""
    try:
        with Path(path).open("w", encoding="utf-8") as f:
            for r in requests:
                f.write(json.dumps(r.to_json(), separators=(",", ":")) + "\n")
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from None


def sort_by_arrival(requests: Iterable[Request]) -> list[Request]:
    return sorted(requests, key=lambda r: r.arrival)  # stable: ties keep their order


# ---------------------------------------------------------------------------------------------------- descriptions


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    return {
        "mean": round(float(values.mean()), 2),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
    }


def declared_reuse(requests: Sequence[Request]) -> dict[str, int]:
    """Per request id: leading prompt tokens that an earlier-arriving request already had (a prefix cache could serve
    them): the shared prefix after its first user, the previous turn's prompt + answer in a conversation, or the
    leading prompt blocks whose ids an earlier request had."""
    reuse: dict[str, int] = {}
    seen_prefix: set[str] = set()
    seen_blocks: set[tuple[int, int]] = set()  # (size, id): ids are prefix chains, so a seen id implies its prefix
    last_turn: dict[str, Request] = {}
    for r in sort_by_arrival(requests):
        shared = 0
        if r.prompt_blocks is not None:
            size = r.prompt_blocks.size
            keys = [(size, b) for b in r.prompt_blocks.ids]
            known = next((i for i, k in enumerate(keys) if k not in seen_blocks), len(keys))
            shared = min(known * size, r.prompt_len)
            seen_blocks.update(keys)
        if r.shared_prefix is not None:
            if r.shared_prefix.id in seen_prefix:
                shared = r.shared_prefix.len
            seen_prefix.add(r.shared_prefix.id)
        if r.conversation is not None:
            prev = last_turn.get(r.conversation)
            if prev is not None:
                shared = max(shared, min(r.prompt_len, prev.prompt_len + prev.output_len))
            last_turn[r.conversation] = r
        reuse[r.id] = shared
    return reuse


def describe_lengths(requests: Sequence[Request]) -> dict[str, Any]:
    """The distribution a workload actually has: counts, and mean/p50/p90/max of prompt and output lengths."""
    prompt = np.array([r.prompt_len for r in requests], dtype=np.int64)
    output = np.array([r.output_len for r in requests], dtype=np.int64)
    reused = sum(declared_reuse(requests).values())
    arrivals = [r.arrival for r in requests]
    return {
        "requests": len(requests),
        "samples": int(sum(r.n for r in requests)),
        "beams": int(sum(r.beam for r in requests if r.beam > 1)),
        "prompt_len": _stats(prompt),
        "output_len": _stats(output),
        "prompt_tokens": int(prompt.sum()),
        "output_tokens": int(output.sum()),
        "shared_prefixes": len({r.shared_prefix.id for r in requests if r.shared_prefix is not None}),
        "conversations": len({r.conversation for r in requests if r.conversation is not None}),
        "reusable_prompt_fraction": round(reused / int(prompt.sum()), 4) if len(requests) else 0.0,
        "duration_s": round(max(arrivals) - min(arrivals), 3) if arrivals else 0.0,
    }
