"""Analysis in bounded memory (issue 13): the step runs that stand in for a per-row running step, the store's
piecewise column reads and row lookups, and the surfaces (summary, report) never building the whole events frame."""

from __future__ import annotations

import numpy as np
import pytest
from test_analysis_tracegen import Script, make_requests, record, scenario_fork, scenario_prefix

from kvscope.analysis import _events
from kvscope.analysis.summary import summarize
from kvscope.events import Kind


def _old_running_step(trace) -> np.ndarray:
    steps = trace.store.column("step")
    return np.maximum.accumulate(steps) if len(steps) else steps


def _traces():
    out = [scenario_fork(), scenario_prefix(), record("paged", make_requests(12, seed=4))]
    s = Script("paged", {})  # rows outside steps, before and between steps, and a step number going back
    s.emit(Kind.ARRIVE, seq=0, n=3, aux=1).at(2).emit(Kind.ADMIT, seq=0, n=3).at(-1).emit(Kind.ARRIVE, seq=1)
    s.at(1).emit(Kind.FINISH, seq=0).at(5).step_end()
    out.append(s.trace())
    out.append(Script("paged", {}).trace(close=False))  # no rows at all
    return out


@pytest.mark.parametrize("piece", [1, 7, _events.STEP_PIECE_ROWS])
def test_step_runs_give_the_running_step_of_every_row(monkeypatch, piece):
    monkeypatch.setattr(_events, "STEP_PIECE_ROWS", piece)
    for trace in _traces():
        run = _old_running_step(trace)
        got = _events.running_step(trace)
        assert got.dtype == run.dtype and np.array_equal(got, run)
        rows = np.arange(len(run))
        assert np.array_equal(_events.step_of_rows(trace, rows), run)
        for step in (-2, -1, 0, 1, 3, 10**6):
            assert _events._rows_before(trace, step) == int(np.searchsorted(run, step, side="right"))


@pytest.mark.parametrize("piece", [1, 5, 1 << 21])
def test_column_pieces_read_every_column_in_row_order(piece):
    for trace in _traces():
        store = trace.store
        for name in ("step", "seq", "t_ns", "aux"):
            pieces = list(store.column_pieces(name, piece))
            got = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
            assert np.array_equal(got, store.column(name)), name


def test_summary_reads_the_store_and_never_builds_the_events_frame():
    trace = record("paged", make_requests(20, seed=2, n_max=2), prefix_caching=True)
    trace._events = None  # as loaded from a file: the store only
    summarize(trace)
    assert trace._events is None


def test_the_report_never_builds_the_events_frame(tmp_path):
    from kvscope.report import build_report

    trace = record("paged", make_requests(20, seed=2, n_max=2), prefix_caching=True)
    trace._events = None
    build_report([trace])
    assert trace._events is None


def test_loading_builds_the_store_beside_the_reader_and_raises_what_building_raised(tmp_path, monkeypatch):
    """load_trace hands batches to a worker thread that builds the store: the store is the same as building it in
    the reading thread, and an error there (memory running out, say) comes out of load_trace, not lost."""
    import threading

    from kvscope import event_store
    from kvscope.trace import load_trace, read_table

    path = tmp_path / "run.kvtrace"
    record("paged", make_requests(30, seed=8), path=path)
    _, table, _ = read_table(path)
    builder = event_store.StoreBuilder()
    builder.add(table)
    direct = builder.finish().frame()
    assert load_trace(path).store.frame().equals(direct)

    def failing(self, batch):
        raise MemoryError("no room")

    before = threading.active_count()
    monkeypatch.setattr(event_store.StoreBuilder, "add", failing)
    with pytest.raises(MemoryError, match="no room"):
        load_trace(path)
    assert threading.active_count() == before  # the worker ended


def test_member_finds_the_rows_of_any_set_of_kinds():
    trace = record("paged", make_requests(15, seed=9, n_max=2), prefix_caching=True)
    store = trace.store
    rng = np.random.default_rng(0)
    present = np.flatnonzero(store.counts).tolist()
    for size in (1, 2, 3, 8, len(present)):  # a few runs of neighbours, and more runs than are compared
        for _ in range(5):
            ks = rng.choice(present, size=min(size, len(present)), replace=False).tolist()
            assert np.array_equal(store.member(ks), np.isin(store.index, ks)), ks


def _bands_one_cell_at_a_time(shares, k, free):
    """viz.fragmentation._bands as it was written first: the band counts, then each cell's bands by np.repeat."""
    from kvscope.viz import fragmentation as viz_fragmentation

    out = viz_fragmentation._bands(shares, k, free)  # the counts are shared; recompute the last step per cell
    cells, n = shares.shape
    want = shares * k
    count = np.floor(want).astype(np.int64)
    present = (shares > 0) & ~free[None, :]
    count = np.where(present & (count == 0), 1, count)
    for _ in range(n * k):
        total = count.sum(axis=1)
        over, under = total > k, total < k
        if not (over.any() or under.any()):
            break
        rem = want - count
        if over.any():
            key = np.where(count > np.where(present, 1, 0), count - want, -np.inf)
            i = np.flatnonzero(over)
            count[i, key[i].argmax(axis=1)] -= 1
        if under.any():
            i = np.flatnonzero(under)
            count[i, np.where(shares[i] > 0, rem[i], -np.inf).argmax(axis=1)] += 1
    expected = np.zeros((cells, k), np.int64)
    for c in range(cells):
        expected[c] = np.repeat(np.arange(n), np.clip(count[c], 0, None))[:k]
    return out, expected


def test_the_map_bands_of_all_cells_at_once_equal_one_cell_at_a_time():
    rng = np.random.default_rng(1)
    for _ in range(200):
        cells, n, k = int(rng.integers(1, 30)), int(rng.integers(1, 6)), int(rng.integers(1, 8))
        shares = rng.random((cells, n)) * (rng.random((cells, n)) < 0.6)
        total = shares.sum(axis=1, keepdims=True)
        shares = shares / np.where(total > 0, total, 1)
        got, expected = _bands_one_cell_at_a_time(shares, k, rng.random(n) < 0.3)
        assert np.array_equal(got, expected)


class _Inline:
    """A ThreadPoolExecutor stand-in that runs what it is given at once, in the calling thread."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future: Future = Future()
        future.set_result(fn(*args))
        return future


def test_the_summary_computed_beside_the_sharing_pass_equals_it_computed_in_line(monkeypatch, tmp_path):
    from kvscope.analysis import summary
    from kvscope.trace import load_trace

    path = tmp_path / "run.kvtrace"
    record("paged", make_requests(25, seed=6, n_max=3, shared_prefix=8), path=path, prefix_caching=True)

    def make():
        return load_trace(path)  # the same events each time, with a cache of its own

    threaded = summarize(make())
    inline = summary._build_with(make(), _Inline())
    assert {k: threaded[k] for k in inline} == inline
    assert threaded["sharing_saving_mean"] is not None

    def failing(trace):
        raise RuntimeError("sharing failed")

    monkeypatch.setattr(summary, "sharing_saving_mean", failing)
    with pytest.raises(RuntimeError, match="sharing failed"):
        summarize(make())
