"""Instrument your own engine: record its KV allocator into a kvscope trace, so every view and summary works on it.

    import kvscope

    with kvscope.record("my-run.kvtrace", source="my-engine", addressing="blocks", label="my pool b16",
                        block_size=16, num_blocks=1024, bytes_per_token=131072) as run:
        run.arrive(0, prompt_len=40, output_len=8)
        run.admit(0)
        run.block_alloc(0, block=7, index=0)      # ... one call per state change of your allocator
        run.append(0, 40)                          # the prompt's K/V now held
        run.end_step(capacity=..., reserved=..., used=...)   # your allocator's books at the end of the step

What a trace needs, and why:
- `addressing` says how analysis replays the trace ("blocks", "pages" or "rows", kvscope.analysis.replay), with the
  sizes that replay reads from allocator_config (REQUIRED_SIZES below); `label` names the run in every surface;
  `source` says which system produced it and `cannot_see` what that system's events leave out (ARCHITECTURE.md:
  traces say which system produced them and what it cannot see).
- The lifecycle (arrive, admit, append, finish, ...) says how many tokens each sequence holds: the block grid's
  fill, request lifetimes and tokens/s come from it.
- The allocator's events (block_alloc / share / free / cow / cache / evict; reserve / release for rows; `emit`
  for the page kinds) move the per-block states the fragmentation map and block grid draw.
- `end_step(...)` takes the allocator's own books (bytes: capacity, reserved, used, ...), emits them as the ACCT_*
  samples the memory views and the summary read, and the in-step peaks (ACCT_PEAK_*): the most each quantity
  reached at any `note(...)` made during the step, or the end-of-step books alone when nothing was noted.

Step numbering: events belong to the step that the next `end_step` closes (the first is step 0); `begin_step()`
only restarts the step's timer (by default a step lasts from the previous end_step). Bad input is a ValueError
with one line naming the problem; nothing is written for a refused call.
"""

# This module is longer than 400 lines: it is the whole public instrumentation API, one documented helper per event
# kind with the books it closes a step with; split apart, a user would read several modules to instrument one engine.

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvscope import runmeta
from kvscope.alloc.base import HighWater, Usage, emit_peaks, emit_usage
from kvscope.events import KIND_BY_NAME, Kind
from kvscope.recorder import Recorder

# The allocator_config sizes each addressing's replay reads (kvscope.analysis.replay: each Replay's `sizes`, with the
# smallest valid value); tests check the two agree. Kept here so that instrumenting an engine imports no analysis.
REQUIRED_SIZES: dict[str, dict[str, int]] = {
    "blocks": {"block_size": 1, "num_blocks": 0},
    "pages": {"pages": 0, "page_size": 1, "buffer_row_bytes": 1},
    "rows": {"rows": 0},
}


def _count(name: str, value: Any, minimum: int = 0) -> int:
    """An integer argument, or one ValueError naming it (bools are refused: True is not a block id)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def hash_to_int64(value: int) -> int:
    """A block hash of any width as the trace's int64 `aux`: its low 64 bits, two's complement (vLLM's and HF's
    unsigned 64-bit hashes keep all their bits; wider hashes keep a prefix that tells blocks apart)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"a block hash must be an integer, got {type(value).__name__} {value!r}")
    low = int(value) & ((1 << 64) - 1)
    return low - (1 << 64) if low >= (1 << 63) else low


