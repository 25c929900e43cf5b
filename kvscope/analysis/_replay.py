"""Replay of the fine-grained events into per-unit state (blocks, pages, arena rows), with checkpoints.

One Replay class per allocator keeps the state in Python lists and dicts (cheap per-event updates) and turns it
into numpy arrays on demand. `Timeline` owns one live replay that only moves forward, and saves a compact
snapshot every `interval` relevant events on the way; the state at any step is then the nearest snapshot at or
before it plus at most `interval` events. So the first look at a late step costs one pass over the events, and
every later look at any step costs one restore plus a bounded replay.

Which events move which state is written next to each handler; the column meanings are kvscope.events'.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached, column, config_value, end_of_step, kind_codes, mask, select
from kvscope.events import Kind
from kvscope.spec import DTYPE_BYTES

# Snapshots are taken every max(MIN_INTERVAL, events / MAX_CHECKPOINTS) relevant events, fewer when the pool is big
# (each snapshot holds a few arrays of one entry per unit), so checkpoint memory stays bounded.
MIN_INTERVAL = 8192
MAX_CHECKPOINTS = 128
CHECKPOINT_BUDGET_BYTES = 256 << 20

# Lifecycle events every replay reads to know how many tokens each sequence holds.
_HELD_KINDS = (Kind.APPEND, Kind.FORK, Kind.PREFIX_HIT, Kind.PREEMPT, Kind.FINISH, Kind.REJECT, Kind.ARRIVE)

A_APPEND, A_FORK, A_HIT, A_PREEMPT, A_FINISH, A_REJECT, A_ARRIVE = (int(k) for k in _HELD_KINDS)


class Events:
    """The relevant events as numpy columns (code, seq, block, n, addr, aux); rows(lo, hi) iterates Python tuples.
    Kept as arrays (48 bytes an event) rather than a list of tuples (several times more) for million-event traces."""

    def __init__(self, *columns: np.ndarray) -> None:
        self.columns = [np.asarray(c, dtype=np.int64) for c in columns]

    def __len__(self) -> int:
        return len(self.columns[0])

    def rows(self, lo: int, hi: int):
        return zip(*(c[lo:hi].tolist() for c in self.columns), strict=True)


class Replay:
    """State of one allocator's units, moved forward event by event."""

    kinds: tuple[Kind, ...] = ()
    states: tuple[str, ...] = ()

    def __init__(self, trace) -> None:
        self.trace = trace
        self.held: dict[int, int] = {}  # seq -> tokens held now

    # ---- held tokens (shared by all allocators) --------------------------------------------------------------
    def _held_event(self, code: int, seq: int, n: int, aux: int) -> None:
        if code == A_APPEND:
            self.held[seq] = aux
        elif code in (A_FORK, A_HIT):  # a fork starts with n tokens; an admit with its n prefix hits
            self.held[seq] = n
        elif code == A_PREEMPT:
            if aux != 1:  # recompute drops the tokens; a swapped-out sequence keeps them (on the CPU)
                self.held.pop(seq, None)
        elif code in (A_FINISH, A_REJECT):
            self.held.pop(seq, None)

    # ---- to implement ----------------------------------------------------------------------------------------
    def apply(self, ev: Events, lo: int, hi: int) -> None:
        raise NotImplementedError

    def snapshot(self) -> Any:
        raise NotImplementedError

    def restore(self, snap: Any) -> None:
        raise NotImplementedError

    def frame(self) -> pd.DataFrame:
        """block_states rows for the current state."""
        raise NotImplementedError

    def codes(self) -> np.ndarray:
        """State index (into `states`) of every unit, int8; for the fragmentation map."""
        raise NotImplementedError


STATE_COLUMNS = ["unit", "state", "fill", "capacity_tokens", "ref_count", "seqs", "slot"]


