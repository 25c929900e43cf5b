"""The block replay (blocks.BlockReplay) vectorised, for the fragmentation map: the state of every block at many
steps in one pass of numpy operations, with exactly the results of replaying the events one by one.

Why: the map samples the pool at a few hundred steps; the event-by-event replay spends 10-30 s of Python on a
20-million-event trace to get there. Each block's state depends only on its own events, and on a well-formed trace
those are simple: every holder acquires a block once (BLOCK_ALLOC, BLOCK_COW, BLOCK_SHARE) and releases it once
(BLOCK_FREE), and a fresh block (ALLOC, COW) is taken only when nobody holds it. Then

    ref count      = acquisitions - releases (a cumulative sum per block)
    hashed         = the last of CACHE (yes), EVICT / ALLOC / COW (no)
    table index    = `addr` of the acquisition that took the block from 0 holders to 1
    owner          = the holder that acquired it first among those still holding it (BlockReplay keeps holders in
                     acquisition order and names the first one), the only holder where a block is never shared
    tokens held    = the last APPEND / FORK / PREFIX_HIT of the sequence, none after PREEMPT (recompute), FINISH,
                     REJECT or PRUNE

and the state after the events before a row is a gather of each block's last event before it. `block_sweep`
checks those conditions on the trace (vectorised too) and returns None where any fails (a block named twice by one
holder, a release by a non-holder, a block id outside the pool, ...): the caller then replays event by event,
whose rules for such traces are what the numbers mean. So the results are the same on every trace, by
construction where the checks pass and by using the same code where they do not (tests/test_fragmentation_sweep.py
compares both on real runs, hand-written scripts and random event streams).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached
from kvscope.analysis.replay.base import HELD_KINDS, SWAP_PREEMPTION, config_int, max_unit
from kvscope.analysis.replay.blocks import _BLOCK_KINDS, LEGACY_BLOCK_SIZE, BlockReplay, BlockState
from kvscope.event_store import narrow_dtype
from kvscope.events import Kind

_ALLOC, _SHARE, _FREE, _COW, _CACHE, _EVICT = (int(k) for k in _BLOCK_KINDS)
# The lifecycle events that set or drop a sequence's token count (ARRIVE, also in HELD_KINDS, changes nothing).
_TOKEN_KINDS = tuple(k for k in HELD_KINDS if k != Kind.ARRIVE)
_APPEND, _FORK, _HIT, _PREEMPT = int(Kind.APPEND), int(Kind.FORK), int(Kind.PREFIX_HIT), int(Kind.PREEMPT)
# A dense table indexed by sequence id is used while the ids span at most this many values (else: event by event).
MAX_SEQ_SPAN = 1 << 24
PIECE_ROWS = 1 << 19  # token events are read this many at a time: memory stays bounded by the piece


@dataclass(frozen=True)
class _Intervals:
    """Holdings of the blocks that were ever shared (ref > 1), ordered by block then acquisition: block, the
    holder's dense id, the event index of the acquisition and of the release (len(events) when never released)."""

    block: np.ndarray
    holder: np.ndarray
    start: np.ndarray
    end: np.ndarray


@dataclass
class _State:
    """The blocks after the first `events` block events: ref count, hashed, state code; with the fill: owner
    (dense id), block-table index, hash and fill."""

    events: int
    ref: np.ndarray
    hashed: np.ndarray
    codes: np.ndarray
    owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    hash: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    fill: np.ndarray | None = None