class Run:
    """One recording: the recorder plus helpers that emit each event kind with its columns as kvscope.events says.
    Made by `record(...)`; use it as a context manager (a clean exit writes RUN_END, an exception leaves a trace
    that loads as cut off)."""

    def __init__(self, recorder: Recorder, config: Mapping[str, Any], bytes_per_token: int) -> None:
        self.recorder = recorder
        self.config = dict(config)
        self.bytes_per_token = bytes_per_token
        self.addressing = str(config["addressing"])
        self.block_size = int(config.get("block_size") or 0)
        self.num_blocks = int(config.get("num_blocks") or 0)
        self.block_bytes = self.block_size * bytes_per_token
        self.steps = 0
        self.high_water = HighWater()
        self._held: dict[int, int] = {}  # seq -> tokens held: APPEND's aux, and prefill vs decode
        self._prompt: dict[int, int] = {}  # seq -> prompt tokens to hold (arrive / admit)
        self._batch: set[int] = set()  # sequences that appended in this step
        self._prefill = self._decode = 0
        self._t_step = recorder.now_ns()
        recorder.step = 0

    # ---- sequence lifecycle -------------------------------------------------------------------------------------
    def arrive(self, seq: int, prompt_len: int, output_len: int | None) -> None:
        """A request reached the engine: its prompt and the output tokens it wants (None: not known up front)."""
        seq, p = _count("seq", seq), _count("prompt_len", prompt_len, 1)
        o = -1 if output_len is None else _count("output_len", output_len, 1)
        self.recorder.emit(Kind.ARRIVE, seq=seq, n=p, aux=o)
        self._prompt[seq] = p

    def admit(self, seq: int, prompt_len: int | None = None, *, hit: int = 0) -> None:
        """The sequence joined the running batch, to hold `prompt_len` tokens (default: its arrival's prompt;
        after a recompute preemption, the prompt plus what it had generated); `hit`: prefix-cache hit tokens."""
        seq = _count("seq", seq)
        p = self._prompt.get(seq) if prompt_len is None else _count("prompt_len", prompt_len, 1)
        if p is None:
            raise ValueError(f"admit: seq {seq} never arrived; give prompt_len")
        self._prompt[seq] = p
        self.recorder.emit(Kind.ADMIT, seq=seq, n=p, aux=_count("hit", hit))

    def prefix_hit(self, seq: int, tokens: int) -> None:
        """`tokens` prompt tokens served from the prefix cache: the sequence starts holding them."""
        seq, tokens = _count("seq", seq), _count("tokens", tokens, 1)
        self.recorder.emit(Kind.PREFIX_HIT, seq=seq, n=tokens)
        self._held[seq] = tokens

    def append(self, seq: int, tokens: int) -> None:
        """K/V of `tokens` more tokens of the sequence are held (a prefill chunk, or one decode token)."""
        seq, n = _count("seq", seq), _count("tokens", tokens, 1)
        before = self._held.get(seq, 0)
        held = before + n
        self.recorder.emit(Kind.APPEND, seq=seq, n=n, aux=held)
        self._held[seq] = held
        # A decode feeds back one sampled token once the whole prompt is held; anything else is prefill.
        if n == 1 and before >= self._prompt.get(seq, 1 << 62):
            self._decode += 1
        else:
            self._prefill += n
        self._batch.add(seq)

    def fork(self, child: int, parent: int, tokens: int | None = None) -> None:
        """Parallel sampling / beam search: `child` starts from `parent`'s tokens (default: all it holds; 0 when
        the child got no memory at the fork and will be prefilled later)."""
        child, parent = _count("child", child), _count("parent", parent)
        n = self._held.get(parent, 0) if tokens is None else _count("tokens", tokens)
        self.recorder.emit(Kind.FORK, seq=child, n=n, aux=parent)
        self._held[child] = n
        if parent in self._prompt:
            self._prompt[child] = self._prompt[parent]

    def preempt(self, seq: int, *, swap: bool = False) -> None:
        """The sequence leaves the batch: swapped to CPU memory (its tokens stay) or dropped for recompute."""
        seq = _count("seq", seq)
        held = self._held.get(seq, 0)
        self.recorder.emit(Kind.PREEMPT, seq=seq, n=held, aux=1 if swap else 0)
        if not swap:
            self._held.pop(seq, None)

    def swap_out(self, seq: int, blocks: int) -> None:
        blocks = _count("blocks", blocks)
        self.recorder.emit(Kind.SWAP_OUT, seq=_count("seq", seq), n=blocks, bytes=blocks * self.block_bytes)

    def swap_in(self, seq: int, blocks: int) -> None:
        blocks = _count("blocks", blocks)
        self.recorder.emit(Kind.SWAP_IN, seq=_count("seq", seq), n=blocks, bytes=blocks * self.block_bytes)

    def finish(self, seq: int) -> None:
        """The sequence generated its last token; release its memory in the same step (after this call)."""
        seq = _count("seq", seq)
        self.recorder.emit(Kind.FINISH, seq=seq, n=self._held.pop(seq, 0))

    def reject(self, seq: int, tokens: int) -> None:
        """The request can never fit (`tokens` it would need)."""
        seq = _count("seq", seq)
        self.recorder.emit(Kind.REJECT, seq=seq, n=_count("tokens", tokens))
        self._held.pop(seq, None)

    def held(self, seq: int) -> int:
        """Tokens the sequence holds, as the recorded lifecycle says."""
        return self._held.get(seq, 0)

    # ---- blocks (addressing "blocks") ---------------------------------------------------------------------------
    def _block(self, block: int) -> int:
        if self.addressing != "blocks":
            raise ValueError(f"block events need addressing 'blocks', this run declares {self.addressing!r}")
        block = _count("block", block)
        if self.num_blocks and block >= self.num_blocks:
            raise ValueError(f"block {block} is outside the pool of {self.num_blocks} blocks")
        return block

    def block_alloc(self, seq: int, block: int, index: int) -> None:
        """A free block becomes the sequence's, at `index` of its block table (ref 1)."""
        b = self._block(block)
        self.recorder.emit(
            Kind.BLOCK_ALLOC, seq=_count("seq", seq), block=b, addr=_count("index", index), bytes=self.block_bytes
        )

    def block_share(self, seq: int, block: int, index: int, *, ref: int) -> None:
        """The sequence also holds the block (a fork, a prefix-cache hit, reviving a cached-idle block); `ref`:
        the block's reference count after."""
        b = self._block(block)
        self.recorder.emit(
            Kind.BLOCK_SHARE, seq=_count("seq", seq), block=b, addr=_count("index", index), aux=_count("ref", ref, 1)
        )

    def block_free(self, seq: int, block: int, *, ref: int) -> None:
        """The sequence lets go of the block; `ref` after. At 0 the block is free, or cached-idle if it is hashed."""
        b = self._block(block)
        self.recorder.emit(Kind.BLOCK_FREE, seq=_count("seq", seq), block=b, aux=_count("ref", ref))

    def block_cow(self, seq: int, block: int, source: int, index: int) -> None:
        """The sequence writes into its own copy `block` of the shared block `source` (copy-on-write, or a fork's
        copy of a partly filled block); free its hold on `source` with block_free."""
        b, src = self._block(block), self._block(source)
        self.recorder.emit(
            Kind.BLOCK_COW,
            seq=_count("seq", seq),
            block=b,
            addr=_count("index", index),
            aux=src,
            bytes=self.block_bytes,
        )

    def block_cache(self, seq: int, block: int, block_hash: int) -> None:
        """The block entered the prefix cache under `block_hash` (vLLM's BlockStored)."""
        b = self._block(block)
        self.recorder.emit(Kind.BLOCK_CACHE, seq=_count("seq", seq), block=b, aux=hash_to_int64(block_hash))

    def block_evict(self, block: int, block_hash: int) -> None:
        """A cached-idle block was dropped from the prefix cache and is free again (vLLM's BlockRemoved)."""
        self.recorder.emit(Kind.BLOCK_EVICT, block=self._block(block), aux=hash_to_int64(block_hash))

    # ---- rows (addressing "rows") -------------------------------------------------------------------------------
    def reserve(self, seq: int, first_row: int, rows: int) -> None:
        """The sequence reserved `rows` consecutive token rows of the arena from `first_row`."""
        self._rows("reserve", Kind.STATIC_RESERVE, seq, first_row, rows)

    def release(self, seq: int, first_row: int, rows: int) -> None:
        self._rows("release", Kind.STATIC_RELEASE, seq, first_row, rows)

    def _rows(self, what: str, kind: Kind, seq: int, first_row: int, rows: int) -> None:
        if self.addressing != "rows":
            raise ValueError(f"{what} needs addressing 'rows', this run declares {self.addressing!r}")
        first, n = _count("first_row", first_row), _count("rows", rows, 1)
        if first + n > int(self.config["rows"]):
            raise ValueError(f"{what}: rows {first}..{first + n - 1} are outside the arena of {self.config['rows']}")
        self.recorder.emit(kind, seq=_count("seq", seq), addr=first, n=n, bytes=n * self.bytes_per_token)

    # ---- anything else --------------------------------------------------------------------------------------------
    def emit(self, kind: Kind | str, **columns: int) -> None:
        """Any event kind (the page kinds of addressing "pages", MEM_* samples, ...), columns as kvscope.events
        says; a kind may be given by name ('page_map')."""
        code = KIND_BY_NAME.get(kind) if isinstance(kind, str) else kind
        if code is None:
            raise ValueError(f"unknown event kind {kind!r}")
        self.recorder.emit(code, **columns)

    # ---- steps and books ------------------------------------------------------------------------------------------
    def begin_step(self) -> int:
        """Restart the step's timer (a step otherwise lasts from the previous end_step); the step's number."""
        self._t_step = self.recorder.now_ns()
        return self.steps

    def note(self, **books: int) -> None:
        """The allocator's books at an instant inside the step (same keywords as end_step): for in-step peaks."""
        self.high_water.note_usage(_usage(books))

    def end_step(
        self,
        *,
        batch: int | None = None,
        prefill_tokens: int | None = None,
        decode_tokens: int | None = None,
        dur_ns: int | None = None,
        **books: int,
    ) -> Usage:
        """Close the step: STEP (batch: sequences that appended in it, unless given; dur_ns: since begin_step or
        the previous end_step), STEP_PREFILL / STEP_DECODE (counted from append unless given), the books as ACCT_*
        samples and the in-step peaks. Books, in bytes: capacity, reserved, used (required), logical (default:
        used), reservation, mapped_idle, cached_idle (default 0); internal and free follow from the identities
        capacity = reserved + cached_idle + free, reserved = used + internal + reservation + mapped_idle."""
        usage = _usage(books)  # refused before anything of the step is written
        rec = self.recorder
        took = rec.now_ns() - self._t_step if dur_ns is None else _count("dur_ns", dur_ns)
        n = len(self._batch) if batch is None else _count("batch", batch)
        prefill = self._prefill if prefill_tokens is None else _count("prefill_tokens", prefill_tokens)
        decode = self._decode if decode_tokens is None else _count("decode_tokens", decode_tokens)
        rec.emit(Kind.STEP, n=n, dur_ns=took, aux=-1)
        rec.emit(Kind.STEP_PREFILL, n=prefill)
        rec.emit(Kind.STEP_DECODE, n=decode)
        emit_usage(rec, usage)
        emit_peaks(rec, self.high_water.take(usage))
        rec.end_step()
        self.steps += 1
        rec.step = self.steps  # what happens before the next end_step belongs to the next step
        self._batch.clear()
        self._prefill = self._decode = 0
        self._t_step = rec.now_ns()
        return usage

    # ---- the trace ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Write RUN_END (n = steps) and close the file."""
        self.recorder.close(steps=self.steps)

    def abort(self) -> None:
        self.recorder.abort()

    def trace(self) -> Any:
        """The recorded trace as a kvscope Trace: in memory (path None), or loaded from the file once closed."""
        from kvscope.trace import load_trace, trace_from_recorder

        if self.recorder.path is None:
            return trace_from_recorder(self.recorder)
        if not self.recorder._closed:
            raise ValueError(f"the trace {self.recorder.path} is still being written: close the run first")
        return load_trace(self.recorder.path)


