"""The one small protocol every KV allocator serves the scheduler through, and its accounting record.

Sequence protocol (all allocators):
    can_admit(prompt_len, final_len) -> bool      room for the prompt now?
    admit(seq, prompt_tokens, final_len) -> int   start a sequence holding 0 tokens (+ prefix-cache hits, returned)
    can_append(seq, n) -> bool / append(seq, tokens)  grow by len(tokens) tokens (token ids matter for prefix hashing)
    fork(parent, child)                           parallel sampling / beam search: child starts with parent's tokens
                                                  (the engine emits FORK; allocators emit only their own events)
    free(seq)                                     release everything the sequence holds
    usage() -> Usage                              the allocator's books, in bytes
    check_invariants()                            raise AssertionError naming the broken invariant

Failing operations raise KVOutOfMemory and leave the allocator exactly as it was (they are atomic).
Every state change emits events on the allocator's recorder (see kvscope.events for what each column means).

Where a sequence's K/V live, for the kernels, is allocator-specific: paged exposes `block_table(seq)`; static and
vmm expose `token_base(seq)` (first token row of the sequence in a flat [rows, kv_heads, head_dim] buffer).
Data movement the executor must do (copy-on-write, fork copies, swaps) is queued in `pending_copies` and drained
by the executor each step; allocators never touch tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.spec import KVSpec


class KVOutOfMemory(RuntimeError):
    """Not enough KV memory for the operation; the allocator state is unchanged."""


@dataclass(frozen=True)
class Usage:
    """Bytes, at one instant. capacity = reserved + cached_idle + free; reserved = used + internal + reservation +
    mapped_idle (waste = reserved - used). `logical` >= `used`: the bytes without any sharing."""

    capacity: int
    reserved: int
    used: int
    logical: int
    internal: int
    reservation: int
    mapped_idle: int
    cached_idle: int
    free: int

    @property
    def waste(self) -> int:
        return self.reserved - self.used

    def check(self) -> None:
        assert self.capacity == self.reserved + self.cached_idle + self.free, f"capacity does not add up: {self}"
        assert self.reserved == self.used + self.internal + self.reservation + self.mapped_idle, (
            f"reserved does not add up: {self}"
        )
        for k, v in asdict(self).items():
            assert v >= 0, f"negative {k}: {self}"
        assert self.logical >= self.used, f"logical < used: {self}"

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class HighWater:
    """The most each quantity of Usage reached since the last `take`: the in-step peaks next to the end-of-step
    Usage samples (a request that finishes in a step holds its memory during that step, so it counts there).

    Allocators call `note` after every state-changing operation. An operation is atomic (it fails whole or
    succeeds whole), so the states between its own events are not observable and not counted. Waste and its split
    (internal, reservation, mapped-idle) are counted only at instants when some sequence holds tokens (used > 0):
    pages a deferred reclaimer keeps mapped after the last request are retention, reported apart, not waste."""

    reserved: int = 0
    used: int = 0
    logical: int = 0
    waste: int = 0
    internal: int = 0
    reservation: int = 0
    mapped_idle: int = 0
    cached_idle: int = 0

    def note(
        self, reserved: int, used: int, logical: int, internal: int, reservation: int, mapped_idle: int, cached: int
    ) -> None:
        if reserved > self.reserved:
            self.reserved = reserved
        if used > self.used:
            self.used = used
        if logical > self.logical:
            self.logical = logical
        if cached > self.cached_idle:
            self.cached_idle = cached
        if used > 0:
            if reserved - used > self.waste:
                self.waste = reserved - used
            if internal > self.internal:
                self.internal = internal
            if reservation > self.reservation:
                self.reservation = reservation
            if mapped_idle > self.mapped_idle:
                self.mapped_idle = mapped_idle

    def note_growth(self, used: int) -> None:
        """The fast path of an append that took no new memory while tokens were already held: only used and
        logical can rise (waste and its split can only fall)."""
        if used > self.used:
            self.used = used
        if used > self.logical:
            self.logical = used

    def note_usage(self, u: Usage) -> None:
        self.note(u.reserved, u.used, u.logical, u.internal, u.reservation, u.mapped_idle, u.cached_idle)

    def take(self, now: Usage) -> HighWater:
        """The peaks since the last take (the current state included), then start again from `now`."""
        self.note_usage(now)
        peaks = HighWater(*(getattr(self, f) for f in self.__slots__))
        for f in self.__slots__:
            setattr(self, f, 0)
        self.note_usage(now)
        return peaks

    @staticmethod
    def of(now: Usage) -> HighWater:
        """The peaks of an allocator that tracks none: the current state alone (an end-of-step sample)."""
        hw = HighWater()
        hw.note_usage(now)
        return hw


@dataclass(frozen=True)
class Copy:
    """Data movement for the executor. kind: 'block' (paged copy-on-write: src/dst block ids), 'rows' (static/vmm
    fork: src/dst token rows, n rows), 'swap_out' / 'swap_in' (paged: GPU block <-> CPU block)."""

    kind: str
    src: int
    dst: int
    n: int = 1


@runtime_checkable
class KVAllocator(Protocol):
    name: str
    spec: KVSpec
    recorder: Recorder
    pending_copies: list[Copy]

    def config(self) -> dict: ...
    def can_admit(self, prompt_len: int, final_len: int) -> bool: ...
    def admit(self, seq: int, prompt_tokens: np.ndarray, final_len: int) -> int: ...
    def can_append(self, seq: int, n: int = 1) -> bool: ...
    def append(self, seq: int, tokens: np.ndarray) -> None: ...
    def fork(self, parent: int, child: int) -> None: ...
    def free(self, seq: int) -> None: ...
    def num_tokens(self, seq: int) -> int: ...
    def usage(self) -> Usage: ...
    def check_invariants(self) -> None: ...


class TokenIds(Protocol):
    """What `append_decode` reads a decode step's token ids from: item i is sequence i's token (a one-token array);
    a list of them, or a view that slices each only when it is asked for."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int, /) -> np.ndarray: ...


