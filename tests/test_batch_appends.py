"""The batched decode append (PagedAllocator.append_decode, Recorder.emit_appends, block crossings included) and the
rows recorded together (Recorder.emit_rows: a step's samples, a release's frees) record what one `append` per
sequence and one emit per event record: the same events in the same order, the same books, the same peaks; and
whole runs recorded either way analyse the same."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope.alloc.base import BatchAppends, KVOutOfMemory, append_each
from kvscope.alloc.paged import PagedAllocator
from kvscope.analysis.summary import summarize
from kvscope.engine import api
from kvscope.engine.api import RunConfig, record_run
from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.spec import get_spec
from kvscope.workload_gen import resolve_workload

SPEC = get_spec("tiny")
BPT = SPEC.bytes_per_token
# Everything but the clock: emit_appends reads it once for a run of rows, emit once a row.
CLOCKLESS = ["step", "kind", "seq", "block", "n", "bytes", "addr", "aux", "dur_ns"]


def rows(recorder: Recorder, columns: list[str] = CLOCKLESS) -> list[tuple]:
    table = recorder.to_table().select(columns)
    table = table.set_column(1, "kind", pa.compute.cast(table.column("kind"), pa.string()))
    return list(zip(*(table.column(c).to_pylist() for c in columns), strict=True))


def test_emit_appends_writes_the_rows_emit_writes() -> None:
    one, batched = Recorder(None), Recorder(None)
    for r in (one, batched):
        r.step = 3
    for seq, held in ((5, 10), (7, 1), (5, 11)):
        one.emit(Kind.APPEND, seq=seq, n=1, aux=held)
    batched.emit_appends([5, 7, 5], [10, 1, 11])
    assert rows(one) == rows(batched)
    with pytest.raises(ValueError, match="2 sequences but 1 token counts"):
        batched.emit_appends([1, 2], [3])
    with pytest.raises(OverflowError, match="int64"):
        batched.emit_appends([1 << 70], [3])
    with pytest.raises(ValueError, match="allocs"):
        batched.emit_appends([1, 2], [3, 4], [2, 7, 0, 16])  # names an APPEND the call does not have
    with pytest.raises(OverflowError, match="int64"):
        batched.emit_appends([1, 2], [3, 4], [0, 1 << 70, 0, 16])
    with pytest.raises(ValueError, match="rows of 10"):
        batched.emit_rows([1, 2, 3])
    with pytest.raises(ValueError, match="unknown event kind"):
        batched.emit_rows([0, 0, 999, -1, -1, 0, 0, -1, -1, 0])
    with pytest.raises(OverflowError, match="'bytes'"):
        batched.emit_rows([0, 0, int(Kind.ACCT_USED), -1, -1, 0, 1 << 70, -1, -1, 0])
    assert batched.to_table().num_rows == 3  # a refused batch leaves nothing behind


@settings(max_examples=100, deadline=None)
@given(
    calls=st.lists(
        st.one_of(
            st.tuples(st.just("emit"), st.integers(0, 9)),
            st.tuples(st.just("appends"), st.lists(st.integers(0, 9), max_size=5)),
            # appends some of which take a new block first (the BLOCK_ALLOC row goes right before their APPEND)
            st.tuples(st.just("allocs"), st.lists(st.tuples(st.integers(0, 9), st.booleans()), min_size=1, max_size=5)),
            st.tuples(st.just("rows"), st.lists(st.integers(0, 9), max_size=4)),
            st.tuples(st.just("step"), st.integers(0, 5)),
            st.tuples(st.just("flush"), st.just(0)),
        ),
        max_size=30,
    ),
    flush_events=st.integers(1, 8),
)
def test_emit_appends_keeps_its_place_among_other_events(calls: list[tuple[str, object]], flush_events: int) -> None:
    """Runs of appends (some with the new blocks they take), rows emitted together, other events, steps and flushes
    (by hand, and when the buffer is full) read back in the order they were emitted, as if each had been one emit."""
    one, batched = Recorder(None, flush_events=flush_events), Recorder(None, flush_events=flush_events)
    held = 0
    for call, arg in calls:
        if call == "emit":
            for r in (one, batched):
                r.emit(Kind.BLOCK_ALLOC, seq=arg, block=7)  # type: ignore[arg-type]
        elif call == "appends":
            seqs = list(arg)  # type: ignore[call-overload]
            counts = list(range(held, held + len(seqs)))
            held += len(seqs)
            for seq, h in zip(seqs, counts, strict=True):
                one.emit(Kind.APPEND, seq=seq, n=1, aux=h)
            batched.emit_appends(seqs, counts)
        elif call == "allocs":
            pairs = list(arg)  # type: ignore[call-overload]
            seqs, allocs = [seq for seq, _ in pairs], list[int]()
            counts = list(range(held, held + len(seqs)))
            held += len(seqs)
            for i, ((seq, new_block), h) in enumerate(zip(pairs, counts, strict=True)):
                if new_block:
                    one.emit(Kind.BLOCK_ALLOC, seq=seq, block=100 + h, addr=h % 7, bytes=4096)
                    allocs += (i, 100 + h, h % 7, 4096)
                one.emit(Kind.APPEND, seq=seq, n=1, aux=h)
            batched.emit_appends(seqs, counts, allocs)
        elif call == "rows":
            values: list[int] = []
            for seq in arg:  # type: ignore[attr-defined]
                one.emit(Kind.ACCT_USED, seq=seq, bytes=seq * 3, aux=seq + 1, dur_ns=seq)
                values += (0, 0, Kind.ACCT_USED, seq, -1, 0, seq * 3, -1, seq + 1, seq)
            batched.emit_rows(values)
        elif call == "step":
            one.step = batched.step = arg  # type: ignore[assignment]
        else:
            one.flush()
            batched.flush()
    assert rows(one) == rows(batched)


def test_paged_allocator_batches_and_the_fallback_is_append() -> None:
    alloc = PagedAllocator(SPEC, 8 * 4 * BPT, Recorder(None), block_size=4)
    assert isinstance(alloc, BatchAppends)
    alloc.admit(0, np.arange(3), 10)
    alloc.append(0, np.arange(3))
    assert append_each(alloc, [0, 0], [np.array([1]), np.array([2])]) == 2
    assert alloc.num_tokens(0) == 5


def _build(prefix_caching: bool, block_size: int, num_blocks: int) -> PagedAllocator:
    return PagedAllocator(
        SPEC, num_blocks * block_size * BPT, Recorder(None), block_size=block_size, enable_prefix_caching=prefix_caching
    )


step_ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "decode", "fork", "free"]),
        st.integers(0, 7),
        st.lists(st.integers(0, 1), min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(
    prefix_caching=st.booleans(),
    block_size=st.sampled_from([1, 2, 3, 4]),
    num_blocks=st.integers(2, 10),
    ops=step_ops,
)
def test_append_decode_leaves_what_one_append_each_leaves(
    prefix_caching: bool, block_size: int, num_blocks: int, ops: list[tuple[str, int, list[int]]]
) -> None:
    """Two allocators driven through the same operations, decode steps as one append_decode on one and one append
    per sequence on the other: the same result of every call, the same events, books and peaks after each."""
    batched, each = _build(prefix_caching, block_size, num_blocks), _build(prefix_caching, block_size, num_blocks)
    live: list[int] = []
    next_seq = 0
    for op, pick, ids in ops:
        if op == "admit":
            results = []
            for alloc in (batched, each):
                try:
                    alloc.admit(next_seq, np.array(ids), len(ids) + 8)
                    alloc.append(next_seq, np.array(ids[alloc.num_tokens(next_seq) :]))
                    results.append(True)
                except KVOutOfMemory:
                    if next_seq in alloc:
                        alloc.free(next_seq)
                    results.append(False)
            assert results[0] == results[1]
            if results[0]:
                live.append(next_seq)
            next_seq += 1
        elif op == "decode" and live:
            # a decode step over a rotation of the live sequences, one token each (a sequence may come twice)
            seqs = (live[pick % len(live) :] + live[: pick % len(live)] + live[:1])[: len(ids) + 1]
            tokens = [np.array([ids[i % len(ids)]]) for i in range(len(seqs))]
            assert batched.append_decode(seqs, tokens) == append_each(each, seqs, tokens)
        elif op == "fork" and live:
            parent = live[pick % len(live)]
            for alloc in (batched, each):
                alloc.fork(parent, next_seq)
            live.append(next_seq)
            next_seq += 1
        elif op == "free" and live:
            seq = live.pop(pick % len(live))
            for alloc in (batched, each):
                alloc.free(seq)
        batched.check_invariants()
        assert batched.usage() == each.usage()
        assert batched.high_water == each.high_water
        assert [batched.block_table(s) for s in live] == [each.block_table(s) for s in live]
    assert rows(batched.recorder) == rows(each.recorder)


TIMING = {"wall_time_s", "host_wall_s", "events_per_s"}  # measured wall times (the sim clock is in `run_time_s`)


class PerEventRecorder(Recorder):
    """A Recorder whose emit is overridden: callers that batch rows (emit_rows) on a plain Recorder emit each row
    on this one; with the allocator's append_decode gone too, a run records every event through emit, as before
    any batching."""

    def emit(self, *args, **kwargs) -> None:
        super().emit(*args, **kwargs)


def _run(monkeypatch: pytest.MonkeyPatch, batched: bool, workload: str, **cfg: object):
    with monkeypatch.context() as m:
        if not batched:  # the engine as it was: one append and one emit per event
            m.delattr(PagedAllocator, "append_decode")
            m.setattr(api, "Recorder", PerEventRecorder)
        reqs, desc = resolve_workload(workload, requests=60, seed=3)
        return record_run(reqs, RunConfig(allocator="paged", device="sim", **cfg), workload=desc)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("workload", "cfg"),
    [
        ("sharegpt", {"kv_memory": 2 << 20, "model": "tiny"}),  # tight: OOMs and preemptions mid-batch
        ("shared-prefix", {"prefix_caching": True, "kv_memory": 64 << 20, "model": "tiny"}),  # hits and hashing
        # forks (copy-on-write) and swapping, with preemptions by swap and by recompute
        ("parallel", {"kv_memory": 2 << 20, "model": "tiny", "swap_space": 1 << 20, "preemption": "swap"}),
        ("beam", {"block_size": 4, "model": "tiny"}),
    ],
)
def test_runs_recorded_with_and_without_batching_agree(monkeypatch: pytest.MonkeyPatch, workload: str, cfg) -> None:
    new, old = (_run(monkeypatch, batched, workload, **cfg) for batched in (True, False))
    new_rec, old_rec = new.recorder, old.recorder
    untimed = CLOCKLESS[:-1]  # dur_ns: a STEP's measured wall time
    assert rows(new_rec, untimed) == rows(old_rec, untimed)
    assert new.stats.preemptions == old.stats.preemptions
    s_new, s_old = summarize(new.trace()), summarize(old.trace())
    differ = {k for k in s_new if s_new[k] != s_old.get(k)}
    assert differ <= TIMING, f"the summaries differ in {sorted(differ - TIMING)}"


def test_an_interrupted_emit_appends_leaves_nothing_behind() -> None:
    """A Ctrl-C between emit_appends' lines can leave values that no run marker names (the marker goes last):
    the batch is built without them, as if the call had never been made, and later calls still read their own."""
    one, batched = Recorder(None), Recorder(None)
    one.emit(Kind.APPEND, seq=1, n=1, aux=4)
    batched.emit_appends([1], [4])
    batched._run_seqs.extend([9, 9])  # what an interrupted call had added before the Ctrl-C
    batched._run_held.extend([9])
    for seq, held in ((2, 5), (3, 6)):  # the recorder used again after it (a notebook that caught the interrupt)
        one.emit(Kind.APPEND, seq=seq, n=1, aux=held)
    batched.emit_appends([2, 3], [5, 6])
    assert rows(one) == rows(batched)
