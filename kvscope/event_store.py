"""A trace's events held by kind, compactly: what kvscope.trace loads and kvscope.analysis reads.

A large trace is mostly a few kinds of rows (one APPEND per generated token, a BLOCK_ALLOC / BLOCK_FREE per block),
and most columns of a kind hold one value throughout (an APPEND's `block`, `bytes`, `addr` and `dur_ns` are -1 or 0).
So the store keeps, per kind, each column either as that single value or as a numpy array of the narrowest integer
type that holds its values (per loaded batch, as offsets from the batch's smallest value where those are narrower:
timestamps, steps and sequence ids), in row order; plus, for every row, the index of its kind in the trace's kind
dictionary (int16). A 21-million-event trace (1.6 GB as ten int64-ish columns) takes about 0.29 GB so; nothing is
lost: every value reads back exactly, with the column's own dtype (`values`, `column`, `frame`).

The analysis asks for the rows of some kinds (`values(name, kinds)`) and never for the whole table; the pandas
DataFrame of every event (`frame()`, what `Trace.events` returns) is built only when a surface asks for it. The row
positions of the few-row kinds (ACCT samples, STEP rows, lifecycle events: a few rows a step) are found once, in one
pass over the index, and kept (`sparse_positions`): reading those kinds then never scans every row again.

Built batch by batch (`StoreBuilder.add`), so that loading never holds more than one decoded batch besides the
store; or at once from a DataFrame of events (`EventStore.from_frame`).
"""

# This module is longer than 400 lines: loading (StoreBuilder) and reading (EventStore) share one representation of
# a kind's column (an int, an array or Chunks); kept together, the two sides cannot disagree on it.

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from kvscope.events import COLUMNS, INT_COLUMNS, KIND_BY_NAME, KIND_NAMES

VALUE_COLUMNS: list[str] = [c for c in COLUMNS if c != "kind"]  # the nine integer columns, in schema order
_NARROW = (np.int8, np.int16, np.int32, np.int64)
_INFO = [np.iinfo(t) for t in _NARROW]

Part = dict[str, Any]  # column name -> numpy array (the kind's rows, in row order) or one int (all rows agree)


def narrow_dtype(lo: int, hi: int) -> type:
    """The narrowest signed integer type holding every value in [lo, hi]."""
    for t, info in zip(_NARROW, _INFO, strict=True):
        if info.min <= lo and hi <= info.max:
            return t
    return np.int64


RANK_BLOCK = 1 << 22  # EventStore.take counts a kind's rows this many index entries at a time
RANK_SPARSE = 8  # ... unless the kind has at most one row in this many: then it looks its rows' positions up
_BIG = 4096  # a kind with at least this many rows in a batch appends that batch's rows to buffers of its own


def _compact(values: np.ndarray) -> Any:
    """One int when every value agrees, else the values in the narrowest integer type that holds them."""
    if not len(values):
        return 0
    lo, hi = int(values.min()), int(values.max())
    return lo if lo == hi else values.astype(narrow_dtype(lo, hi))


class Offset:
    """One chunk of a column as base + small offsets: a batch's timestamps, steps and sequence ids are large
    numbers close to each other (an APPEND's t_ns needs int64 but spans well under 2**31 in one batch), so this
    halves or quarters what they take. Reads back as the values themselves, in `dtype`."""

    __slots__ = ("base", "dtype", "hi", "offsets")

    def __init__(self, base: int, offsets: np.ndarray, hi: int) -> None:
        self.base = base
        self.offsets = offsets
        self.hi = hi  # the largest value
        self.dtype = np.dtype(narrow_dtype(base, hi))

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes)

    def __getitem__(self, at: Any) -> np.ndarray:
        """The values at a slice or an index array."""
        out = self.offsets[at].astype(self.dtype)
        out += self.dtype.type(self.base)
        return out

    def min(self) -> int:
        return self.base + int(self.offsets.min())

    def max(self) -> int:
        return self.hi


def _offset_or_array(values: np.ndarray, lo: int, hi: int) -> np.ndarray | Offset:
    """values (all within [lo, hi]) in the narrowest form: as offsets from lo where those are narrower."""
    full, offsets = narrow_dtype(lo, hi), narrow_dtype(0, hi - lo)
    if np.dtype(offsets).itemsize < np.dtype(full).itemsize:
        # values - lo lies in [0, hi - lo], which the narrower type holds: no overflow in values' own dtype
        return Offset(lo, (values - values.dtype.type(lo)).astype(offsets), hi)
    return values.astype(full)


