"""Replay of block-addressed allocators (paged, vLLM-style): a pool of fixed-size blocks found through block tables.

Reads BLOCK_ALLOC / BLOCK_SHARE / BLOCK_FREE / BLOCK_COW / BLOCK_CACHE / BLOCK_EVICT (kvscope.events) and the
lifecycle events that say how many tokens each sequence holds. Needs allocator_config "block_size" (tokens per
block) and "num_blocks" (the pool; 0: as many as the events name).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis.replay.base import HELD_KINDS, Events, Replay, config_int, max_unit
from kvscope.events import Kind

LEGACY_BLOCK_SIZE = 16  # what a paged trace without block_size in its config was recorded with

_BLOCK_KINDS = (Kind.BLOCK_ALLOC, Kind.BLOCK_SHARE, Kind.BLOCK_FREE, Kind.BLOCK_COW, Kind.BLOCK_CACHE, Kind.BLOCK_EVICT)
_ALLOC, _SHARE, _FREE, _COW, _CACHE, _EVICT = (int(k) for k in _BLOCK_KINDS)


class BlockState(IntEnum):
    FREE = 0
    ACTIVE = 1  # one holder
    SHARED = 2  # ref count > 1
    CACHED_IDLE = 3  # ref 0, hashed: in the prefix cache


@dataclass(frozen=True)
class BlockSnapshot:
    ref: np.ndarray  # int32 per block
    owner: np.ndarray  # int64: a holder (-1 none)
    index: np.ndarray  # int32: the block's index in that holder's block table
    hashed: np.ndarray  # bool
    hash: np.ndarray  # int64
    holders: dict[int, tuple[int, ...]]  # block -> all holders, for blocks with ref > 1
    held: dict[int, int]


class BlockReplay(Replay[BlockSnapshot]):
    """Blocks: ref count (= number of holders), one holder and its block-table index, the holders of shared blocks,
    and whether the block carries a prefix hash. Fill comes from the holder's token count and the block's index."""

    addressing = "blocks"
    kinds = (*_BLOCK_KINDS, *HELD_KINDS)
    State = BlockState
    sizes = {"block_size": 1, "num_blocks": 0}

    def __init__(self, trace: Any) -> None:
        super().__init__(trace)
        self.block_size = config_int(trace, "block_size", LEGACY_BLOCK_SIZE)
        n = config_int(trace, "num_blocks")
        if n <= 0:
            n = max_unit(trace, _BLOCK_KINDS) + 1
        self.n = n
        self.ref = [0] * n
        self.owner = [-1] * n
        self.index = [-1] * n
        self.hashed = [False] * n
        self.hash = [0] * n
        self.multi: dict[int, tuple[int, ...]] = {}  # block -> all holders, for blocks with ref > 1

    @property
    def units(self) -> int:
        return self.n

    def _grow(self, b: int) -> None:
        extra = b + 1 - self.n
        self.ref.extend([0] * extra)
        self.owner.extend([-1] * extra)
        self.index.extend([-1] * extra)
        self.hashed.extend([False] * extra)
        self.hash.extend([0] * extra)
        self.n = b + 1

    def apply(self, ev: Events, lo: int, hi: int) -> None:
        ref, owner, index, hashed, multi = self.ref, self.owner, self.index, self.hashed, self.multi
        for code, seq, b, n, addr, aux in ev.rows(lo, hi):
            if b >= self.n:
                self._grow(b)
                ref, owner, index, hashed = self.ref, self.owner, self.index, self.hashed
            if code in (_ALLOC, _COW):
                # A fresh block (COW: the writer's private copy; the source loses the writer by a BLOCK_FREE).
                ref[b] = 1
                owner[b] = seq
                index[b] = addr
                hashed[b] = False
                multi.pop(b, None)
            elif code == _SHARE:
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
            elif code == _FREE:
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
            elif code == _CACHE:
                hashed[b] = True
                self.hash[b] = aux
            elif code == _EVICT:
                hashed[b] = False
            else:
                self.held_event(code, seq, n, aux)

    def snapshot(self) -> BlockSnapshot:
        return BlockSnapshot(
            ref=np.array(self.ref, np.int32),
            owner=np.array(self.owner, np.int64),
            index=np.array(self.index, np.int32),
            hashed=np.array(self.hashed, np.bool_),
            hash=np.array(self.hash, np.int64),
            holders=dict(self.multi),
            held=dict(self.held),
        )

    def restore(self, snap: BlockSnapshot) -> None:
        self.ref, self.owner, self.index = snap.ref.tolist(), snap.owner.tolist(), snap.index.tolist()
        self.hashed, self.hash = snap.hashed.tolist(), snap.hash.tolist()
        self.multi, self.held = dict(snap.holders), dict(snap.held)
        self.n = len(self.ref)

    def codes(self) -> np.ndarray:
        ref = np.array(self.ref, np.int32)
        hashed = np.array(self.hashed, np.bool_)
        S = BlockState
        out = np.where(ref >= 2, S.SHARED, np.where(ref == 1, S.ACTIVE, np.where(hashed, S.CACHED_IDLE, S.FREE)))
        return out.astype(np.int8)

    def frame(self) -> pd.DataFrame:
        bs = self.block_size
        ref = np.array(self.ref, np.int64)
        owner = np.array(self.owner, np.int64)
        index = np.array(self.index, np.int64)
        hashed = np.array(self.hashed, np.bool_)
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
        return self._frame(
            {
                "unit": np.arange(self.n, dtype=np.int64),
                "state": self.codes(),
                "fill": fill,
                "capacity_tokens": np.full(self.n, bs, np.int64),
                "ref_count": ref,
                "seqs": seqs,
                "slot": np.full(self.n, -1, np.int64),
                "table_index": np.where(ref > 0, index, -1),
                "hashed": hashed,
                "hash": np.where(hashed, np.array(self.hash, np.int64), 0),
            },
            ["table_index", "hashed", "hash"],
        )