def _frame(columns: dict[str, Any], states: tuple[str, ...], extra: list[str]) -> pd.DataFrame:
    """columns["state"] holds state indices; it becomes a categorical over `states`."""
    codes = np.asarray(columns["state"], dtype=np.int8)
    columns = dict(columns, state=pd.Categorical.from_codes(codes, categories=list(states)))
    return pd.DataFrame({c: columns[c] for c in STATE_COLUMNS + extra})


# ---- paged ------------------------------------------------------------------------------------------------------
class PagedReplay(Replay):
    """Blocks: ref count (= number of holders), one holder and its block-table index, the holders of shared blocks,
    and whether the block carries a prefix hash. Fill comes from the holder's token count and the block's index."""

    kinds = (
        Kind.BLOCK_ALLOC,
        Kind.BLOCK_SHARE,
        Kind.BLOCK_FREE,
        Kind.BLOCK_COW,
        Kind.BLOCK_CACHE,
        Kind.BLOCK_EVICT,
        *_HELD_KINDS,
    )
    states = ("free", "active", "shared", "cached_idle")

    def __init__(self, trace) -> None:
        super().__init__(trace)
        self.block_size = int(config_value(trace, "block_size", 16) or 16)
        n = int(config_value(trace, "num_blocks", 0) or 0)
        if n <= 0:
            n = _max_block(trace, self.kinds[:6]) + 1
        self.n = n
        self.ref = [0] * n
        self.owner = [-1] * n
        self.index = [-1] * n
        self.hashed = [False] * n
        self.hash = [0] * n
        self.multi: dict[int, tuple[int, ...]] = {}  # block -> all holders, for blocks with ref > 1

    def _grow(self, b: int) -> None:
        extra = b + 1 - self.n
        for lst, v in ((self.ref, 0), (self.owner, -1), (self.index, -1), (self.hashed, False), (self.hash, 0)):
            lst.extend([v] * extra)
        self.n = b + 1

    def apply(self, ev: Events, lo: int, hi: int) -> None:
        ALLOC, SHARE, FREE, COW, CACHE, EVICT = (int(k) for k in self.kinds[:6])
        ref, owner, index, hashed, multi = self.ref, self.owner, self.index, self.hashed, self.multi
        for code, seq, b, n, addr, aux in ev.rows(lo, hi):
            if b >= self.n:
                self._grow(b)
                ref, owner, index, hashed = self.ref, self.owner, self.index, self.hashed
            if code in (ALLOC, COW):
                # A fresh block (COW: the writer's private copy; the source loses the writer by a BLOCK_FREE).
                ref[b] = 1
                owner[b] = seq
                index[b] = addr
                hashed[b] = False
                multi.pop(b, None)
            elif code == SHARE:
                r = ref[b]
                if r == 0:  # a cached-idle block touched again
                    ref[b] = 1
                    owner[b] = seq
                    index[b] = addr
                else:
                    holders = multi.get(b) or (owner[b],)
                    if seq not in holders:
                        multi[b] = (*holders, seq)
                        ref[b] = r + 1
            elif code == FREE:
                r = ref[b]
                if r == 1:
                    if owner[b] == seq:
                        ref[b] = 0
                elif r > 1:
                    holders = multi.get(b, (owner[b],))
                    if seq in holders:
                        rest = tuple(h for h in holders if h != seq)
                        ref[b] = len(rest)
                        owner[b] = rest[0]
                        if len(rest) > 1:
                            multi[b] = rest
                        else:
                            multi.pop(b, None)
            elif code == CACHE:
                hashed[b] = True
                self.hash[b] = aux
            elif code == EVICT:
                hashed[b] = False
            else:
                self._held_event(code, seq, n, aux)

    def snapshot(self) -> Any:
        return (
            np.array(self.ref, np.int32),
            np.array(self.owner, np.int64),
            np.array(self.index, np.int32),
            np.array(self.hashed, np.bool_),
            np.array(self.hash, np.int64),
            dict(self.multi),
            dict(self.held),
        )

    def restore(self, snap: Any) -> None:
        ref, owner, index, hashed, hsh, multi, held = snap
        self.ref, self.owner, self.index = ref.tolist(), owner.tolist(), index.tolist()
        self.hashed, self.hash = hashed.tolist(), hsh.tolist()
        self.multi, self.held = dict(multi), dict(held)
        self.n = len(self.ref)

    def codes(self) -> np.ndarray:
        ref = np.array(self.ref, np.int32)
        hashed = np.array(self.hashed, np.bool_)
        out = np.where(ref >= 2, 2, np.where(ref == 1, 1, np.where(hashed, 3, 0)))
        return out.astype(np.int8)

    def frame(self) -> pd.DataFrame:
        bs = self.block_size
        ref = np.array(self.ref, np.int64)
        owner = np.array(self.owner, np.int64)
        index = np.array(self.index, np.int64)
        hashed = np.array(self.hashed, np.bool_)
        codes = self.codes()
        active = np.flatnonzero(ref > 0)
        held = self.held
        fill = np.where(hashed & (ref == 0), bs, 0).astype(np.int64)
        own_held = np.array([held.get(o, -1) for o in owner[active].tolist()], np.int64)
        fill_active = np.clip(own_held - index[active] * bs, 0, bs)
        fill_active[own_held < 0] = bs  # holder's token count unknown (trace cut mid-step): assume full
        fill[active] = fill_active
        seqs = np.full(self.n, "", dtype=object)
        multi = self.multi
        seqs[active] = [
            ",".join(map(str, multi[b])) if b in multi else str(o)
            for b, o in zip(active.tolist(), owner[active].tolist(), strict=True)
        ]
        hash_col = np.where(hashed, np.array(self.hash, np.int64), 0)
        return _frame(
            {
                "unit": np.arange(self.n, dtype=np.int64),
                "state": codes,
                "fill": fill,
                "capacity_tokens": np.full(self.n, bs, np.int64),
                "ref_count": ref,
                "seqs": seqs,
                "slot": np.full(self.n, -1, np.int64),
                "table_index": np.where(ref > 0, index, -1),
                "hashed": hashed,
                "hash": hash_col,
            },
            self.states,
            ["table_index", "hashed", "hash"],
        )