class Chunks(list):
    """A column of one kind kept as the chunks it was loaded in (one per batch where the kind is big), each an
    array of the narrowest type holding its own values, an Offset (base + narrow offsets), or (value, rows) for a
    run of one value: never copied into one array while loading, so loading holds each value once. `EventStore`
    joins them when a caller reads."""

    @property
    def rows(self) -> int:
        return sum(c[1] if isinstance(c, tuple) else len(c) for c in self)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self if isinstance(c, np.ndarray | Offset))

    def join(self, dtype: Any = None) -> np.ndarray:
        if dtype is None:
            dtype = np.result_type(*[narrow_dtype(c[0], c[0]) if isinstance(c, tuple) else c.dtype for c in self])
        out = np.empty(self.rows, dtype)
        at = 0
        for c in self:
            n = c[1] if isinstance(c, tuple) else len(c)
            if isinstance(c, Offset):
                out[at : at + n] = c.offsets
                out[at : at + n] += out.dtype.type(c.base)  # (the sum is a value of the column: out's dtype holds it)
            else:
                out[at : at + n] = c[0] if isinstance(c, tuple) else c
            at += n
        return out

    def max(self) -> int:
        return max(int(c[0]) if isinstance(c, tuple) else int(c.max()) for c in self)

    def min(self) -> int:
        return min(int(c[0]) if isinstance(c, tuple) else int(c.min()) for c in self)


class _Buffer:
    """A growing column of one kind while loading: one value while every value agrees, else Chunks."""

    __slots__ = ("chunks", "hi", "lo", "rows")

    def __init__(self) -> None:
        self.chunks: Chunks | None = None
        self.lo = 0
        self.hi = -1  # lo > hi: empty
        self.rows = 0

    def add(self, values: np.ndarray, lo: int, hi: int) -> None:
        n = len(values)
        if self.chunks is None:
            if self.lo > self.hi:
                self.lo, self.hi = lo, hi
            if lo == hi == self.lo == self.hi:  # still one value
                self.rows += n
                return
            self.chunks = Chunks([(self.lo, self.rows)] if self.rows else [])
        if lo == hi:
            self.chunks.append((lo, n))
        else:
            self.chunks.append(_offset_or_array(values, lo, hi))
        self.rows += n

    def finish(self) -> Any:
        if self.chunks is None:
            return int(self.lo) if self.rows else 0
        if len(self.chunks) == 1 and isinstance(self.chunks[0], np.ndarray):
            return self.chunks[0]
        return self.chunks