@runtime_checkable
class BatchAppends(Protocol):
    """Can append one token to each of many sequences in one call (a decode step), with the books and events
    that one `append` per sequence would leave: `append_decode(seqs, tokens)` appends `tokens[i]` (one token) to
    `seqs[i]` in order, stops at the first that does not fit (its OOM recorded) and returns how many it appended.
    `tokens` is indexable (a list, or a view that slices each token only when it is asked for): an allocator reads
    `tokens[i]` only when it needs the id (prefix hashing, or an append of its own path)."""

    def append_decode(self, seqs: list[int], tokens: TokenIds) -> int: ...


def append_each(alloc: KVAllocator, seqs: list[int], tokens: TokenIds) -> int:
    """`BatchAppends.append_decode` for an allocator without one: one `append` per sequence."""
    if len(seqs) != len(tokens):
        raise ValueError(f"append_decode: {len(seqs)} sequences but {len(tokens)} tokens")
    for done, seq in enumerate(seqs):
        try:
            alloc.append(seq, tokens[done])
        except KVOutOfMemory:
            return done
    return len(seqs)


# ---- capabilities: what the engine, the layouts and the kernels may ask of an allocator beyond the protocol -------
# Asked with isinstance (the protocols are runtime-checkable), never by the allocator's name, so that a new allocator
# gets the engine's support for whatever it can do by having the methods.


@runtime_checkable
class BlockAddressed(Protocol):
    """K/V in a pool of fixed-size blocks found through a per-sequence block table (paged)."""

    block_size: int
    num_blocks: int
    block_bytes: int

    def block_table(self, seq: int) -> list[int]: ...


@runtime_checkable
class RowAddressed(Protocol):
    """A sequence's tokens in consecutive rows of one flat buffer starting at token_base(seq) (static, vmm)."""

    def token_base(self, seq: int) -> int: ...


@runtime_checkable
class ArenaRows(RowAddressed, Protocol):
    """Row-addressed in an arena of `num_rows` token rows that the executor allocates itself (static)."""

    num_rows: int
    capacity_bytes: int


@runtime_checkable
class VirtualBuffers(RowAddressed, Protocol):
    """Row-addressed in virtual buffers the allocator maps itself (vmm): the executor views them in place."""

    backend: Any
    megacache: bool
    buffer_bytes: int
    page_size: int  # bytes of one physical page (the mapping granularity)

    @property
    def buffer_shape(self) -> tuple[int, ...]: ...
    def buffer_addresses(self) -> list[int]: ...


@runtime_checkable
class Swappable(Protocol):
    """Preemption by swapping a sequence's KV to CPU memory and back (paged)."""

    num_cpu_blocks: int

    def can_swap_out(self, seq: int) -> bool: ...
    def swap_out(self, seq: int) -> None: ...
    def can_swap_in(self, seq: int) -> bool: ...
    def swap_in(self, seq: int) -> None: ...
    def is_swapped(self, seq: int) -> bool: ...


@runtime_checkable
class MapsAhead(Protocol):
    """Memory for a sequence's next tokens can be mapped ahead of the append, e.g. on a background thread (vmm)."""

    lock: Any

    def ensure_room(self, seq: int, tokens: int) -> int: ...


