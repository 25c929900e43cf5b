"""The public instrumentation API (kvscope.record): a toy block allocator driven by a toy engine records a trace
that loads, summarises with the numbers the toy's own books say, and renders every view that applies; bad input
is one line; the sizes it demands are the ones the replays read."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

import kvscope
from kvscope.analysis import fragmentation
from kvscope.analysis.replay import REPLAYS
from kvscope.analysis.summary import summarize
from kvscope.instrument import REQUIRED_SIZES, hash_to_int64
from kvscope.present.views import split
from kvscope.trace import TruncatedTraceWarning, load_trace

BPT = 1024  # bytes per token of the toy model
BLOCK = 4
BLOCKS = 24


class ToyPool:
    """Fixed-size blocks, one block table per sequence; books kept as running totals, like a real allocator."""

    def __init__(self, run, num_blocks: int, block_size: int) -> None:
        self.run, self.bs = run, block_size
        self.free = list(range(num_blocks))
        self.tables: dict[int, list[int]] = {}
        self.tokens: dict[int, int] = {}
        self.capacity = num_blocks * block_size * BPT

    def append(self, seq: int, n: int) -> None:
        table = self.tables.setdefault(seq, [])
        self.tokens[seq] = self.tokens.get(seq, 0) + n
        while len(table) * self.bs < self.tokens[seq]:
            block = self.free.pop(0)
            table.append(block)
            self.run.block_alloc(seq, block, len(table) - 1)
        self.run.append(seq, n)

    def release(self, seq: int) -> None:
        for block in self.tables.pop(seq):
            self.free.append(block)
            self.run.block_free(seq, block, ref=0)
        del self.tokens[seq]

    def books(self) -> dict[str, int]:
        blocks = sum(len(t) for t in self.tables.values())
        return {"capacity": self.capacity, "reserved": blocks * self.bs * BPT, "used": sum(self.tokens.values()) * BPT}


REQUESTS = [(0, 6, 5), (1, 9, 3), (2, 3, 7), (3, 13, 2), (4, 5, 4)]  # (seq, prompt, output)


def run_toy(path=None):
    """A continuous-batching loop over REQUESTS: two admitted a step while blocks last, prefill in one step, one
    token a step after; a request finishing after O tokens holds P + O - 1. Returns (run, per-step books, peaks)."""
    with kvscope.record(
        path, source="toy-engine", addressing="blocks", label="toy b4", block_size=BLOCK, num_blocks=BLOCKS,
        bytes_per_token=BPT, cannot_see=["the toy has no prefix cache"],
    ) as run:  # fmt: skip
        pool = ToyPool(run, BLOCKS, BLOCK)
        waiting, running, generated = list(REQUESTS), {}, {}
        books, peaks = [], []
        for seq, p, o in REQUESTS:
            run.arrive(seq, p, o)
        while waiting or running:
            peak_used = peak_reserved = 0
            for seq in list(running):  # decode
                pool.append(seq, 1)
                generated[seq] += 1
            for seq, p, o in waiting[:2]:  # admit + prefill
                waiting.remove((seq, p, o))
                run.admit(seq)
                pool.append(seq, p)
                running[seq], generated[seq] = o, 1
            run.note(**pool.books())  # the most the step holds: after its appends, before its releases
            peak_used, peak_reserved = pool.books()["used"], pool.books()["reserved"]
            for seq in [s for s in running if generated[s] == running[s]]:
                run.finish(seq)
                pool.release(seq)
                del running[seq]
            books.append(run.end_step(**pool.books()))
            peaks.append((peak_used, peak_reserved))
    return run, books, peaks


def test_the_toy_allocators_trace_summarises_with_its_own_books(tmp_path):
    run, books, peaks = run_toy(tmp_path / "toy.kvtrace")
    trace = load_trace(tmp_path / "toy.kvtrace")
    s = summarize(trace)
    assert not trace.truncated and trace.meta["source"] == "toy-engine" and trace.label == "toy b4"
    assert trace.meta["cannot_see"] == ["the toy has no prefix cache"]
    assert s["steps"] == len(books) == run.steps
    assert s["requests"] == s["finished"] == len(REQUESTS)
    assert s["generated_tokens"] == sum(o for _, _, o in REQUESTS)
    assert s["prompt_tokens"] == sum(p for _, p, _ in REQUESTS)
    assert s["capacity_bytes"] == BLOCKS * BLOCK * BPT
    # Peaks are the in-step maxima the toy noted (a request finishing in a step counts in it), not step ends.
    assert s["peak_used_bytes"] == max(u for u, _ in peaks)
    assert s["peak_reserved_bytes"] == max(r for _, r in peaks)
    assert s["peak_used_end_of_step_bytes"] == max(b.used for b in books)
    assert s["peak_used_bytes"] > s["peak_used_end_of_step_bytes"]  # the toy's finishing steps make them differ
    assert s["prefill_tokens_computed"] == s["prompt_tokens"]
    assert s["decode_tokens_computed"] == sum(o - 1 for _, _, o in REQUESTS)
    # Each finished request held P + O - 1 tokens at the end, as the lifecycle recorded.
    finish = trace.events[trace.events["kind"] == "finish"].set_index("seq")["n"]
    assert finish.to_dict() == {seq: p + o - 1 for seq, p, o in REQUESTS}


def test_every_applicable_view_renders_and_the_rest_say_why():
    run, _, _ = run_toy()
    trace = run.trace()
    shown, absent = split(trace)
    assert {"memory", "fragmentation", "blocks", "throughput", "requests"} <= {v.key for v in shown}
    assert {"sharing", "prefix", "driver"} <= {v.key for v in absent}  # no sharing, no cache, no driver calls
    assert all(v.absent for v in absent)
    for view in shown:
        assert view.figure(trace).data, view.key
    # The block grid at step 0: the first two requests' prompts (6 and 9 tokens) in 2 + 3 blocks of 4.
    cells = fragmentation.block_states(trace, 0)
    assert (cells["state"] == "active").sum() == 5 and cells["fill"].sum() == 15


def test_shared_and_cached_blocks_get_the_sharing_and_prefix_views():
    with kvscope.record(
        None, source="toy", addressing="blocks", label="toy share", block_size=4, num_blocks=8, bytes_per_token=BPT
    ) as run:
        run.arrive(0, 8, 2)
        run.admit(0)
        run.block_alloc(0, 0, 0)
        run.block_alloc(0, 1, 1)
        run.append(0, 8)
        run.block_cache(0, 0, (1 << 64) - 5)  # an unsigned 64-bit hash, as vLLM's and HF's are
        run.block_cache(0, 1, 12345)
        run.fork(1, 0)
        run.block_share(1, 0, 0, ref=2)
        run.block_share(1, 1, 1, ref=2)
        run.end_step(capacity=8 * 4 * BPT, reserved=2 * 4 * BPT, used=8 * BPT, logical=16 * BPT)
        for seq in (0, 1):
            run.finish(seq)
            run.block_free(seq, 0, ref=1 - seq)
            run.block_free(seq, 1, ref=1 - seq)
        run.end_step(capacity=8 * 4 * BPT, reserved=0, used=0, cached_idle=2 * 4 * BPT)
    trace = run.trace()
    shown, _ = split(trace)
    assert {"sharing", "prefix"} <= {v.key for v in shown}
    for view in shown:
        assert view.figure(trace).data, view.key
    cache = trace.events[trace.events["kind"] == "block_cache"]["aux"].tolist()
    assert cache == [-5, 12345]
    assert summarize(trace)["sharing_saved_bytes_peak"] == 8 * BPT


def test_a_row_arena_replays_too():
    with kvscope.record(None, source="toy", addressing="rows", label="toy arena", rows=32, bytes_per_token=BPT) as run:
        run.arrive(0, 5, 3)
        run.admit(0)
        run.reserve(0, 0, 7)
        run.append(0, 5)
        run.end_step(capacity=32 * BPT, reserved=7 * BPT, used=5 * BPT, reservation=2 * BPT)
    trace = run.trace()
    shown, _ = split(trace)
    assert "blocks" in {v.key for v in shown}
    for view in shown:
        assert view.figure(trace).data, view.key
    s = summarize(trace)
    assert s["peak_reserved_bytes"] == 7 * BPT and s["peak_waste_bytes"] == 2 * BPT


def test_required_sizes_are_the_ones_the_replays_read():
    assert {a: dict(cls.sizes) for a, cls in REPLAYS.items()} == REQUIRED_SIZES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"addressing": "slabs"}, "addressing must be one of blocks, pages, rows"),
        ({"num_blocks": None}, "needs num_blocks"),
        ({"block_size": 0}, "block_size must be at least 1"),
        ({"label": ""}, "label must be a non-empty string"),
        ({"source": " "}, "source must name the system"),
        ({"bytes_per_token": None}, "give bytes_per_token"),
        ({"cannot_see": "everything"}, "cannot_see takes a list"),
    ],
)
def test_bad_recordings_are_one_line(kwargs, message):
    args = {"source": "toy", "addressing": "blocks", "label": "t", "block_size": 4, "num_blocks": 4}
    args["bytes_per_token"] = BPT
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as info, kvscope.record(None, **args):
        pass
    assert "\n" not in str(info.value)


def test_bad_calls_are_refused_before_anything_is_written():
    with kvscope.record(None, source="toy", addressing="blocks", label="t", block_size=4, num_blocks=4,
                        bytes_per_token=BPT) as run:  # fmt: skip
        before = run.recorder.to_table().num_rows
        for call, message in [
            (lambda: run.block_alloc(0, 4, 0), "outside the pool of 4 blocks"),
            (lambda: run.block_alloc(-1, 0, 0), "seq must be at least 0"),
            (lambda: run.block_share(0, 1, 0, ref=0), "ref must be at least 1"),
            (lambda: run.append(0, 1.5), "tokens must be an integer"),
            (lambda: run.reserve(0, 0, 4), "needs addressing 'rows'"),
            (lambda: run.admit(3), "never arrived"),
            (lambda: run.emit("page_mapp"), "unknown event kind"),
            (lambda: run.end_step(capacity=10, reserved=20, used=5), "books do not add up"),
            (lambda: run.end_step(capacity=10, reserved=5), "used missing"),
            (lambda: run.end_step(capacity=10, reserved=5, used=1, wasted=3), "unknown field 'wasted'"),
            (lambda: run.block_cache(0, 0, "abc"), "a block hash must be an integer"),
        ]:
            with pytest.raises(ValueError, match=message) as info:
                call()
            assert "\n" not in str(info.value)
        assert run.recorder.to_table().num_rows == before
        assert run.steps == 0


def test_an_exception_leaves_a_cut_off_but_readable_trace(tmp_path):
    path = tmp_path / "crash.kvtrace"
    with (
        pytest.raises(RuntimeError, match="engine crashed"),
        kvscope.record(
            path, source="toy", addressing="blocks", label="t", block_size=4, num_blocks=4, bytes_per_token=BPT
        ) as run,
    ):
        run.arrive(0, 4, 1)
        run.end_step(capacity=16 * BPT, reserved=0, used=0)
        raise RuntimeError("engine crashed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = load_trace(path)
    assert trace.truncated and any(issubclass(w.category, TruncatedTraceWarning) for w in caught)
    assert summarize(trace)["steps"] == 1


def test_hashes_keep_their_low_64_bits():
    assert hash_to_int64(2**64 - 1) == -1
    assert hash_to_int64(-7) == -7
    assert hash_to_int64(2**63) == -(2**63)
    assert hash_to_int64((1 << 200) + 9) == 9


def test_import_kvscope_stays_cheap_and_exports_record():
    code = (
        "import sys, kvscope; assert 'record' in kvscope.__all__; "
        "print(sorted(m for m in ('kvscope.instrument', 'pyarrow', 'pandas') if m in sys.modules)); "
        "kvscope.record; print('kvscope.instrument' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"
