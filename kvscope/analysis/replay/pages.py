"""Replay of page-addressed allocators (VMM, vAttention-style): physical pages mapped into per-slot virtual buffers.

Reads PAGE_CREATE / PAGE_MAP / PAGE_UNMAP / PAGE_RELEASE / SLOT_ALLOC / SLOT_FREE / RECLAIM (kvscope.events) and the
lifecycle events that say how many tokens each sequence holds. Needs allocator_config "pages" (the pool; 0: as many
as the events name), "page_size" (bytes) and "buffer_row_bytes" (bytes of one token's row in a buffer: a page holds
the rows that start inside its byte range).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis._events import config_value
from kvscope.analysis.replay.base import HELD_KINDS, Events, Replay, config_int, max_unit
from kvscope.events import Kind
from kvscope.spec import DTYPE_BYTES

LEGACY_PAGE_SIZE = 2 << 20  # a vmm trace without page_size in its config: the stock driver's 2 MiB pages

_PAGE_KINDS = (Kind.PAGE_CREATE, Kind.PAGE_MAP, Kind.PAGE_UNMAP, Kind.PAGE_RELEASE)
_SLOT_KINDS = (Kind.SLOT_ALLOC, Kind.SLOT_FREE, Kind.RECLAIM)
_CREATE, _MAP, _UNMAP, _RELEASE = (int(k) for k in _PAGE_KINDS)
_SLOT_ALLOC, _SLOT_FREE, _RECLAIM = (int(k) for k in _SLOT_KINDS)


class PageState(IntEnum):
    POOL = 0  # created, not mapped
    MAPPED_USED = 1  # mapped on a slot with a live request
    MAPPED_IDLE = 2  # mapped on a slot whose request is gone (deferred reclamation)


@dataclass(frozen=True)
class PageSnapshot:
    slot: np.ndarray  # int64 per page: the slot it is mapped on, -1 in the pool
    offset: np.ndarray  # int64: byte offset in the slot's region of its buffer
    buffer: np.ndarray  # int32
    live: np.ndarray  # bool: created and not released
    slot_owner: dict[int, int]  # slot -> seq
    held: dict[int, int]
    more: dict[int, list[tuple[int, int, int]]] | None = None  # page -> its other places (VMM page sharing)


class PageReplay(Replay[PageSnapshot]):
    """Pages: in the pool, or mapped on a slot (at a byte offset of one buffer). A mapped page is in use when its
    slot has a live request, mapped-idle when the slot's request is gone (deferred reclamation). With page sharing a
    page is mapped at several places (one per slot sharing it): the first is `slot`/`offset`/`buffer`, the others
    are in `more`; the page is in use when any of its slots has a live request."""

    addressing = "pages"
    kinds = (*_PAGE_KINDS, *_SLOT_KINDS, *HELD_KINDS)
    State = PageState
    sizes = {"pages": 0, "page_size": 1, "buffer_row_bytes": 1}

    def __init__(self, trace: Any) -> None:
        super().__init__(trace)
        self.page_size = config_int(trace, "page_size", LEGACY_PAGE_SIZE)
        self.row_bytes = max(config_int(trace, "buffer_row_bytes") or _legacy_row_bytes(trace), 1)
        n = config_int(trace, "pages")
        if n <= 0:
            n = max_unit(trace, _PAGE_KINDS) + 1
        self.n = n
        self.slot = [-1] * n  # -1: in the pool
        self.offset = [0] * n
        self.buffer = [-1] * n
        self.live = [False] * n  # created and not released
        self.slot_owner: dict[int, int] = {}
        self.more: dict[int, list[tuple[int, int, int]]] = {}  # page -> (slot, offset, buffer) beyond the first

    @property
    def units(self) -> int:
        return self.n

    def _grow(self, p: int) -> None:
        extra = p + 1 - self.n
        self.slot.extend([-1] * extra)
        self.offset.extend([0] * extra)
        self.buffer.extend([-1] * extra)
        self.live.extend([False] * extra)
        self.n = p + 1

    def apply(self, ev: Events, lo: int, hi: int) -> None:
        owner = self.slot_owner
        for code, seq, p, n, addr, aux in ev.rows(lo, hi):
            if p >= self.n:
                self._grow(p)
            if code == _MAP:  # aux: the slot, addr: byte offset in its region, n: the buffer
                if self.slot[p] >= 0:  # already mapped elsewhere: one more place of a shared page
                    self.more.setdefault(p, []).append((aux, addr, n))
                    continue
                self.slot[p] = aux
                self.offset[p] = addr
                self.buffer[p] = n
                self.live[p] = True
            elif code == _UNMAP:
                self._unmap(p, (aux, addr, n))
            elif code == _CREATE:
                self.live[p] = True
                self.slot[p] = -1
            elif code == _RELEASE:
                self.live[p] = False
                self.slot[p] = -1
            elif code in (_SLOT_ALLOC, _RECLAIM):  # addr: the slot
                owner[addr] = seq
            elif code == _SLOT_FREE:
                if owner.get(addr) == seq:
                    del owner[addr]
            else:
                self.held_event(code, seq, n, aux)

    def _unmap(self, p: int, place: tuple[int, int, int]) -> None:
        """One place of page p goes; another of its places (if any) becomes the first."""
        others = self.more.get(p)
        if others:
            if place in others:
                others.remove(place)
            else:
                self.slot[p], self.offset[p], self.buffer[p] = others.pop(0)
            if not others:
                del self.more[p]
            return
        self.slot[p] = -1

    def snapshot(self) -> PageSnapshot:
        return PageSnapshot(
            slot=np.array(self.slot, np.int64),
            offset=np.array(self.offset, np.int64),
            buffer=np.array(self.buffer, np.int32),
            live=np.array(self.live, np.bool_),
            slot_owner=dict(self.slot_owner),
            held=dict(self.held),
            more={p: list(v) for p, v in self.more.items()} if self.more else None,
        )

    def restore(self, snap: PageSnapshot) -> None:
        self.slot, self.offset = snap.slot.tolist(), snap.offset.tolist()
        self.buffer, self.live = snap.buffer.tolist(), snap.live.tolist()
        self.slot_owner, self.held = dict(snap.slot_owner), dict(snap.held)
        self.more = {p: list(v) for p, v in (snap.more or {}).items()}
        self.n = len(self.slot)

    def _slot_live(self, slot: np.ndarray) -> np.ndarray:
        owned = np.array(sorted(self.slot_owner), np.int64)
        used = np.isin(slot, owned) & (slot >= 0)
        for p, places in self.more.items():  # a shared page is in use while any of its slots is
            used[p] |= any(s in self.slot_owner for s, _, _ in places)
        return used

    def codes(self) -> np.ndarray:
        slot = np.array(self.slot, np.int64)
        used = self._slot_live(slot)
        S = PageState
        return np.where(slot < 0, S.POOL, np.where(used, S.MAPPED_USED, S.MAPPED_IDLE)).astype(np.int8)

    def frame(self) -> pd.DataFrame:
        slot = np.array(self.slot, np.int64)
        offset = np.array(self.offset, np.int64)
        live = np.array(self.live, np.bool_)
        codes = self.codes()
        in_use = codes == PageState.MAPPED_USED
        row, page = self.row_bytes, self.page_size
        # Rows (tokens) starting inside the page's byte range [offset, offset + page) of its buffer.
        first_row = -(-offset // row)
        end_row = -(-(offset + page) // row)
        capacity = np.where(slot >= 0, end_row - first_row, page // row)
        seq = np.array([self.slot_owner.get(s, -1) for s in slot.tolist()], np.int64)
        held = np.array([self.held.get(q, 0) if q >= 0 else 0 for q in seq.tolist()], np.int64)
        fill = np.where(in_use, np.clip(held - first_row, 0, capacity), 0)
        refs = in_use.astype(np.int64)
        names = [str(q) if q >= 0 else "" for q in seq.tolist()]
        for p, places in self.more.items():  # a shared page: every live slot holding it (the fill is theirs too)
            holders = [self.slot_owner[s] for s in (self.slot[p], *(s for s, _, _ in places)) if s in self.slot_owner]
            refs[p] = len(holders)
            names[p] = ",".join(str(q) for q in holders)
            if holders:
                fill[p] = min(max(self.held.get(holders[0], 0) - first_row[p], 0), capacity[p])
        keep = np.flatnonzero(live)
        return self._frame(
            {
                "unit": keep.astype(np.int64),
                "state": codes[keep],
                "fill": fill[keep],
                "capacity_tokens": capacity[keep],
                "ref_count": refs[keep],
                "seqs": [names[i] for i in keep.tolist()],
                "slot": slot[keep],
                "buffer": np.array(self.buffer, np.int64)[keep],
                "offset": np.where(slot[keep] >= 0, offset[keep], -1),
            },
            ["buffer", "offset"],
        )


def _legacy_row_bytes(trace: Any) -> int:
    """A legacy vmm trace without buffer_row_bytes: one token's K or V of one layer per row (a megacache buffer holds
    all of a token's layers in one row), from the trace's KV spec."""
    spec = trace.meta.get("spec") or {}
    if config_value(trace, "megacache", False):
        return int(spec.get("bytes_per_token", 0))
    per_layer = int(spec.get("num_kv_heads", 0)) * int(spec.get("head_dim", 0))
    return per_layer * DTYPE_BYTES.get(str(spec.get("dtype", "")), 2)