@runtime_checkable
class Closable(Protocol):
    """Holds resources (mappings, reservations, handles) to release at the end of a run."""

    def close(self) -> None: ...


def emit_usage(recorder: Recorder, usage: Usage) -> None:
    """One ACCT_* sample per field, in ACCT_FIELDS order: the engine calls this at the end of every step (the fields
    are read one by one, not through dataclasses.asdict, which copies recursively). One `emit_rows` call on a
    Recorder whose emit is the base class's (the samples are of one instant); a recorder that overrides or only
    wraps emit, like the parallel group's, gets one emit each."""
    _emit_samples(recorder, _USAGE_KINDS, _usage_values(usage))


def emit_peaks(recorder: Recorder, peaks: HighWater) -> None:
    """One ACCT_PEAK_* sample per HighWater field, right after the step's ACCT_* samples (as emit_usage)."""
    _emit_samples(recorder, _PEAK_KINDS, _peak_values(peaks))


def usage_rows(usage: Usage) -> list[int]:
    """emit_usage's samples as rows for `Recorder.emit_rows`."""
    return _sample_rows(_USAGE_KINDS, _usage_values(usage))


def peak_rows(peaks: HighWater) -> list[int]:
    """emit_peaks' samples as rows for `Recorder.emit_rows`."""
    return _sample_rows(_PEAK_KINDS, _peak_values(peaks))


def _usage_values(usage: Usage) -> tuple[int, ...]:
    return (
        usage.capacity,
        usage.reserved,
        usage.used,
        usage.logical,
        usage.internal,
        usage.reservation,
        usage.mapped_idle,
        usage.cached_idle,
        usage.free,
    )


def _peak_values(peaks: HighWater) -> tuple[int, ...]:
    return (
        peaks.reserved,
        peaks.used,
        peaks.logical,
        peaks.waste,
        peaks.internal,
        peaks.reservation,
        peaks.mapped_idle,
        peaks.cached_idle,
    )


_USAGE_KINDS = (
    Kind.ACCT_CAPACITY,
    Kind.ACCT_RESERVED,
    Kind.ACCT_USED,
    Kind.ACCT_LOGICAL,
    Kind.ACCT_INTERNAL,
    Kind.ACCT_RESERVATION,
    Kind.ACCT_MAPPED_IDLE,
    Kind.ACCT_CACHED_IDLE,
    Kind.ACCT_FREE,
)
_PEAK_KINDS = (
    Kind.ACCT_PEAK_RESERVED,
    Kind.ACCT_PEAK_USED,
    Kind.ACCT_PEAK_LOGICAL,
    Kind.ACCT_PEAK_WASTE,
    Kind.ACCT_PEAK_INTERNAL,
    Kind.ACCT_PEAK_RESERVATION,
    Kind.ACCT_PEAK_MAPPED_IDLE,
    Kind.ACCT_PEAK_CACHED_IDLE,
)
# A sample row as emit_rows takes it: t_ns, step (the recorder's), kind, seq, block, n, bytes, addr, aux, dur_ns
_SAMPLE_ROW = [0, 0, 0, -1, -1, 0, 0, -1, -1, 0]


def _sample_rows(kinds: tuple[Kind, ...], values: tuple[int, ...]) -> list[int]:
    rows = _SAMPLE_ROW * len(kinds)
    rows[2::10] = kinds
    rows[6::10] = values
    return rows


def _emit_samples(recorder: Recorder, kinds: tuple[Kind, ...], values: tuple[int, ...]) -> None:
    """`emit(kind, bytes=value)` for each pair, in order: one emit_rows call on a Recorder whose emit is the base
    class's, one emit each on any other recorder."""
    if type(recorder).emit is not Recorder.emit:  # emit is overridden (or not a Recorder): it sees every event
        emit = recorder.emit
        for kind, value in zip(kinds, values, strict=True):
            emit(kind, bytes=value)
        return
    recorder.emit_rows(_sample_rows(kinds, values))


def step_peaks(allocator: KVAllocator, now: Usage) -> HighWater:
    """The allocator's in-step peaks when it tracks them (`high_water`), else the end-of-step state alone."""
    hw = getattr(allocator, "high_water", None)
    if not isinstance(hw, HighWater):
        return HighWater.of(now)
    lock = getattr(allocator, "lock", None)  # allocators used from a background thread (VMM map-ahead) have one
    if lock is None:
        return hw.take(now)
    with lock:
        return hw.take(now)