class StoreBuilder:
    """Collects record batches of the trace schema into an EventStore, one batch at a time. The rows of the kinds
    that are big in a batch go to buffers per kind and column; the rows of the other kinds (a batch holds some
    thirty kinds, most with a row or two per step) to one set of buffers, split by kind once, at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._where: dict[str, int] = {}
        self._index: list[np.ndarray] = []
        self._counts = np.zeros(0, np.int64)
        self._big: dict[int, dict[str, _Buffer]] = {}
        self._small = {c: _Buffer() for c in (*VALUE_COLUMNS, "kind", "batch")}
        self._batches = 0
        self.rows = 0

    def _remap(self, dictionary: list[str]) -> np.ndarray:
        out = np.empty(len(dictionary), np.int16)
        for i, name in enumerate(dictionary):
            if name not in self._where:
                self._where[name] = len(self.names)
                self.names.append(name)
            out[i] = self._where[name]
        return out

    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add a validated batch (no nulls, kind dictionary-encoded)."""
        if isinstance(batch, pa.Table):
            for b in batch.to_batches():
                self.add(b)
            return
        if not batch.num_rows:
            return
        batch_no = self._batches
        self._batches += 1
        kind = batch.column("kind")
        remap = self._remap(kind.dictionary.to_pylist())
        gidx = remap[kind.indices.to_numpy(zero_copy_only=False)]
        self._index.append(gidx)
        self.rows += len(gidx)
        counts = np.bincount(gidx, minlength=len(self.names))
        if len(self._counts) < len(counts):
            self._counts = np.r_[self._counts, np.zeros(len(counts) - len(self._counts), np.int64)]
        self._counts[: len(counts)] += counts
        present = np.flatnonzero(counts)
        order = np.argsort(gidx, kind="stable") if len(present) > 1 else None
        sorted_kinds = gidx[order] if order is not None else gidx
        ends = np.cumsum(counts[present])
        starts = ends - counts[present]
        # once big, a kind stays big: its rows from then on go to its own buffers, however few
        big = [i for i, k in enumerate(present.tolist()) if counts[k] >= _BIG or k in self._big]
        small_rows: np.ndarray | None = None
        if len(big) < len(present):
            small_rows = np.ones(len(gidx), bool)
            for i in big:
                small_rows[starts[i] : ends[i]] = False
            rest_kinds = sorted_kinds[small_rows]
            self._small["kind"].add(rest_kinds, 0, len(self.names))  # (the ranges keep them arrays)
            self._small["batch"].add(np.full(len(rest_kinds), batch_no, np.int32), -1, batch_no)
        for name in VALUE_COLUMNS:
            values = batch.column(name).to_numpy(zero_copy_only=False)
            if order is not None:
                values = values[order]
            if big:
                los = np.minimum.reduceat(values, starts)
                his = np.maximum.reduceat(values, starts)
                for i in big:
                    k = int(present[i])
                    part = self._big.get(k)
                    if part is None:
                        part = self._big[k] = {c: _Buffer() for c in VALUE_COLUMNS}
                    part[name].add(values[starts[i] : ends[i]], int(los[i]), int(his[i]))
            if small_rows is not None:
                rest = values[small_rows] if big else values
                self._small[name].add(rest, int(rest.min()), int(rest.max()))

    def _split_small(self) -> tuple[dict[int, Part], dict[int, np.ndarray]]:
        """The rows gathered from the batches where their kind was small, by kind: (kind position -> its columns,
        compact; kind position -> the batch number of each row), in row order. One column at a time, so that the
        gathered rows are never held twice over."""
        n = self._small["batch"].rows
        if not n:
            return {}, {}
        kinds = _join(self._small.pop("kind").finish(), n).astype(np.int16)
        order = np.argsort(kinds, kind="stable")
        counts = np.bincount(kinds[order], minlength=len(self.names))
        del kinds
        present = np.flatnonzero(counts).tolist()
        ends = np.cumsum(counts[present]).tolist()
        bounds = list(zip(present, [0, *ends[:-1]], ends, strict=True))
        parts: dict[int, Part] = {k: {} for k in present}
        batches: dict[int, np.ndarray] = {}
        for name in [*VALUE_COLUMNS, "batch"]:
            values = _join(self._small.pop(name).finish(), n)[order]
            for k, s, e in bounds:
                if name == "batch":
                    batches[k] = values[s:e].copy()
                else:
                    parts[k][name] = _compact(values[s:e])
            del values
        return parts, batches

    def finish(self, dtypes: dict[str, np.dtype] | None = None) -> EventStore:
        index = np.concatenate(self._index) if self._index else np.zeros(0, np.int16)
        self._index = []
        small, small_batches = self._split_small()
        parts: dict[int, Part] = {}
        for k in sorted(set(self._big) | set(small)):
            rows = small.get(k)
            big = self._big.pop(k, None)
            if big is None:
                assert rows is not None
                parts[k] = rows
            elif rows is None:
                parts[k] = {c: b.finish() for c, b in big.items()}
            else:
                n_small = len(small_batches[k])
                parts[k] = {c: _merge(b.finish(), b.rows, rows[c], n_small) for c, b in big.items()}
        names = self.names or list(KIND_NAMES)
        counts = np.r_[self._counts, np.zeros(len(names) - len(self._counts), np.int64)]
        return EventStore(names, index, parts, dtypes, counts=counts)


def _join(value: Any, rows: int, dtype: Any = None) -> np.ndarray:
    """A part's column (one int, an array or Chunks) as one array."""
    if isinstance(value, Chunks):
        return value.join(dtype)
    if isinstance(value, np.ndarray):
        return value if dtype is None or value.dtype == dtype else value.astype(dtype)
    return np.full(rows, value, dtype=dtype if dtype is not None else narrow_dtype(value, value))


POSITION_SPARSE = 32  # EventStore.sparse_positions keeps the row positions of the kinds with at most 1 row in this many
MERGED_KEEP = 8  # ... and the merge orders of this many lists of such kinds
MEMBER_RUNS = 6  # EventStore.member compares runs of kind positions up to this many, else looks each row up