def _usage(books: Mapping[str, int]) -> Usage:
    """Usage from an allocator's books, internal and free derived; one ValueError when they do not add up."""
    known = {"capacity", "reserved", "used", "logical", "reservation", "mapped_idle", "cached_idle"}
    unknown = sorted(set(books) - known)
    if unknown:
        raise ValueError(f"books: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    missing = [k for k in ("capacity", "reserved", "used") if k not in books]
    if missing:
        raise ValueError(f"books: {', '.join(missing)} missing (bytes, from your allocator's own books)")
    b = {k: _count(k, v) for k, v in books.items()}
    reserved, used, cached = b["reserved"], b["used"], b.get("cached_idle", 0)
    reservation, mapped_idle = b.get("reservation", 0), b.get("mapped_idle", 0)
    internal = reserved - used - reservation - mapped_idle
    free = b["capacity"] - reserved - cached
    logical = b.get("logical", used)
    if internal < 0 or free < 0 or logical < used:
        raise ValueError(
            f"books do not add up: need reserved >= used + reservation + mapped_idle, capacity >= reserved + "
            f"cached_idle, logical >= used; got {', '.join(f'{k}={v}' for k, v in sorted(b.items()))}"
        )
    return Usage(b["capacity"], reserved, used, logical, internal, reservation, mapped_idle, cached, free)


def allocator_config(addressing: str, label: str, sizes: Mapping[str, Any]) -> dict[str, Any]:
    """allocator_config of a trace: addressing, label and the sizes its replay needs (a ValueError names a missing
    or bad one)."""
    if addressing not in REQUIRED_SIZES:
        raise ValueError(f"addressing must be one of {', '.join(REQUIRED_SIZES)}, got {addressing!r}")
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"label must be a non-empty string (the run's name in every view), got {label!r}")
    config: dict[str, Any] = {"addressing": addressing, "label": label}
    for key, least in REQUIRED_SIZES[addressing].items():
        if sizes.get(key) is None:
            raise ValueError(f"addressing {addressing!r} needs {key} (its replay reads it)")
        config[key] = _count(key, sizes[key], least)
    config.update({k: v for k, v in sizes.items() if k not in config and v is not None})
    return config