# ---- vmm --------------------------------------------------------------------------------------------------------
class VMMReplay(Replay):
    """Pages: in the pool, or mapped on a slot (at a byte offset of one buffer). A mapped page is in use when its
    slot has a live request, mapped-idle when the slot's request is gone (deferred reclamation)."""

    kinds = (
        Kind.PAGE_CREATE,
        Kind.PAGE_MAP,
        Kind.PAGE_UNMAP,
        Kind.PAGE_RELEASE,
        Kind.SLOT_ALLOC,
        Kind.SLOT_FREE,
        Kind.RECLAIM,
        *_HELD_KINDS,
    )
    states = ("pool", "mapped_used", "mapped_idle")

    def __init__(self, trace) -> None:
        super().__init__(trace)
        spec = trace.meta.get("spec") or {}
        self.page_size = int(config_value(trace, "page_size", 2 << 20) or (2 << 20))
        row = config_value(trace, "buffer_row_bytes", 0) or 0
        if not row:
            per_layer = int(spec.get("num_kv_heads", 0)) * int(spec.get("head_dim", 0))
            per_layer *= DTYPE_BYTES.get(str(spec.get("dtype", "")), 2)
            row = int(spec.get("bytes_per_token", 0)) if config_value(trace, "megacache", False) else per_layer
        self.row_bytes = max(int(row), 1)
        n = int(config_value(trace, "pages", 0) or 0)
        if n <= 0:
            n = _max_block(trace, self.kinds[:4]) + 1
        self.n = n
        self.slot = [-1] * n  # -1: in the pool
        self.offset = [0] * n
        self.buffer = [-1] * n
        self.live = [False] * n  # created and not released
        self.slot_owner: dict[int, int] = {}

    def _grow(self, p: int) -> None:
        extra = p + 1 - self.n
        for lst, v in ((self.slot, -1), (self.offset, 0), (self.buffer, -1), (self.live, False)):
            lst.extend([v] * extra)
        self.n = p + 1

    def apply(self, ev: Events, lo: int, hi: int) -> None:
        CREATE, MAP, UNMAP, RELEASE, SALLOC, SFREE, RECLAIM = (int(k) for k in self.kinds[:7])
        owner = self.slot_owner
        for code, seq, p, n, addr, aux in ev.rows(lo, hi):
            if p >= self.n:
                self._grow(p)
            if code == MAP:
                self.slot[p] = aux
                self.offset[p] = addr
                self.buffer[p] = n
                self.live[p] = True
            elif code == UNMAP:
                self.slot[p] = -1
            elif code == CREATE:
                self.live[p] = True
                self.slot[p] = -1
            elif code == RELEASE:
                self.live[p] = False
                self.slot[p] = -1
            elif code in (SALLOC, RECLAIM):
                owner[addr] = seq
            elif code == SFREE:
                if owner.get(addr) == seq:
                    del owner[addr]
            else:
                self._held_event(code, seq, n, aux)

    def snapshot(self) -> Any:
        return (
            np.array(self.slot, np.int64),
            np.array(self.offset, np.int64),
            np.array(self.buffer, np.int32),
            np.array(self.live, np.bool_),
            dict(self.slot_owner),
            dict(self.held),
        )

    def restore(self, snap: Any) -> None:
        slot, offset, buffer, live, owner, held = snap
        self.slot, self.offset, self.buffer, self.live = slot.tolist(), offset.tolist(), buffer.tolist(), live.tolist()
        self.slot_owner, self.held = dict(owner), dict(held)
        self.n = len(self.slot)

    def _slot_live(self, slot: np.ndarray) -> np.ndarray:
        owned = np.array(sorted(self.slot_owner), np.int64)
        return np.isin(slot, owned) & (slot >= 0)

    def codes(self) -> np.ndarray:
        slot = np.array(self.slot, np.int64)
        used = self._slot_live(slot)
        return np.where(slot < 0, 0, np.where(used, 1, 2)).astype(np.int8)

    def frame(self) -> pd.DataFrame:
        slot = np.array(self.slot, np.int64)
        offset = np.array(self.offset, np.int64)
        live = np.array(self.live, np.bool_)
        codes = self.codes()
        row, page = self.row_bytes, self.page_size
        # Rows (tokens) starting inside the page's byte range [offset, offset + page) of its buffer.
        first_row = -(-offset // row)
        end_row = -(-(offset + page) // row)
        capacity = np.where(slot >= 0, end_row - first_row, page // row)
        seq = np.array([self.slot_owner.get(s, -1) for s in slot.tolist()], np.int64)
        held = np.array([self.held.get(q, 0) if q >= 0 else 0 for q in seq.tolist()], np.int64)
        fill = np.where(codes == 1, np.clip(held - first_row, 0, capacity), 0)
        keep = np.flatnonzero(live)
        return _frame(
            {
                "unit": keep.astype(np.int64),
                "state": codes[keep],
                "fill": fill[keep],
                "capacity_tokens": capacity[keep],
                "ref_count": (codes[keep] == 1).astype(np.int64),
                "seqs": [str(q) if q >= 0 else "" for q in seq[keep].tolist()],
                "slot": slot[keep],
                "buffer": np.array(self.buffer, np.int64)[keep],
                "offset": np.where(slot[keep] >= 0, offset[keep], -1),
            },
            self.states,
            ["buffer", "offset"],
        )


# ---- static -----------------------------------------------------------------------------------------------------
class StaticReplay(Replay):
    """Arena rows: each live reservation [addr, addr + n) splits into used rows (tokens held), reservation rows
    (up to the sequence's final length P + O - 1) and internal rows (beyond the final length); the rest is free."""

    kinds = (Kind.STATIC_RESERVE, Kind.STATIC_RELEASE, *_HELD_KINDS)
    states = ("free", "used", "reservation", "internal")

    def __init__(self, trace) -> None:
        super().__init__(trace)
        self.rows = cached(trace, "static_rows", lambda: _static_rows(trace))
        self.resv: dict[int, tuple[int, int]] = {}  # seq -> (first row, rows)
        self.final: dict[int, int] = {}  # seq -> final length (P + O - 1)

    def apply(self, ev: Events, lo: int, hi: int) -> None:
        RESERVE, RELEASE = int(Kind.STATIC_RESERVE), int(Kind.STATIC_RELEASE)
        resv, final = self.resv, self.final
        for code, seq, _b, n, addr, aux in ev.rows(lo, hi):
            if code == RESERVE:
                resv[seq] = (addr, n)
            elif code == RELEASE:
                resv.pop(seq, None)
            else:
                if code == A_ARRIVE:
                    final[seq] = n + aux - 1
                elif code == A_FORK and aux in final:
                    final[seq] = final[aux]
                self._held_event(code, seq, n, aux)

    def snapshot(self) -> Any:
        return dict(self.resv), dict(self.final), dict(self.held)

    def restore(self, snap: Any) -> None:
        resv, final, held = snap
        self.resv, self.final, self.held = dict(resv), dict(final), dict(held)

    def _segments(self) -> list[tuple[int, int, int, int]]:
        """(start, length, state index, seq) of every non-empty segment, in arena order, free gaps included."""
        out: list[tuple[int, int, int, int]] = []
        pos = 0
        for seq, (start, n) in sorted(self.resv.items(), key=lambda kv: kv[1][0]):
            if start > pos:
                out.append((pos, start - pos, 0, -1))
            used = min(max(self.held.get(seq, 0), 0), n)
            final = min(max(self.final.get(seq, n), used), n)
            for length, state in ((used, 1), (final - used, 2), (n - final, 3)):
                if length > 0:
                    out.append((start, length, state, seq))
                    start += length
            pos = max(pos, start)
        if self.rows > pos:
            out.append((pos, self.rows - pos, 0, -1))
        return out

    def codes(self) -> np.ndarray:
        out = np.zeros(self.rows, np.int8)
        for start, length, state, _ in self._segments():
            if state:
                out[start : start + length] = state
        return out

    def frame(self) -> pd.DataFrame:
        segs = self._segments()
        start = np.array([s[0] for s in segs], np.int64)
        length = np.array([s[1] for s in segs], np.int64)
        state = np.array([s[2] for s in segs], np.int64)
        seq = np.array([s[3] for s in segs], np.int64)
        slot = np.array([self.resv[q][0] if q >= 0 else -1 for q in seq.tolist()], np.int64)
        return _frame(
            {
                "unit": start,
                "state": state,
                "fill": np.where(state == 1, length, 0),
                "capacity_tokens": length,
                "ref_count": (state > 0).astype(np.int64),
                "seqs": [str(q) if q >= 0 else "" for q in seq.tolist()],
                "slot": slot,
            },
            self.states,
            [],
        )


def _max_block(trace, kinds: tuple[Kind, ...]) -> int:
    """The largest block / page id the given events name (-1 if none)."""

    def build() -> int:
        blocks = column(trace, "block")[mask(trace, *kinds)]
        return int(blocks.max()) if len(blocks) else -1

    return cached(trace, "max_block." + ",".join(str(int(k)) for k in kinds), build)


def _static_rows(trace) -> int:
    """Arena rows: the allocator's config, else capacity / bytes per token, else the highest reserved row."""
    rows = int(config_value(trace, "rows", 0) or 0)
    bpt = int(trace.bytes_per_token or 0)
    if rows <= 0 and bpt:
        cap = select(trace, Kind.ACCT_CAPACITY)["bytes"]
        rows = int(cap.max()) // bpt if len(cap) else 0
    res = select(trace, Kind.STATIC_RESERVE)
    if len(res):
        rows = max(rows, int((res["addr"] + res["n"]).max()))
    return rows


REPLAYS: dict[str, type[Replay]] = {"paged": PagedReplay, "vmm": VMMReplay, "static": StaticReplay}


def replay_class(trace) -> type[Replay]:
    alloc = str(trace.meta.get("allocator", ""))
    if alloc in REPLAYS:
        return REPLAYS[alloc]
    # A trace without allocator metadata: recognise it by its events.
    for name, kinds in (("paged", (Kind.BLOCK_ALLOC,)), ("vmm", (Kind.PAGE_MAP,)), ("static", (Kind.STATIC_RESERVE,))):
        if mask(trace, *kinds).any():
            return REPLAYS[name]
    raise ValueError(f"trace {trace.name!r}: unknown allocator {alloc!r} and no block, page or arena events to replay")


# ---- checkpointed timeline ----------------------------------------------------------------------------------
class Timeline:
    """The replayed state at the end of any step, via snapshots taken on one forward pass."""

    def __init__(self, trace) -> None:
        self.trace = trace
        self.cls = replay_class(trace)
        rel = mask(trace, *self.cls.kinds)
        self.positions = np.flatnonzero(rel)  # row positions of the relevant events
        self.events = Events(
            kind_codes(trace)[rel], *(column(trace, c)[rel] for c in ("seq", "block", "n", "addr", "aux"))
        )
        self.live = self.cls(trace)
        units = max(getattr(self.live, "n", 0), getattr(self.live, "rows", 0) // 16, 1)
        per_snapshot = 32 * units
        n_events = len(self.events)
        by_memory = n_events * per_snapshot // CHECKPOINT_BUDGET_BYTES + 1
        self.interval = max(MIN_INTERVAL, n_events // MAX_CHECKPOINTS + 1, by_memory)
        self.live_at = 0
        self.checkpoints: dict[int, Any] = {0: self.live.snapshot()}
        # The live replay moves; a dashboard may ask from several threads at once.
        self._lock = threading.RLock()

    def index_of_step(self, step: int) -> int:
        """Relevant events [0, i) make the state at the end of `step`."""
        return int(np.searchsorted(self.positions, end_of_step(self.trace, step), side="left"))

    def _advance(self, target: int) -> None:
        while self.live_at < target:
            nxt = min(target, (self.live_at // self.interval + 1) * self.interval)
            self.live.apply(self.events, self.live_at, nxt)
            self.live_at = nxt
            if nxt % self.interval == 0 and nxt not in self.checkpoints:
                self.checkpoints[nxt] = self.live.snapshot()

    def at(self, index: int, use: Callable[[Replay], Any]) -> Any:
        """use(replay positioned after `index` relevant events)."""
        with self._lock:
            return self._at(index, use)

    def _at(self, index: int, use: Callable[[Replay], Any]) -> Any:
        if index >= self.live_at:
            self._advance(index)
            return use(self.live)
        base = index // self.interval * self.interval
        scratch = self.cls(self.trace)
        scratch.restore(self.checkpoints[base])
        scratch.apply(self.events, base, index)
        return use(scratch)

    def at_step(self, step: int, use: Callable[[Replay], Any]) -> Any:
        return self.at(self.index_of_step(step), use)

    def scan(self, indices: list[int], use: Callable[[Replay], Any]) -> list[Any]:
        """[use(replay after i events) for i in indices] (ascending), in one forward pass."""
        with self._lock:
            return self._scan(indices, use)

    def _scan(self, indices: list[int], use: Callable[[Replay], Any]) -> list[Any]:
        if not indices:
            return []
        if indices[0] >= self.live_at:
            out = []
            for i in indices:
                self._advance(i)
                out.append(use(self.live))
            return out
        pos = indices[0] // self.interval * self.interval
        scratch = self.cls(self.trace)
        scratch.restore(self.checkpoints[pos])
        out = []
        for i in indices:
            scratch.apply(self.events, pos, i)
            pos = max(pos, i)
            out.append(use(scratch))
        return out


def timeline(trace) -> Timeline:
    return cached(trace, "replay_timeline", lambda: Timeline(trace))