def _runs(ks: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ints as (first, last) runs of consecutive values."""
    out: list[tuple[int, int]] = []
    for k in ks:
        if out and out[-1][1] == k - 1:
            out[-1] = (out[-1][0], k)
        else:
            out.append((k, k))
    return out


def _scatter(here: np.ndarray, parts: dict[int, np.ndarray]) -> np.ndarray:
    """Rows of several kinds back in row order: `here` the rows' kind positions, `parts` each kind's values in row
    order (keys: the positions present). The kind with the most rows (a piece is mostly APPEND rows) goes in
    through a mask, the few others through their positions (a stable sort of theirs alone): several times less
    work than sorting every row's kind. One pass, whatever the number of kinds."""
    out = np.empty(len(here), np.result_type(*[v.dtype for v in parts.values()]))
    top = max(parts, key=lambda k: len(parts[k]))
    is_top = here == top
    out[is_top] = parts[top]
    others = np.flatnonzero(~is_top)
    others = others[np.argsort(here[others], kind="stable")]  # (int16: by radix) by kind, row order within one
    at = 0
    for k in sorted(parts):
        if k != top:
            v = parts[k]
            out[others[at : at + len(v)]] = v
            at += len(v)
    return out


def _gather(value: np.ndarray | Chunks, ranks: np.ndarray) -> np.ndarray:
    """value[ranks] for a part's column held as one array or as Chunks (read chunk by chunk, never joined)."""
    if isinstance(value, np.ndarray):
        return value[ranks]
    sizes = np.array([c[1] if isinstance(c, tuple) else len(c) for c in value], np.int64)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    which = np.searchsorted(starts, ranks, side="right") - 1
    out = np.empty(len(ranks), np.int64)
    for c in np.unique(which).tolist():
        here = which == c
        chunk = value[c]
        out[here] = chunk[0] if isinstance(chunk, tuple) else chunk[ranks[here] - starts[c]]
    return out


def _record_ranks(value: Any) -> tuple[np.ndarray, np.ndarray]:
    """A kind's column (one int, an array or Chunks): the places of the rows whose value exceeds every value before
    them (the first row included), and those values (int64)."""
    if not isinstance(value, np.ndarray | Chunks):
        return np.zeros(1, np.int64), np.array([int(value)], np.int64)
    chunks = [value] if isinstance(value, np.ndarray) else value
    ranks: list[np.ndarray] = []
    tops: list[np.ndarray] = []
    carry: int | None = None  # the largest value before the chunk
    at = 0
    for c in chunks:
        if isinstance(c, tuple):
            if carry is None or c[0] > carry:
                ranks.append(np.array([at], np.int64))
                tops.append(np.array([c[0]], np.int64))
                carry = int(c[0])
            at += c[1]
            continue
        run = np.maximum.accumulate(c[:].astype(np.int64))  # (an Offset's slice reads back as its values)
        if carry is not None:
            run = np.maximum(run, carry)
        new = np.flatnonzero(np.r_[carry is None or run[0] > carry, run[1:] > run[:-1]])
        ranks.append(new + at)
        tops.append(run[new])
        carry = int(run[-1])
        at += len(c)
    return np.concatenate(ranks), np.concatenate(tops)


def _merge(big: Any, big_rows: int, small: Any, small_rows: int) -> Any:
    """A kind's column in row order, from its rows of the batches where it was small (which come first: a kind
    stays big once it is) and those where it was big."""
    if not isinstance(big, np.ndarray) and not isinstance(small, np.ndarray) and big == small:
        return big  # both one int (Chunks is a list, never equal to an int)
    head = [small] if isinstance(small, np.ndarray) else [(small, small_rows)]
    tail = list(big) if isinstance(big, Chunks) else [big] if isinstance(big, np.ndarray) else [(big, big_rows)]
    return Chunks(head + tail)


_SCHEMA_DTYPES: dict[str, np.dtype] = {c: np.dtype(t.to_pandas_dtype()) for c, t in INT_COLUMNS.items()}


class EventStore:
    """Events by kind (see the module docstring). `names`: the kind dictionary; `index`: each row's position in it
    (int16); `parts`: dictionary position -> column -> array or int; `dtypes`: each column's dtype as read."""

    def __init__(
        self,
        names: Sequence[str],
        index: np.ndarray,
        parts: dict[int, Part],
        dtypes: dict[str, np.dtype] | None = None,
        counts: np.ndarray | None = None,
    ) -> None:
        self.names = list(names)
        self.index = index
        self.parts = parts
        self.dtypes = dict(dtypes or _SCHEMA_DTYPES)
        self.lookup = np.array([int(KIND_BY_NAME.get(n, -1)) for n in self.names] + [-1], np.int16)
        if counts is None:
            counts = np.bincount(index, minlength=len(self.names)) if len(index) else np.zeros(len(self.names), int)
        self.counts = np.asarray(counts, np.int64)
        self._codes: np.ndarray | None = None
        self._selected: tuple[tuple[int, ...], np.ndarray] | None = None
        self._sparse: dict[int, np.ndarray] | None = None  # kind position -> its row positions (few-row kinds)
        self._merged: dict[tuple[int, ...], np.ndarray] = {}  # sparse kinds -> order of their rows (see _merge_order)

    # ---- what the store holds ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        arrays = [v for part in self.parts.values() for v in part.values() if isinstance(v, np.ndarray | Chunks)]
        return int(self.index.nbytes + sum(a.nbytes for a in arrays))

    @property
    def codes(self) -> np.ndarray:
        """Kind value (int16) of every row; -1 for a kind name this kvscope does not know."""
        if self._codes is None:
            present = np.flatnonzero(self.counts)
            if np.array_equal(self.lookup[present], present):
                self._codes = self.index  # the file's dictionary is kvscope's own: positions are Kind values
            else:
                self._codes = self.lookup[self.index]
        return self._codes

    def positions(self, kinds: Iterable[int]) -> list[int]:
        """Dictionary positions of the rows of these Kind values that occur in the trace."""
        wanted = {int(k) for k in kinds}
        return [k for k in np.flatnonzero(self.counts).tolist() if int(self.lookup[k]) in wanted]

    def count(self, kinds: Iterable[int]) -> int:
        return int(sum(int(self.counts[k]) for k in self.positions(kinds)))

    def kind_counts(self) -> list[tuple[str, int]]:
        """(kind name, rows) for every name of the dictionary, in dictionary order."""
        return list(zip(self.names, self.counts.tolist(), strict=True))

    # ---- the rows of few-row kinds, by position -------------------------------------------------------------------
    def sparse_positions(self) -> dict[int, np.ndarray]:
        """Row positions (ascending, in the narrowest integer type: int32 below 2**31 rows) of the rows of every
        kind with at most one row in POSITION_SPARSE, found in one pass over the index and kept: a large trace is
        mostly a few big kinds, and what the analysis reads most (the ACCT samples, STEP rows, lifecycle events)
        is a few rows a step, so reading them by position never scans all rows again. Together they hold a small
        share of the rows (7% of a 21.5-million-event trace: 6 MB)."""
        sparse = self._sparse  # (read once: another thread may build it meanwhile, with the same result)
        if sparse is None:
            n = len(self.index)
            small = [k for k in np.flatnonzero(self.counts).tolist() if int(self.counts[k]) * POSITION_SPARSE <= n]
            sparse = {}
            if small:
                table = np.zeros(len(self.names) + 1, bool)
                table[small] = True
                rows = np.flatnonzero(table[self.index])
                kinds = self.index[rows]
                order = np.argsort(kinds, kind="stable")  # (int16: by radix) each kind's rows together, in order
                counts = np.bincount(kinds, minlength=len(self.names))
                rows = rows.astype(narrow_dtype(0, n))  # (kept: int32 halves them on any trace below 2**31 rows)
                at = 0
                for k in small:
                    c = int(counts[k])
                    sparse[k] = rows[order[at : at + c]]
                    at += c
            self._sparse = sparse
        return sparse

    def _merge_order(self, ks: Sequence[int]) -> np.ndarray | None:
        """For kinds whose rows sparse_positions holds (None otherwise): the permutation that puts the
        concatenation of their rows (kind after kind, in the order of `ks`) in row order. Kept per kind list."""
        key = tuple(ks)
        order = self._merged.get(key)
        if order is None:
            sparse = self.sparse_positions()
            if not all(k in sparse for k in ks):
                return None
            at = np.concatenate([sparse[k] for k in ks])
            order = np.argsort(at, kind="stable").astype(narrow_dtype(0, len(at)))  # (kept: narrow)
            for old in list(self._merged)[: max(len(self._merged) - MERGED_KEEP + 1, 0)]:
                self._merged.pop(old, None)  # the oldest first (a dict keeps insertion order)
            self._merged[key] = order
        return order

    def _sparse_rows(self, ks: Sequence[int]) -> np.ndarray | None:
        """rows(ks) from sparse_positions, None where some kind is not held there."""
        sparse = self.sparse_positions()
        if not all(k in sparse for k in ks):
            return None
        if len(ks) == 1:
            return sparse[ks[0]].astype(np.int64)
        order = self._merge_order(ks)
        assert order is not None
        return np.concatenate([sparse[k] for k in ks])[order].astype(np.int64)

    # ---- reading -------------------------------------------------------------------------------------------------
    def member(self, ks: Sequence[int], index: np.ndarray | None = None) -> np.ndarray:
        """Whether each row's kind (dictionary position) is among `ks`. The positions asked for are mostly a few
        runs of neighbours (the dictionary lists kinds by family), and a comparison or two per run is several times
        faster than a table lookup per row (np.isin sorts); many runs take the lookup."""
        index = self.index if index is None else index
        runs = _runs(sorted({int(k) for k in ks}))
        if len(runs) > MEMBER_RUNS:
            table = np.zeros(len(self.names) + 1, bool)
            table[np.asarray(ks, np.int64)] = True
            return table[index]
        out = np.zeros(len(index), bool)
        for lo, hi in runs:
            out |= (index == lo) if lo == hi else ((index >= lo) & (index <= hi))
        return out

    def _part_values(self, k: int, name: str, dtype: np.dtype | None) -> np.ndarray:
        return _join(self.parts[k][name], int(self.counts[k]), self.dtypes[name] if dtype is None else dtype)

    def selection(self, ks: list[int]) -> np.ndarray:
        """The dictionary position of each row of these kinds, in row order (the last one asked for is kept)."""
        key = tuple(ks)
        selected = self._selected  # (read once: another thread may replace it meanwhile)
        if selected is None or selected[0] != key:
            rows = self._sparse_rows(ks)
            selected = (key, self.index[self.member(ks)] if rows is None else self.index[rows])
            self._selected = selected
        return selected[1]

    def values(self, name: str, kinds: Iterable[int], dtype: Any = None) -> np.ndarray:
        """Column `name` of the rows of these kinds, in row order, as `dtype` (default: the column's own)."""
        ks = self.positions(kinds)
        want = np.dtype(self.dtypes[name] if dtype is None else dtype)
        if not ks:
            return np.zeros(0, want)
        if len(ks) == 1:
            return self._part_values(ks[0], name, want)
        order = self._merge_order(ks)
        if order is not None:  # each kind's values, kind after kind, put in row order
            return np.concatenate([self._part_values(k, name, want) for k in ks])[order]
        sel = self.selection(ks)
        out = np.empty(len(sel), want)
        for k in ks:
            value = self.parts[k][name]
            out[sel == k] = value.join() if isinstance(value, Chunks) else value
        return out

    def _slice(self, k: int, name: str, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of kind position k's column, in its stored (narrow) dtype."""
        value = self.parts[k][name]
        if isinstance(value, np.ndarray):
            return value[a:b]
        if not isinstance(value, Chunks):
            return np.full(b - a, value, narrow_dtype(value, value))
        pieces, at = [], 0
        for c in value:
            n = c[1] if isinstance(c, tuple) else len(c)
            lo, hi = max(a, at), min(b, at + n)
            if lo < hi:
                pieces.append(
                    np.full(hi - lo, c[0], narrow_dtype(c[0], c[0])) if isinstance(c, tuple) else c[lo - at : hi - at]
                )  # (an Offset's slice reads back as its values)
            at += n
            if at >= b:
                break
        return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]

    def pieces(
        self, kinds: Iterable[int], names: Sequence[str], size: int = 1 << 21
    ) -> Iterable[dict[str, np.ndarray]]:
        """The rows of these kinds in row order, `size` rows at a time: per piece, {"code": Kind values, name:
        values (the narrowest dtype holding them) for each name}. Memory stays bounded by the piece size."""
        ks = self.positions(kinds)
        if not ks:
            return
        sel = self.selection(ks) if len(ks) > 1 else None
        total = int(sum(int(self.counts[k]) for k in ks))
        done = dict.fromkeys(ks, 0)  # rows of each kind handed out so far
        for a in range(0, total, size):
            b = min(a + size, total)
            if sel is None:
                k = ks[0]
                piece = {name: self._slice(k, name, a, b) for name in names}
                piece["code"] = np.full(b - a, self.lookup[k], np.int16)
                yield piece
                continue
            here = sel[a:b]
            piece = {"code": self.lookup[here]}
            counts = np.bincount(here, minlength=len(self.names))
            for name in names:
                parts = {k: self._slice(k, name, done[k], done[k] + int(counts[k])) for k in ks if counts[k]}
                piece[name] = next(iter(parts.values())) if len(parts) == 1 else _scatter(here, parts)
            for k in ks:
                done[k] += int(counts[k])
            yield piece

    def column_pieces(self, name: str, size: int = 1 << 21) -> Iterable[np.ndarray]:
        """column(name) in row order, `size` rows at a time (each piece in the narrowest dtype holding its values,
        every kind of the dictionary included): memory stays bounded by the piece size."""
        present = np.flatnonzero(self.counts).tolist()
        done = dict.fromkeys(present, 0)  # rows of each kind handed out so far
        for a in range(0, len(self.index), size):
            here = self.index[a : a + size]
            counts = np.bincount(here, minlength=len(self.names))
            ks = [k for k in present if counts[k]]
            parts = {k: self._slice(k, name, done[k], done[k] + int(counts[k])) for k in ks}
            out = parts[ks[0]] if len(ks) == 1 else _scatter(here, parts)
            for k in ks:
                done[k] += int(counts[k])
            yield out

    def running_max(self, name: str, block: int = RANK_BLOCK) -> tuple[np.ndarray, np.ndarray]:
        """The running maximum of a column over every row, in row order, as runs: (starts, values) with starts the
        row where each run begins (int64, ascending, the first 0) and values each run's maximum (int64, strictly
        increasing). Without scattering the column into row order: the running maximum only rises at a row whose
        value exceeds every earlier value of its own kind, so each kind's few such rows (found in its stored
        order), put in row order, decide it."""
        rows: list[np.ndarray] = []
        tops: list[np.ndarray] = []
        sparse = self.sparse_positions()
        for k in np.flatnonzero(self.counts).tolist():
            ranks, values = _record_ranks(self.parts[k][name])
            rows.append(sparse[k][ranks].astype(np.int64) if k in sparse else self._rows_at_ranks(k, ranks, block))
            tops.append(values)
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        at = np.concatenate(rows)
        order = np.argsort(at, kind="stable")
        run = np.maximum.accumulate(np.concatenate(tops)[order])
        change = np.r_[True, run[1:] != run[:-1]]
        return at[order][change], run[change]

    def _rows_at_ranks(self, k: int, ranks: np.ndarray, block: int) -> np.ndarray:
        """Row positions of the rows of kind position k with these places among its rows (ascending), a block of
        the index at a time."""
        out = np.empty(len(ranks), np.int64)
        base = 0
        for a in range(0, len(self.index), block):
            if base > int(ranks[-1]):
                break
            hits = np.flatnonzero(self.index[a : a + block] == k)
            lo, hi = np.searchsorted(ranks, [base, base + len(hits)], side="left")
            if hi > lo:
                out[lo:hi] = a + hits[ranks[lo:hi] - base]
            base += len(hits)
        return out

    def value_range(self, name: str, kinds: Iterable[int]) -> tuple[int, int] | None:
        """(min, max) of a column over the rows of these kinds; None when there are none."""
        lo: int | None = None
        hi: int | None = None
        for k in self.positions(kinds):
            value = self.parts[k][name]
            if isinstance(value, Chunks):
                a, b = value.min(), value.max()
            elif isinstance(value, np.ndarray):
                a, b = int(value.min()), int(value.max())
            else:
                a = b = int(value)
            lo, hi = (a, b) if lo is None or hi is None else (min(lo, a), max(hi, b))
        return None if lo is None or hi is None else (lo, hi)

    def count_before(self, kinds: Iterable[int], positions: np.ndarray, block: int = 1 << 22) -> np.ndarray:
        """For each row position of a non-decreasing array: how many rows of these kinds come before it."""
        ks = self.positions(kinds)
        positions = np.asarray(positions, np.int64)
        out = np.zeros(len(positions), np.int64)
        sparse = self.sparse_positions()
        for k in [k for k in ks if k in sparse]:  # kinds held by position: a binary search each
            out += np.searchsorted(sparse[k], positions, side="left")
        ks = [k for k in ks if k not in sparse]
        if not ks:
            return out
        rest = np.zeros(len(positions), np.int64)  # the other kinds: counted a block of the index at a time
        base = 0
        for a in range(0, len(self.index), block):
            b = min(a + block, len(self.index))
            lo, hi = np.searchsorted(positions, [a + 1, b], side="left")[0], np.searchsorted(positions, b, side="right")
            hits = self.member(ks, self.index[a:b])
            if hi > lo:
                c = np.cumsum(hits, dtype=np.int32 if b - a < (1 << 31) else np.int64)  # (a block's count)
                rest[lo:hi] = base + c[positions[lo:hi] - 1 - a].astype(np.int64)
            base += int(hits.sum())
        rest[positions >= len(self.index)] = base
        return out + rest

    def rows(self, kinds: Iterable[int]) -> np.ndarray:
        """Row positions (int64) of the rows of these kinds, ascending."""
        ks = self.positions(kinds)
        if not ks:
            return np.zeros(0, np.int64)
        rows = self._sparse_rows(ks)
        if rows is not None:
            return rows
        if len(ks) == 1:
            return np.flatnonzero(self.index == ks[0])
        return np.flatnonzero(self.member(ks))

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Column `name` at the given row positions, with the column's dtype."""
        rows = np.asarray(rows, np.int64)
        out = np.empty(len(rows), self.dtypes[name])
        if not len(rows):
            return out
        at = self.index[rows]
        for k in np.unique(at).tolist():
            here = np.flatnonzero(at == k)
            value = self.parts[k][name]
            if isinstance(value, np.ndarray | Chunks):
                out[here] = _gather(value, self._ranks(k, rows[here]))
            else:
                out[here] = value
        return out

    def _ranks(self, k: int, rows: np.ndarray) -> np.ndarray:
        """Each row's place among the rows of kind position k (rows of that kind), a block of the index at a
        time: memory stays bounded by the block, not the trace."""
        if int(self.counts[k]) * RANK_SPARSE <= len(self.index):
            # a kind of few rows: their positions (8 bytes each) and a binary search
            held = self.sparse_positions().get(k)
            return np.searchsorted(np.flatnonzero(self.index == k) if held is None else held, rows)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        ranks = np.empty(len(rows), np.int64)
        base = 0
        block = RANK_BLOCK
        for a in range(0, int(sorted_rows[-1]) + 1, block):
            b = min(a + block, len(self.index))
            lo, hi = np.searchsorted(sorted_rows, [a, b], side="left")
            hits = self.index[a:b] == k
            if hi > lo:
                ranks[order[lo:hi]] = base + np.cumsum(hits, dtype=np.int64)[sorted_rows[lo:hi] - a] - 1
            base += int(hits.sum())
        return ranks

    def column(self, name: str) -> np.ndarray:
        """A whole column in row order (its dtype as read): n_rows values, so only for what needs every row."""
        out = np.empty(len(self.index), self.dtypes[name])
        present = np.flatnonzero(self.counts).tolist()
        for k in present:
            value = self.parts[k][name]
            value = value.join() if isinstance(value, Chunks) else value
            if len(present) == 1:
                out[:] = value
            else:
                out[self.index == k] = value
        return out

    def max(self, name: str) -> int | None:
        """The largest value of a column over every row (None for an empty trace)."""
        best: int | None = None
        for k in np.flatnonzero(self.counts).tolist():
            value = self.parts[k][name]
            top = int(value.max()) if isinstance(value, np.ndarray | Chunks) else int(value)
            best = top if best is None else max(best, top)
        return best

    def frame(self) -> pd.DataFrame:
        """Every event as a DataFrame (Trace.events): the schema's columns in order, `kind` a categorical over the
        kind dictionary."""
        data: dict[str, Any] = {}
        for name in COLUMNS:
            if name == "kind":
                data[name] = pd.Categorical.from_codes(self.index.astype(np.int16), categories=self.names)
            else:
                data[name] = self.column(name)
        return pd.DataFrame(data)

    # ---- other sources -------------------------------------------------------------------------------------------
    @classmethod
    def from_frame(cls, events: pd.DataFrame) -> EventStore:
        """A store over an events DataFrame built by hand or by an older API: its columns keep their dtypes."""
        kind = events["kind"] if "kind" in events.columns else pd.Series([], dtype=object)
        if isinstance(kind.dtype, pd.CategoricalDtype):
            names = [str(c) for c in kind.cat.categories]
            codes = kind.cat.codes.to_numpy()
            if (codes < 0).any():  # a missing kind: a name of its own, unknown to kvscope
                names = [*names, ""]
                codes = np.where(codes < 0, len(names) - 1, codes)
        else:
            uniq, codes = np.unique(kind.astype(str).to_numpy(), return_inverse=True)
            names = [str(u) for u in uniq]
        index = np.asarray(codes, np.int16)
        dtypes: dict[str, np.dtype] = {}
        parts: dict[int, Part] = {}
        present = np.flatnonzero(np.bincount(index, minlength=len(names))).tolist() if len(index) else []
        masks = {k: index == k for k in present} if len(present) > 1 else {}
        for name in VALUE_COLUMNS:
            values = events[name].to_numpy() if name in events.columns else np.zeros(len(events), np.int64)
            dtypes[name] = values.dtype
            for k in present:
                chunk = values[masks[k]] if masks else values
                part = parts.setdefault(k, {})
                if values.dtype.kind == "i" and len(chunk):
                    part[name] = _compact(chunk)
                else:
                    part[name] = np.array(chunk)
        return cls(names, index, parts, dtypes)
