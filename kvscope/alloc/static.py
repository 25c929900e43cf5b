"""Static reservation (FasterTransformer / Orca): every admitted sequence reserves a contiguous run of token rows.

The arena is `capacity_bytes // bytes_per_token` token rows (one row = one token's K and V in every layer). On
admission a sequence reserves R rows, first fit over the free ranges, and keeps them until it is freed:

    max    R = max_len                                   (FasterTransformer: every request gets the longest context)
    pow2   R = next power of two >= final_len, <= max_len   (Orca "pow2")
    oracle R = final_len                                 (Orca "oracle": the final length known in advance)

Free ranges are never compacted, so external fragmentation (free rows in pieces too small for the next request) is
real and visible in the trace. Accounting per live sequence holding t tokens of a final length F in R rows:
used = t, reservation = max(F - t, 0) (rows kept for tokens not generated yet), internal = R - t - reservation
(rows beyond the final length, never to be filled).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvscope.alloc.base import Copy, HighWater, KVOutOfMemory, Usage
from kvscope.alloc.registry import AllocatorEntry, BuildContext, Option, register
from kvscope.events import Kind
from kvscope.recorder import NullRecorder, Recorder
from kvscope.spec import KVSpec
from kvscope.units import check_int

VARIANTS = ("max", "pow2", "oracle")


@dataclass(slots=True)
class _Reservation:
    base: int  # first row in the arena
    rows: int  # R
    final_len: int
    tokens: int = 0


class StaticAllocator:
    name = "static"

    def __init__(
        self,
        spec: KVSpec,
        capacity_bytes: int,
        recorder: Recorder | None = None,
        *,
        max_len: int,
        variant: str = "max",
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"static allocator: unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
        max_len = check_int("static allocator: max_len", max_len, 1)
        capacity_bytes = check_int("static allocator: capacity_bytes", capacity_bytes, 0)
        self.spec = spec
        self.bytes_per_token = spec.bytes_per_token
        self.num_rows = capacity_bytes // self.bytes_per_token
        if self.num_rows <= 0:
            raise ValueError(
                f"static allocator: capacity_bytes={capacity_bytes} holds no token of {self.bytes_per_token} bytes"
            )
        self.capacity_bytes = capacity_bytes
        self.max_len = max_len
        self.variant = variant
        self.recorder = recorder if recorder is not None else NullRecorder()
        self.pending_copies: list[Copy] = []
        self._seqs: dict[int, _Reservation] = {}
        # Free ranges, sorted by start and always coalesced: parallel lists of starts and lengths.
        self._free_starts: list[int] = [0]
        self._free_lens: list[int] = [self.num_rows]
        # Running totals over live sequences (rows reserved, tokens held, rows held for tokens not generated yet),
        # so that usage() and the high-water marks noted after every operation are O(1).
        self._rows_taken = 0
        self._tokens = 0
        self._pending = 0
        self.high_water = HighWater()

    def config(self) -> dict:
        return {
            "addressing": "rows",  # how analysis replays this trace (kvscope.analysis.replay)
            "label": f"static {self.variant}",
            "variant": self.variant,
            "max_len": self.max_len,
            "rows": self.num_rows,
        }

    # ---- sizing ---------------------------------------------------------------------------------------------
    def rows_for(self, final_len: int) -> int:
        """R: the rows a sequence of final length `final_len` reserves under this variant."""
        if self.variant == "max":
            return self.max_len
        if self.variant == "pow2":
            return min(1 << (final_len - 1).bit_length(), self.max_len)
        return final_len

    def _first_fit(self, rows: int) -> int:
        """Index of the first free range of at least `rows` rows, or -1."""
        for i, length in enumerate(self._free_lens):
            if length >= rows:
                return i
        return -1

    def largest_free_range(self) -> int:
        """Rows of the largest free range (what the next reservation can be at most)."""
        return max(self._free_lens, default=0)

    # ---- protocol -------------------------------------------------------------------------------------------
    def can_admit(self, prompt_len: int, final_len: int) -> bool:
        if final_len > self.max_len or final_len < max(prompt_len, 1):
            return False
        return self._first_fit(self.rows_for(final_len)) >= 0

    def admit(self, seq: int, prompt_tokens: np.ndarray, final_len: int) -> int:
        if seq in self._seqs:
            raise KeyError(f"static allocator: sequence {seq} is already admitted")
        prompt_len = len(prompt_tokens)
        if final_len > self.max_len:
            raise ValueError(f"sequence {seq}: final length {final_len} exceeds max_len={self.max_len}")
        if final_len < max(prompt_len, 1):
            raise ValueError(f"sequence {seq}: final length {final_len} is shorter than its prompt ({prompt_len})")
        self._hold(seq, self._reserve(seq, self.rows_for(final_len), final_len))
        self._note()
        return 0

    def can_append(self, seq: int, n: int = 1) -> bool:
        r = self._get(seq)
        return r.tokens + n <= r.rows

    def append(self, seq: int, tokens: np.ndarray) -> None:
        r = self._get(seq)
        n = len(tokens)
        if r.tokens + n > r.rows:
            self._oom(seq, n, f"sequence {seq}: {r.tokens} + {n} tokens exceed its reservation of {r.rows} rows")
        self._pending -= max(r.final_len - r.tokens, 0) - max(r.final_len - r.tokens - n, 0)
        r.tokens += n
        held_before = self._tokens
        self._tokens += n
        self.recorder.emit(Kind.APPEND, seq=seq, n=n, aux=r.tokens)
        if held_before:  # reservations are fixed: only used (and logical, the same here) can rise
            self.high_water.note_growth(self._tokens * self.bytes_per_token)
        else:
            self._note()

    def fork(self, parent: int, child: int) -> None:
        p = self._get(parent)
        if child in self._seqs:
            raise KeyError(f"static allocator: fork child {child} is already admitted")
        c = self._reserve(child, p.rows, p.final_len)
        c.tokens = p.tokens
        self._hold(child, c)
        self.pending_copies.append(Copy("rows", p.base, c.base, p.tokens))
        self._note()

    def free(self, seq: int) -> None:
        r = self._get(seq)
        del self._seqs[seq]
        self._rows_taken -= r.rows
        self._tokens -= r.tokens
        self._pending -= max(r.final_len - r.tokens, 0)
        self._release_range(r.base, r.rows)
        self.recorder.emit(Kind.STATIC_RELEASE, seq=seq, addr=r.base, n=r.rows, bytes=r.rows * self.bytes_per_token)
        self._note()

    def num_tokens(self, seq: int) -> int:
        return self._get(seq).tokens

    def token_base(self, seq: int) -> int:
        """First arena row of the sequence (its token i lives in row token_base + i)."""
        return self._get(seq).base

    def reserved_rows(self, seq: int) -> int:
        return self._get(seq).rows

    def live_sequences(self) -> list[int]:
        return list(self._seqs)

    def usage(self) -> Usage:
        reserved, used, reservation = self._rows_taken, self._tokens, self._pending
        bpt = self.bytes_per_token
        return Usage(
            capacity=self.num_rows * bpt,
            reserved=reserved * bpt,
            used=used * bpt,
            logical=used * bpt,
            internal=(reserved - used - reservation) * bpt,
            reservation=reservation * bpt,
            mapped_idle=0,
            cached_idle=0,
            free=(self.num_rows - reserved) * bpt,
        )

    def check_invariants(self) -> None:
        spans = [(r.base, r.rows, f"seq {s}") for s, r in self._seqs.items()]
        spans += [(b, n, "free") for b, n in zip(self._free_starts, self._free_lens, strict=True)]
        spans.sort()
        pos = 0
        prev_free = False
        for base, rows, what in spans:
            assert base == pos, f"arena not tiled at row {pos}: next span is {what} at {base}"
            assert rows > 0, f"empty span {what} at {base}"
            is_free = what == "free"
            assert not (is_free and prev_free), f"free ranges not coalesced at row {base}"
            prev_free = is_free
            pos = base + rows
        assert pos == self.num_rows, f"arena tiles {pos} rows, not {self.num_rows}"
        assert self._free_starts == sorted(self._free_starts), "free ranges out of order"
        for s, r in self._seqs.items():
            assert 0 <= r.tokens <= r.rows, f"seq {s}: {r.tokens} tokens in {r.rows} rows"
            assert r.rows <= self.max_len, f"seq {s}: {r.rows} rows > max_len"
        totals = (
            sum(r.rows for r in self._seqs.values()),
            sum(r.tokens for r in self._seqs.values()),
            sum(max(r.final_len - r.tokens, 0) for r in self._seqs.values()),
        )
        assert totals == (self._rows_taken, self._tokens, self._pending), (
            f"running totals {(self._rows_taken, self._tokens, self._pending)} != live sequences' {totals}"
        )

    # ---- internals ------------------------------------------------------------------------------------------
    def _hold(self, seq: int, r: _Reservation) -> None:
        self._seqs[seq] = r
        self._rows_taken += r.rows
        self._tokens += r.tokens
        self._pending += max(r.final_len - r.tokens, 0)

    def _note(self) -> None:
        bpt = self.bytes_per_token
        rows, used, pending = self._rows_taken, self._tokens, self._pending
        self.high_water.note(rows * bpt, used * bpt, used * bpt, (rows - used - pending) * bpt, pending * bpt, 0, 0)

    def _get(self, seq: int) -> _Reservation:
        try:
            return self._seqs[seq]
        except KeyError:
            raise KeyError(f"static allocator: unknown sequence {seq}") from None

    def _oom(self, seq: int, n: int, message: str) -> None:
        self.recorder.emit(Kind.OOM, seq=seq, n=n, bytes=n * self.bytes_per_token)
        raise KVOutOfMemory(message)

    def _reserve(self, seq: int, rows: int, final_len: int) -> _Reservation:
        i = self._first_fit(rows)
        if i < 0:
            self._oom(
                seq, rows, f"sequence {seq}: no free range of {rows} rows (largest is {self.largest_free_range()})"
            )
        base = self._free_starts[i]
        if self._free_lens[i] == rows:
            del self._free_starts[i]
            del self._free_lens[i]
        else:
            self._free_starts[i] += rows
            self._free_lens[i] -= rows
        self.recorder.emit(Kind.STATIC_RESERVE, seq=seq, addr=base, n=rows, bytes=rows * self.bytes_per_token)
        return _Reservation(base, rows, final_len)

    def _release_range(self, base: int, rows: int) -> None:
        starts, lens = self._free_starts, self._free_lens
        i = bisect.bisect_left(starts, base)
        merge_prev = i > 0 and starts[i - 1] + lens[i - 1] == base
        merge_next = i < len(starts) and base + rows == starts[i]
        if merge_prev and merge_next:
            lens[i - 1] += rows + lens[i]
            del starts[i]
            del lens[i]
        elif merge_prev:
            lens[i - 1] += rows
        elif merge_next:
            starts[i] = base
            lens[i] += rows
        else:
            starts.insert(i, base)
            lens.insert(i, rows)


# ---- registry entry ----------------------------------------------------------------------------------------------
def _build(context: BuildContext, options: Mapping[str, Any]) -> StaticAllocator:
    variant = "max" if options["static_variant"] is None else options["static_variant"]
    return StaticAllocator(
        context.spec, context.capacity_bytes, context.recorder, max_len=context.max_len, variant=variant
    )


ENTRY = register(
    AllocatorEntry(
        name="static",
        description="a contiguous reservation per request: max_len (FasterTransformer), pow2 or oracle (Orca)",
        build=_build,
        addressing="rows",
        options=(Option("static_variant", "--static-variant"),),
        legacy_label=lambda config: f"static {config['variant']}",
    )
)
