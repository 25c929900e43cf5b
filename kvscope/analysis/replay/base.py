"""What every replay shares: the Replay base class, the Events column view, and the checkpointed Timeline.

A replay keeps the state of one allocator family's units (blocks, pages or arena rows) in Python lists and dicts
(cheap per-event updates) and turns it into numpy arrays on demand. `Timeline` owns one live replay that only moves
forward, and saves a compact snapshot every `interval` relevant events on the way; the state at any step is then the
nearest snapshot at or before it plus at most `interval` events. So the first look at a late step costs one pass over
the events, and every later look at any step costs one restore plus a bounded replay.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from enum import IntEnum
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached, config_value, end_of_step
from kvscope.events import Kind

# Snapshots are taken every max(MIN_INTERVAL, events / MAX_CHECKPOINTS) relevant events, fewer when the pool is big
# (each snapshot holds a few arrays of one entry per unit), so checkpoint memory stays bounded.
MIN_INTERVAL = 8192
MAX_CHECKPOINTS = 128
CHECKPOINT_BUDGET_BYTES = 256 << 20
SNAPSHOT_BYTES_PER_UNIT = 32

# Lifecycle events every replay reads to know how many tokens each sequence holds.
HELD_KINDS = (
    Kind.APPEND, Kind.FORK, Kind.PREFIX_HIT, Kind.PREEMPT, Kind.FINISH, Kind.REJECT, Kind.ARRIVE, Kind.PRUNE
)  # fmt: skip
_APPEND, _FORK, _HIT, _PREEMPT, _FINISH, _REJECT = (int(k) for k in HELD_KINDS[:6])
_PRUNE = int(Kind.PRUNE)  # a beam that beam search dropped: it holds nothing from then on
SWAP_PREEMPTION = 1  # PREEMPT aux: 1 swap (the tokens stay, on the CPU), 0 recompute (they are dropped)

# The columns of every replay's frame, in this order (kvscope.analysis.fragmentation.block_states).
STATE_COLUMNS = ["unit", "state", "fill", "capacity_tokens", "ref_count", "seqs", "slot"]


class ReplayError(ValueError):
    """A trace analysis cannot replay: it does not say how its allocator addresses memory, or lacks the sizes."""


class Events:
    """The relevant events as int64 numpy columns, in trace order: code (Kind value), seq, unit (the event's `block`
    column: block or page id), n, addr, aux. Kept as arrays (48 bytes an event) rather than a list of tuples
    (several times more) for million-event traces."""

    FIELDS = ("code", "seq", "unit", "n", "addr", "aux")

    def __init__(
        self, code: np.ndarray, seq: np.ndarray, unit: np.ndarray, n: np.ndarray, addr: np.ndarray, aux: np.ndarray
    ) -> None:
        self.code, self.seq, self.unit, self.n, self.addr, self.aux = (
            np.asarray(c, dtype=np.int64) for c in (code, seq, unit, n, addr, aux)
        )

    @classmethod
    def of(cls, trace: Any, kinds: tuple[Kind, ...]) -> tuple[Events, np.ndarray]:
        """(the events of these kinds, their row positions in the trace)."""
        # Only the rows of these kinds are read (the store holds them apart): no whole column is built.
        store = trace.store
        ks = [int(k) for k in kinds]
        cols = [store.values(c, ks, np.int64) for c in ("seq", "block", "n", "addr", "aux")]
        positions = store.positions(ks)
        if len(positions) == 1:
            code = np.full(len(cols[0]), int(store.lookup[positions[0]]), np.int64)
        else:
            code = store.lookup[store.selection(positions)] if positions else np.zeros(0, np.int64)
        return cls(code, *cols), store.rows(ks)

    @property
    def columns(self) -> list[np.ndarray]:
        return [self.code, self.seq, self.unit, self.n, self.addr, self.aux]

    def __len__(self) -> int:
        return len(self.code)

    def rows(self, lo: int, hi: int) -> Iterator[tuple[int, int, int, int, int, int]]:
        """Events [lo, hi) as Python ints, one tuple in FIELDS order per event (the replays' hot loop unpacks
        them into named locals: a NamedTuple per event would double the cost of a pass)."""
        return zip(*(c[lo:hi].tolist() for c in self.columns), strict=True)


def config_int(trace: Any, key: str, default: int = 0) -> int:
    """allocator_config[key] as an int (`default` when absent, null or 0)."""
    return int(config_value(trace, key, default) or default)


def declared_addressing(trace: Any) -> str | None:
    """allocator_config["addressing"]: how the allocator that recorded the trace says analysis should replay it."""
    value = config_value(trace, "addressing")
    return value if isinstance(value, str) and value else None


def missing_sizes(trace: Any, sizes: dict[str, int]) -> list[str]:
    """The keys of `sizes` ({key: smallest valid value}) that allocator_config lacks or holds out of range."""
    out = []
    for key, least in sizes.items():
        value = config_value(trace, key)
        whole = isinstance(value, int) and not isinstance(value, bool)
        whole = whole or (isinstance(value, float) and value.is_integer())
        if not whole or value < least:
            out.append(key)
    return out


def max_unit(trace: Any, kinds: tuple[Kind, ...]) -> int:
    """The largest block / page id the given events name (-1 if none)."""

    def build() -> int:
        # the store's per-kind ranges: no pass over the rows (the whole `block` column is 8 bytes a row)
        span = trace.store.value_range("block", [int(k) for k in kinds])
        return -1 if span is None else int(span[1])

    return cached(trace, "max_block." + ",".join(str(int(k)) for k in kinds), build)


SnapshotT = TypeVar("SnapshotT")


class Replay(ABC, Generic[SnapshotT]):
    """The state of one allocator family's units, moved forward event by event.

    A subclass names the event kinds it reads (`kinds`), its unit states (`State`, an IntEnum whose values index
    `states`), and the allocator_config sizes it needs when a trace declares its addressing (`sizes`: key -> the
    smallest valid value). A trace that declares its addressing must carry those sizes (the constructor raises
    ReplayError otherwise); a legacy trace of a built-in allocator (no declared addressing) falls back to the
    defaults that allocator always used."""

    addressing: ClassVar[str]
    kinds: ClassVar[tuple[Kind, ...]] = ()
    State: ClassVar[type[IntEnum]]
    states: ClassVar[tuple[str, ...]] = ()  # State's names, lower case, in value order
    sizes: ClassVar[dict[str, int]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "State" in cls.__dict__:
            cls.states = tuple(s.name.lower() for s in sorted(cls.State, key=int))

    def __init__(self, trace: Any) -> None:
        self.trace = trace
        self.held: dict[int, int] = {}  # seq -> tokens held now
        if declared_addressing(trace) is not None:
            missing = missing_sizes(trace, self.sizes)
            if missing:
                raise ReplayError(missing_message(trace, self.addressing, missing))

    # ---- held tokens (shared by all families) --------------------------------------------------------------
    def held_event(self, code: int, seq: int, n: int, aux: int) -> None:
        if code == _APPEND:
            self.held[seq] = aux
        elif code in (_FORK, _HIT):  # a fork starts with n tokens; an admit with its n prefix hits
            self.held[seq] = n
        elif code == _PREEMPT:
            if aux != SWAP_PREEMPTION:  # recompute drops the tokens; a swapped-out sequence keeps them (on the CPU)
                self.held.pop(seq, None)
        elif code in (_FINISH, _REJECT, _PRUNE):
            self.held.pop(seq, None)

    # ---- to implement ----------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def units(self) -> int:
        """Units of the pool now (blocks, pages, arena rows): the fragmentation map's height."""

    @property
    def snapshot_units(self) -> int:
        """About how many per-unit entries one snapshot holds (for the checkpoint memory budget)."""
        return self.units

    @abstractmethod
    def apply(self, ev: Events, lo: int, hi: int) -> None:
        """Move the state forward by events [lo, hi)."""

    @abstractmethod
    def snapshot(self) -> SnapshotT: ...

    @abstractmethod
    def restore(self, snap: SnapshotT) -> None: ...

    @abstractmethod
    def frame(self) -> pd.DataFrame:
        """block_states rows for the current state (STATE_COLUMNS, then the family's extra columns)."""

    @abstractmethod
    def codes(self) -> np.ndarray:
        """State (a `State` value, int8) of every unit; for the fragmentation map."""

    # ---- helpers -------------------------------------------------------------------------------------------
    def _frame(self, columns: dict[str, Any], extra: list[str]) -> pd.DataFrame:
        """columns["state"] holds State values; it becomes a categorical over `states`."""
        codes = np.asarray(columns["state"], dtype=np.int8)
        columns = dict(columns, state=pd.Categorical.from_codes(codes, categories=list(self.states)))
        return pd.DataFrame({c: columns[c] for c in STATE_COLUMNS + extra})


