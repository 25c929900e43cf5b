"""Replay of row-addressed arenas (static, Orca-style): each admitted sequence reserves consecutive token rows.

Reads STATIC_RESERVE / STATIC_RELEASE (kvscope.events) and the lifecycle events that say how many tokens each
sequence holds and, from ARRIVE, its final length. Needs allocator_config "rows" (the arena's token rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached, select
from kvscope.analysis.replay.base import HELD_KINDS, Events, Replay, config_int
from kvscope.events import Kind

_RESERVE, _RELEASE = int(Kind.STATIC_RESERVE), int(Kind.STATIC_RELEASE)
_ARRIVE, _FORK = int(Kind.ARRIVE), int(Kind.FORK)


class RowState(IntEnum):
    FREE = 0
    USED = 1  # rows holding tokens
    RESERVATION = 2  # rows for tokens not generated yet, up to the final length P + O - 1
    INTERNAL = 3  # rows beyond the final length: never to be filled


class Reservation(NamedTuple):
    first_row: int
    rows: int


class Segment(NamedTuple):
    """Consecutive arena rows in one state (seq -1 for a free gap)."""

    start: int
    length: int
    state: RowState
    seq: int


@dataclass(frozen=True)
class RowSnapshot:
    reservations: dict[int, Reservation]  # seq -> its rows
    final: dict[int, int]  # seq -> final length (P + O - 1)
    held: dict[int, int]


class RowReplay(Replay[RowSnapshot]):
    """Arena rows: each live reservation [first_row, first_row + rows) splits into used rows (tokens held),
    reservation rows (up to the sequence's final length P + O - 1) and internal rows (beyond the final length); the
    rest is free."""

    addressing = "rows"
    kinds = (Kind.STATIC_RESERVE, Kind.STATIC_RELEASE, *HELD_KINDS)
    State = RowState
    sizes = {"rows": 0}

    def __init__(self, trace: Any) -> None:
        super().__init__(trace)
        self.rows = cached(trace, "static_rows", lambda: arena_rows(trace))
        self.resv: dict[int, Reservation] = {}
        self.final: dict[int, int] = {}

    @property
    def units(self) -> int:
        return self.rows

    @property
    def snapshot_units(self) -> int:
        return self.rows // 16  # a snapshot holds one entry per reservation, not per row

    def apply(self, ev: Events, lo: int, hi: int) -> None:
        resv, final = self.resv, self.final
        for code, seq, _unit, n, addr, aux in ev.rows(lo, hi):
            if code == _RESERVE:  # addr: first row, n: rows
                resv[seq] = Reservation(addr, n)
            elif code == _RELEASE:
                resv.pop(seq, None)
            else:
                if code == _ARRIVE:  # n: prompt length, aux: output length
                    final[seq] = n + aux - 1
                elif code == _FORK and aux in final:  # aux: the parent
                    final[seq] = final[aux]
                self.held_event(code, seq, n, aux)

    def snapshot(self) -> RowSnapshot:
        return RowSnapshot(dict(self.resv), dict(self.final), dict(self.held))

    def restore(self, snap: RowSnapshot) -> None:
        self.resv, self.final, self.held = dict(snap.reservations), dict(snap.final), dict(snap.held)

    def segments(self) -> list[Segment]:
        """Every non-empty segment, in arena order, free gaps included."""
        out: list[Segment] = []
        pos = 0
        for seq, (start, n) in sorted(self.resv.items(), key=lambda kv: kv[1].first_row):
            if start > pos:
                out.append(Segment(pos, start - pos, RowState.FREE, -1))
            used = min(max(self.held.get(seq, 0), 0), n)
            final = min(max(self.final.get(seq, n), used), n)
            for length, state in (
                (used, RowState.USED),
                (final - used, RowState.RESERVATION),
                (n - final, RowState.INTERNAL),
            ):
                if length > 0:
                    out.append(Segment(start, length, state, seq))
                    start += length
            pos = max(pos, start)
        if self.rows > pos:
            out.append(Segment(pos, self.rows - pos, RowState.FREE, -1))
        return out

    def codes(self) -> np.ndarray:
        out = np.zeros(self.rows, np.int8)
        for seg in self.segments():
            if seg.state != RowState.FREE:
                out[seg.start : seg.start + seg.length] = seg.state
        return out

    def frame(self) -> pd.DataFrame:
        segs = self.segments()
        start = np.array([s.start for s in segs], np.int64)
        length = np.array([s.length for s in segs], np.int64)
        state = np.array([int(s.state) for s in segs], np.int64)
        seq = np.array([s.seq for s in segs], np.int64)
        slot = np.array([self.resv[q].first_row if q >= 0 else -1 for q in seq.tolist()], np.int64)
        return self._frame(
            {
                "unit": start,
                "state": state,
                "fill": np.where(state == RowState.USED, length, 0),
                "capacity_tokens": length,
                "ref_count": (state != RowState.FREE).astype(np.int64),
                "seqs": [str(q) if q >= 0 else "" for q in seq.tolist()],
                "slot": slot,
            },
            [],
        )


def arena_rows(trace: Any) -> int:
    """Arena rows: the allocator's config, else (a legacy trace) capacity / bytes per token; at least the highest
    reserved row."""
    rows = config_int(trace, "rows")
    bpt = int(trace.bytes_per_token or 0)
    if rows <= 0 and bpt:
        cap = select(trace, Kind.ACCT_CAPACITY)["bytes"]
        rows = int(cap.max()) // bpt if len(cap) else 0
    res = select(trace, Kind.STATIC_RESERVE)
    if len(res):
        rows = max(rows, int((res["addr"] + res["n"]).max()))
    return rows
