"""The compact event store (kvscope.event_store) against the plain path: the same batches through Arrow's own
to_pandas (kvscope.trace.table_to_frame) give the same frame, value for value and dtype for dtype, and every
per-kind read equals filtering that frame. Batches of mixed sizes cross the store's big-kind threshold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope import event_store
from kvscope.event_store import EventStore, StoreBuilder
from kvscope.events import COLUMNS, INT_COLUMNS, KIND_BY_NAME, KIND_NAMES, arrow_schema
from kvscope.trace import table_to_frame

KINDS = ["append", "block_alloc", "block_free", "admit", "finish", "acct_used"]
VALUES = st.one_of(
    st.integers(-1, 3),  # columns that hold one value throughout (-1, 0) stay one int
    st.integers(-(2**15), 2**15),
    st.integers(-(2**63), 2**63 - 1),
)


def _batch(rows: list[tuple[str, list[int]]]) -> pa.RecordBatch:
    schema = arrow_schema()
    kinds = pa.DictionaryArray.from_arrays(
        pa.array([KIND_NAMES.index(k) for k, _ in rows], pa.int16()), pa.array(KIND_NAMES, pa.string())
    )
    arrays = []
    value_columns = [c for c in COLUMNS if c != "kind"]
    for c in COLUMNS:
        if c == "kind":
            arrays.append(kinds.cast(schema.field("kind").type))
            continue
        i = value_columns.index(c)
        info = np.iinfo(INT_COLUMNS[c].to_pandas_dtype())
        arrays.append(pa.array([int(np.clip(v[i], info.min, info.max)) for _, v in rows], INT_COLUMNS[c]))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


@st.composite
def batches(draw):
    out = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.sampled_from([0, 1, 7, 40]))
        big = draw(st.booleans())  # one kind repeated past the threshold, as appends are
        rows = [(draw(st.sampled_from(KINDS)), draw(st.lists(VALUES, min_size=9, max_size=9))) for _ in range(n)]
        if big:
            fixed = draw(st.lists(VALUES, min_size=9, max_size=9))
            rows += [("append", [fixed[0] + j, *fixed[1:]]) for j in range(draw(st.sampled_from([5, 60])))]
        out.append(_batch(rows))
    return out


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from([8, 4096]), st.sampled_from([1, 3, 10**9]), st.data())
def test_the_store_reads_back_exactly_what_arrow_reads(batch_list, threshold, sparse, data):
    # every kind's rows looked up by position (1), some (3), or none (the whole index scanned instead)
    original_sparse = event_store.POSITION_SPARSE
    event_store.POSITION_SPARSE = sparse
    try:
        _reads_back(batch_list, threshold, data)
    finally:
        event_store.POSITION_SPARSE = original_sparse


def _reads_back(batch_list, threshold, data):
    original = event_store._BIG
    event_store._BIG = threshold  # small threshold: the per-kind buffers of big kinds are exercised too
    try:
        builder = StoreBuilder()
        for b in batch_list:
            builder.add(b)
        store = builder.finish()
    finally:
        event_store._BIG = original
    expected = table_to_frame(pa.Table.from_batches(batch_list, schema=arrow_schema()))
    got = store.frame()
    assert len(store) == len(expected)
    pd.testing.assert_frame_equal(
        got.assign(kind=got["kind"].astype(str)), expected.assign(kind=expected["kind"].astype(str))
    )
    for kinds in (["append"], ["block_alloc", "block_free"], ["admit", "finish", "acct_used"]):
        codes = [int(KIND_BY_NAME[k]) for k in kinds]
        mask = expected["kind"].astype(str).isin(kinds).to_numpy()
        assert store.count(codes) == int(mask.sum())
        assert np.array_equal(store.rows(codes), np.flatnonzero(mask)), kinds
        positions = store.positions(codes)
        if positions:
            assert np.array_equal(store.selection(positions), store.index[mask]), kinds
        cuts = np.array(sorted(data.draw(st.lists(st.integers(-1, len(expected) + 1), max_size=8))), np.int64)
        before = np.array([int(mask[: max(c, 0)].sum()) for c in cuts], np.int64)
        for block in (2, 1 << 22):
            assert np.array_equal(store.count_before(codes, cuts, block), before), (kinds, block)
        for name in ("seq", "n", "aux", "step", "t_ns"):
            assert np.array_equal(store.values(name, codes), expected[name].to_numpy()[mask]), (kinds, name)
        # read a few rows at a time (slices across chunks): the same values, the kind codes with them
        got_pieces = list(store.pieces(codes, ["t_ns", "seq"], size=3))
        for name in ("t_ns", "seq"):
            joined = np.concatenate([p[name] for p in got_pieces]) if got_pieces else np.zeros(0, np.int64)
            assert np.array_equal(joined, expected[name].to_numpy()[mask]), (kinds, name, "pieces")
    for name in ("t_ns", "step", "aux"):
        for block in (2, event_store.RANK_BLOCK):  # the running maximum, as runs, against the whole column's
            starts, tops = store.running_max(name, block)
            run = np.maximum.accumulate(expected[name].to_numpy().astype(np.int64))
            change = np.flatnonzero(np.r_[True, run[1:] != run[:-1]]) if len(run) else np.zeros(0, np.int64)
            assert np.array_equal(starts, change) and np.array_equal(tops, run[change]), (name, block)
        joined = np.concatenate(list(store.column_pieces(name, 5))) if len(expected) else np.zeros(0)
        assert np.array_equal(joined, expected[name].to_numpy()), (name, "column_pieces")
        if len(expected):
            assert store.value_range(name, [int(KIND_BY_NAME[k]) for k in KINDS]) == (
                int(expected[name].min()),
                int(expected[name].max()),
            )
    # take: any rows, in any order, repeated; the index counted a few entries at a time as well as at once
    if len(expected):
        rows = np.array(data.draw(st.lists(st.integers(0, len(expected) - 1), max_size=30)), np.int64)
        # both ways of ranking rows: counting a few index entries at a time, all at once, and looking positions up
        for block, sparse in ((3, 10**9), (event_store.RANK_BLOCK, 10**9), (event_store.RANK_BLOCK, 0)):
            original = event_store.RANK_BLOCK, event_store.RANK_SPARSE
            event_store.RANK_BLOCK, event_store.RANK_SPARSE = block, sparse
            try:
                for name in ("seq", "t_ns", "aux"):
                    got_take = store.take(name, rows)
                    assert got_take.dtype == expected[name].dtype
                    assert np.array_equal(got_take, expected[name].to_numpy()[rows]), (name, block)
            finally:
                event_store.RANK_BLOCK, event_store.RANK_SPARSE = original


def test_a_store_from_a_frame_keeps_the_frame():
    frame = table_to_frame(pa.Table.from_batches([_batch([("admit", [1] * 9), ("append", [2] * 9)])]))
    assert_same = EventStore.from_frame(frame).frame()
    assert list(assert_same["kind"].astype(str)) == ["admit", "append"]
    assert assert_same["seq"].tolist() == frame["seq"].tolist()