def missing_message(trace: Any, addressing: str, missing: list[str]) -> str:
    return (
        f"trace {trace_name(trace)!r}: allocator {allocator_name(trace)!r} declares addressing {addressing!r} but its "
        f"allocator_config lacks {', '.join(missing)}: cannot replay its {addressing}"
    )


def trace_name(trace: Any) -> str:
    return str(getattr(trace, "name", None) or "trace")


def allocator_name(trace: Any) -> str:
    meta = getattr(trace, "meta", None) or {}
    return str(meta.get("allocator", "") or "")


# ---- checkpointed timeline ----------------------------------------------------------------------------------
ReplayT = TypeVar("ReplayT", bound=Replay)


class Timeline(Generic[ReplayT]):
    """The replayed state at the end of any step, via snapshots taken on one forward pass."""

    def __init__(self, trace: Any, cls: type[ReplayT]) -> None:
        self.trace = trace
        self.cls = cls
        self.events, self.positions = Events.of(trace, cls.kinds)  # positions: row positions of the events
        self.live: ReplayT = cls(trace)
        # The pool's size before any event: what the maps bin (the live replay grows when an event names a unit
        # beyond the pool, so its size would depend on how far it has been moved).
        self.units = self.live.units
        per_snapshot = SNAPSHOT_BYTES_PER_UNIT * max(self.live.snapshot_units, 1)
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

    def _scratch(self, base: int) -> ReplayT:
        """A fresh replay positioned at checkpoint `base`."""
        scratch = self.cls(self.trace)
        scratch.restore(self.checkpoints[base])
        return scratch

    def at(self, index: int, use: Callable[[ReplayT], Any]) -> Any:
        """use(replay positioned after `index` relevant events)."""
        with self._lock:
            if index >= self.live_at:
                self._advance(index)
                return use(self.live)
            base = index // self.interval * self.interval
            scratch = self._scratch(base)
            scratch.apply(self.events, base, index)
            return use(scratch)

    def at_step(self, step: int, use: Callable[[ReplayT], Any]) -> Any:
        return self.at(self.index_of_step(step), use)

    def scan(self, indices: list[int], use: Callable[[ReplayT], Any]) -> list[Any]:
        """[use(replay after i events) for i in indices] (ascending), in one forward pass."""
        with self._lock:
            if not indices:
                return []
            if indices[0] >= self.live_at:
                out = []
                for i in indices:
                    self._advance(i)
                    out.append(use(self.live))
                return out
            pos = indices[0] // self.interval * self.interval
            scratch = self._scratch(pos)
            out = []
            for i in indices:
                scratch.apply(self.events, pos, i)
                pos = max(pos, i)
                out.append(use(scratch))
            return out