class BlockSweep:
    """Per-event states after each block event (in block order), and the token-count stream, for `states_at`."""

    def __init__(self, trace, n: int, block_size: int, ev: dict[str, np.ndarray], seq_lo: int, span: int) -> None:
        self.trace = trace
        self.n = n
        self.block_size = block_size
        self.seq_lo = seq_lo
        self.span = span
        self.block = ev["block"]  # (every per-event array in the narrowest dtype that holds it: 3 M block events)
        self.rows = ev["rows"]  # row positions of the block events (to find how many come before a row)
        self.count = len(self.block)
        order = np.argsort(ev["block"], kind="stable")  # block order, row order within a block (16-bit: by radix)
        self._prepare(ev, order.astype(narrow_dtype(0, self.count)))

    # ---- per-event states ------------------------------------------------------------------------------------
    def _prepare(self, ev: dict[str, np.ndarray], order: np.ndarray) -> None:
        code, block = ev["code"][order], ev["block"][order]
        start = np.r_[True, block[1:] != block[:-1]] if len(block) else np.zeros(0, bool)
        index_type = narrow_dtype(-1, self.count + 1)
        first = np.maximum.accumulate(np.where(start, np.arange(len(block), dtype=index_type), 0))  # block's first
        del start
        delta = _delta(code)
        total: np.ndarray = np.cumsum(delta, dtype=index_type)
        ref = total - (total[first] - delta[first])
        del total
        self.valid = bool((ref >= 0).all())
        fresh = (code == _ALLOC) | (code == _COW)
        self.valid &= bool((ref[fresh] == 1).all())  # a fresh block only when nobody holds it
        acquire = delta > 0
        dense = narrow_dtype(-1, self.span)
        sorted_seq = (ev["seq"][order].astype(np.int64) - self.seq_lo).astype(dense)
        self.shared = bool(len(ref)) and int(ref.max()) > 1
        if self.valid and not self.shared:
            # ref alternates 0, 1: a release must be by the holder of the acquisition before it
            last_acq = _ffill(acquire, first)
            rel = delta < 0
            self.valid &= bool((last_acq[rel] >= 0).all()) and bool(
                (sorted_seq[last_acq[rel]] == sorted_seq[rel]).all()
            )
            del last_acq, rel
        self.intervals: _Intervals | None = None
        if self.valid and self.shared:
            self.intervals = self._holdings(block, sorted_seq, delta, order, ref)
        del block
        # Each *_after array has one more slot at the end: the state of a block before its first event.
        at = _ffill(fresh | (code == _CACHE) | (code == _EVICT), first)
        self.hashed_after = _after(code == _CACHE, at, False)
        cache = code == _CACHE  # the hash a block shows is its last CACHE's, kept after eviction (as BlockReplay)
        self.hash_after = _after(ev["aux"][order], _ffill(cache, first), 0)
        took = acquire & (ref == 1)  # 0 -> 1 holders: sets the block-table index (and the owner)
        at = _ffill(took, first)
        self.index_after = _after(ev["addr"][order], at, -1)
        self.owner_after = _after(sorted_seq, at, -1)
        self.ref_after = _after(ref.astype(narrow_dtype(0, int(ref.max()) if len(ref) else 0)), None, 0)
        # event (row order) -> its slot in block order; the last entry, reached by index -1, is that extra slot
        slot: np.ndarray = np.empty(len(order) + 1, index_type)
        slot[order] = np.arange(len(order), dtype=index_type)
        slot[-1] = len(order)
        self.slot_of_event = slot

    def _holdings(
        self, block: np.ndarray, seq: np.ndarray, delta: np.ndarray, order: np.ndarray, ref: np.ndarray
    ) -> _Intervals | None:
        """Every holding (acquire .. release) of the shared blocks; None (not valid) when one holder's events on a
        block do not alternate acquire, release, acquire, ..."""
        moving = delta != 0
        pos = order[moving]  # event indices (row order) of the acquires and releases, in block order
        blk, holder, d = block[moving], seq[moving], delta[moving]
        pair = np.lexsort((holder, blk))  # stable: row order within one (block, holder)
        blk, holder, d, pos = blk[pair], holder[pair], d[pair], pos[pair]
        start = np.r_[True, (blk[1:] != blk[:-1]) | (holder[1:] != holder[:-1])] if len(blk) else np.zeros(0, bool)
        first = np.maximum.accumulate(np.where(start, np.arange(len(blk)), 0))
        total = np.cumsum(d, dtype=np.int64)
        held = total - (total[first] - d[first])
        if not ((held == 0) | (held == 1)).all():
            self.valid = False
            return None
        ever_shared = np.zeros(self.n, bool)
        ever_shared[block[ref > 1]] = True
        acq = np.flatnonzero((d > 0) & ever_shared[blk])
        nxt = acq + 1
        released = (nxt < len(blk)) & ~np.r_[start, True][np.minimum(nxt, len(blk))]
        end = np.where(released, pos[np.minimum(nxt, len(blk) - 1)], self.count)
        by = np.lexsort((pos[acq], blk[acq]))
        return _Intervals(blk[acq][by], holder[acq][by], pos[acq][by], end[by])

    # ---- states at cuts --------------------------------------------------------------------------------------
    def states_at(self, cuts: list[int], with_fill: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """For each row position in `cuts` (ascending), the state after the events before it: (state codes per
        block (BlockState, int8), tokens filled per block (BlockReplay.frame's `fill`) when with_fill else None)."""
        for state in self._states(cuts, with_fill):
            yield state.codes, state.fill

    def frame_at(self, cut: int) -> pd.DataFrame:
        """BlockReplay.frame() after the events before row `cut`: one row per block, every column equal."""
        state = next(self._states([cut], True))
        assert state.fill is not None
        n, bs = self.n, self.block_size
        ref = state.ref.astype(np.int64)
        active = ref > 0
        seqs = np.full(n, "", dtype=object)
        owner = state.owner.astype(np.int64) + self.seq_lo
        seqs[active] = [str(o) for o in owner[active].tolist()]
        for b, holders in self._holders(state.events).items():
            if len(holders) > 1:
                seqs[b] = ",".join(str(h + self.seq_lo) for h in holders)
        columns = {
            "unit": np.arange(n, dtype=np.int64),
            "state": pd.Categorical.from_codes(state.codes, categories=list(BlockReplay.states)),
            "fill": state.fill,
            "capacity_tokens": np.full(n, bs, np.int64),
            "ref_count": ref,
            "seqs": seqs,
            "slot": np.full(n, -1, np.int64),
            "table_index": np.where(active, state.index, -1).astype(np.int64),
            "hashed": state.hashed,
            "hash": np.where(state.hashed, state.hash, 0).astype(np.int64),
        }
        return pd.DataFrame(columns)

    def _states(self, cuts: list[int], with_fill: bool) -> Iterator[_State]:
        upto = np.searchsorted(self.rows, np.asarray(cuts, np.int64), side="left").tolist()
        last = np.full(self.n, -1, np.int64)  # each block's last event so far; -1 (none) picks the sentinel slot
        tokens = _TokenStream(self.trace, self.seq_lo, self.span, np.asarray(cuts, np.int64)) if with_fill else None
        done = 0
        for k, e in enumerate(upto):
            if e > done:
                np.maximum.at(last, self.block[done:e], np.arange(done, e, dtype=np.int64))
                done = e
            at = self.slot_of_event[last]
            ref, hashed = self.ref_after[at], self.hashed_after[at]
            state = _State(e, ref, hashed, _codes(ref, hashed))
            if tokens is not None:
                held = tokens.advance(k)
                state.owner = self.owner_after[at]
                if self.intervals is not None:
                    self._shared_owners(state.owner, e)
                state.index, state.hash = self.index_after[at], self.hash_after[at]
                state.fill = self._fill(ref, hashed, state.owner, state.index, held)
            yield state

    def _holders(self, e: int) -> dict[int, list[int]]:
        """The holders (dense ids, in acquisition order) of the shared blocks after events [0, e)."""
        iv = self.intervals
        if iv is None:
            return {}
        alive = np.flatnonzero((iv.start < e) & (iv.end >= e))
        out: dict[int, list[int]] = {}
        for b, h in zip(iv.block[alive].tolist(), iv.holder[alive].tolist(), strict=True):
            out.setdefault(b, []).append(h)
        return out

    def _shared_owners(self, owner: np.ndarray, e: int) -> None:
        """The owner of each shared block after events [0, e): its earliest-acquired holding still held."""
        iv = self.intervals
        assert iv is not None
        alive = np.flatnonzero((iv.start < e) & (iv.end >= e))
        if not len(alive):
            return
        b = iv.block[alive]
        head = alive[np.r_[True, b[1:] != b[:-1]]]
        owner[iv.block[head]] = iv.holder[head]

    def _fill(
        self, ref: np.ndarray, hashed: np.ndarray, owner: np.ndarray, index: np.ndarray, held: np.ndarray
    ) -> np.ndarray:
        """BlockReplay.frame's fill: tokens of the holder in the block (all of it when the holder's count is
        unknown), full for a cached-idle block, 0 for a free one."""
        bs = self.block_size
        active = ref > 0
        own = np.where(active & (owner >= 0), held[np.clip(owner, 0, self.span - 1)], -1)
        fill = np.clip(own - index.astype(np.int64) * bs, 0, bs)
        fill[own < 0] = bs
        fill[~active] = np.where(hashed[~active], bs, 0)
        return fill.astype(np.int64)


class _TokenStream:
    """Tokens held per sequence (dense id), moved forward cut by cut through the token events, a piece at a time."""

    def __init__(self, trace, seq_lo: int, span: int, cuts: np.ndarray) -> None:
        store = trace.store
        self.kinds = [int(k) for k in _TOKEN_KINDS]
        self.upto = store.count_before(self.kinds, cuts).tolist()
        self.held = np.full(span, -1, np.int64)
        self.scratch = np.full(span, -1, np.int64)
        self.seq_lo = seq_lo
        self.pieces = store.pieces(self.kinds, ["seq", "n", "aux"], size=PIECE_ROWS)
        self.piece: dict[str, np.ndarray] | None = None
        self.piece_at = 0  # token-event index of the piece's first row
        self.done = 0  # token events applied

    def advance(self, k: int) -> np.ndarray:
        target = self.upto[k]
        while self.done < target:
            if self.piece is None or self.done >= self.piece_at + len(self.piece["code"]):
                if self.piece is not None:
                    self.piece_at += len(self.piece["code"])
                self.piece = next(self.pieces)
                continue
            a = self.done - self.piece_at
            b = min(target - self.piece_at, len(self.piece["code"]))
            self._apply({c: v[a:b] for c, v in self.piece.items()})
            self.done = self.piece_at + b
        return self.held

    def _apply(self, p: dict[str, np.ndarray]) -> None:
        code = p["code"]
        keep = ~((code == _PREEMPT) & (p["aux"] == SWAP_PREEMPTION))  # a swapped-out sequence keeps its tokens
        seq = p["seq"][keep].astype(np.int64) - self.seq_lo
        code, n, aux = code[keep], p["n"][keep], p["aux"][keep]
        value = np.where(code == _APPEND, aux, np.where((code == _FORK) | (code == _HIT), n, -1)).astype(np.int64)
        # the last event of each sequence in this stretch wins (np.maximum.at is exact with repeated indices)
        rank = np.arange(len(seq), dtype=np.int64)
        np.maximum.at(self.scratch, seq, rank)
        wins = self.scratch[seq] == rank
        self.held[seq[wins]] = value[wins]
        self.scratch[seq] = -1


def _delta(code: np.ndarray) -> np.ndarray:
    acquire = (code == _ALLOC) | (code == _COW) | (code == _SHARE)
    one, none, zero = np.int8(1), np.int8(-1), np.int8(0)  # (int8 throughout: no int64 arrays in between)
    return np.where(acquire, one, np.where(code == _FREE, none, zero))


def _ffill(marks: np.ndarray, first: np.ndarray) -> np.ndarray:
    """For each element, the index of the last marked element at or before it within its group (group starts at
    `first`), -1 where none."""
    if not len(marks):
        return np.zeros(0, first.dtype)
    at = np.maximum.accumulate(np.where(marks, np.arange(len(marks), dtype=first.dtype), first.dtype.type(-1)))
    return np.where(at >= first, at, first.dtype.type(-1))


def _after(values: np.ndarray, at: np.ndarray | None, none) -> np.ndarray:
    """values[at] (none where at is -1, or values themselves when at is None), with one more slot, holding `none`,
    at the end."""
    picked = values if at is None else np.where(at >= 0, values[np.maximum(at, 0)], none)
    out = np.empty(len(picked) + 1, np.result_type(picked.dtype, np.min_scalar_type(none)))
    out[:-1] = picked
    out[-1] = none
    return out


def _codes(ref: np.ndarray, hashed: np.ndarray) -> np.ndarray:
    S = BlockState
    out = np.where(ref >= 2, S.SHARED, np.where(ref == 1, S.ACTIVE, np.where(hashed, S.CACHED_IDLE, S.FREE)))
    return out.astype(np.int8)


def block_sweep(trace) -> BlockSweep | None:
    """The trace's BlockSweep (cached), or None where it does not apply: not a block-addressed trace, or events the
    vectorised rules do not cover (see the module docstring): then replay event by event."""
    return cached(trace, "block_sweep", lambda: _build(trace))


def _build(trace) -> BlockSweep | None:
    from kvscope.analysis.replay import replay_class

    if replay_class(trace).addressing != "blocks":
        return None
    store = trace.store
    kinds = [int(k) for k in _BLOCK_KINDS]
    n = config_int(trace, "num_blocks")
    if n <= 0:
        n = max_unit(trace, _BLOCK_KINDS) + 1
    blocks = store.value_range("block", kinds)
    if blocks is not None and (blocks[0] < 0 or blocks[1] >= n):
        return None  # BlockReplay grows the pool (or indexes from the end): its rules, not these
    seqs = [r for r in (store.value_range("seq", kinds), store.value_range("seq", [int(k) for k in _TOKEN_KINDS]))]
    seqs = [r for r in seqs if r is not None]
    seq_lo = min((r[0] for r in seqs), default=0)
    span = max((r[1] for r in seqs), default=0) - seq_lo + 1
    if span > MAX_SEQ_SPAN:
        return None
    ev = {"rows": store.rows(kinds)}
    ev["rows"] = ev["rows"].astype(narrow_dtype(0, len(store)))
    for name in ("block", "seq", "addr", "aux"):  # each in the narrowest dtype that holds its values
        span_of = store.value_range(name, kinds) or (0, 0)
        ev[name] = store.values(name, kinds, narrow_dtype(min(span_of[0], -1), span_of[1]))
    positions = store.positions(kinds)
    ev["code"] = (
        store.lookup[store.selection(positions)]
        if len(positions) > 1
        else np.full(len(ev["block"]), int(store.lookup[positions[0]]) if positions else -1, np.int16)
    )
    sweep = BlockSweep(trace, n, config_int(trace, "block_size", LEGACY_BLOCK_SIZE), ev, seq_lo, span)
    return sweep if sweep.valid else None