def start(
    path: str | os.PathLike | None = None,
    *,
    source: str,
    addressing: str,
    label: str,
    bytes_per_token: int | None = None,
    spec: Any = None,
    allocator: str | None = None,
    cannot_see: list[str] | tuple[str, ...] = (),
    device: str = "cpu",
    meta: Mapping[str, Any] | None = None,
    **sizes: Any,
) -> Run:
    """Start recording a run of your own engine into `path` (written as it goes; None keeps it in memory:
    `run.trace()`); end it with run.close() (RUN_END) or run.abort() (a trace that loads as cut off). `record` is
    the same as a context manager.

    source: the system that produced the run ("my-engine"); addressing: "blocks" (sizes block_size, num_blocks),
    "pages" (pages, page_size, buffer_row_bytes) or "rows" (rows); label: the run's short name; bytes_per_token, or
    spec (a kvscope.KVSpec: the KV geometry shown with the run); allocator: its name (default: source);
    cannot_see: sentences saying what your events leave out; device: "cpu", "cuda" or "sim"; meta: more run
    metadata (model, engine_config, workload, ...). Other keywords go into allocator_config."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source must name the system that produced the run, got {source!r}")
    if spec is not None:
        spec_dict = spec.to_dict()
    elif bytes_per_token is not None:
        spec_dict = {"name": source, "bytes_per_token": _count("bytes_per_token", bytes_per_token, 1)}
    else:
        raise ValueError("give bytes_per_token (bytes of K and V of one token, all layers) or spec (a KVSpec)")
    bpt = int(spec_dict["bytes_per_token"])
    config = allocator_config(addressing, label, sizes)
    if addressing == "blocks":
        config.setdefault("block_bytes", config["block_size"] * bpt)
    if isinstance(cannot_see, str) or not all(isinstance(s, str) for s in cannot_see):
        raise ValueError("cannot_see takes a list of sentences")
    full: dict[str, Any] = {
        "allocator": allocator or source,
        "allocator_config": config,
        "source": source,
        "cannot_see": list(cannot_see),
        "device": device,
        "model": str(spec_dict.get("name", source)),
        "spec": spec_dict,
        "versions": runmeta.versions("cpu"),
        "start_time": runmeta.start_time(),
        "command": runmeta.command_line(),
    }
    full.update(meta or {})
    if "device_name" not in full:  # asked only when not given: on cuda it queries the driver
        full["device_name"] = runmeta.device_name(device)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return Run(Recorder(path, full), config, bpt)


@contextmanager
def record(path: str | os.PathLike | None = None, **options: Any) -> Iterator[Run]:
    """`start(path, **options)` as a context manager: a clean exit writes RUN_END, an exception leaves a trace that
    loads as cut off (every event before it kept)."""
    run = start(path, **options)
    try:
        yield run
    except BaseException:
        run.abort()
        raise
    run.close()
