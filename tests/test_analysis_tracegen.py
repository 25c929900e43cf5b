"""Traces for the analysis tests: a small engine loop over the real scheduler and allocators (sim backend), and
hand-written event scripts with numbers known in advance. The tests at the bottom check the generator itself.

The loop mirrors the engine's step contract: the scheduler's lifecycle events and the allocator's own events,
then STEP_PREFILL / STEP_DECODE / STEP (aux = simulated clock at the end of the step) and one ACCT_* sample per
Usage field at the end of every step.
"""

from __future__ import annotations

import numpy as np
import pytest

from kvscope.alloc.base import emit_usage
from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.spec import get_spec
from kvscope.trace import Trace, trace_from_recorder

SPEC = get_spec("tiny")  # 512 bytes per token
BPT = SPEC.bytes_per_token
STEP_NS = 1_000_000


def make_requests(
    count: int,
    seed: int = 0,
    *,
    n_max: int = 1,
    shared_prefix: int = 0,
    max_prompt: int = 40,
    max_output: int = 24,
    rate: float = 400.0,
):
    from kvscope.workload import Request, SharedPrefix

    rng = np.random.default_rng(seed)
    t = 0.0
    out = []
    for i in range(count):
        t += float(rng.exponential(1.0 / rate))
        p = int(rng.integers(max(2, shared_prefix + 1) if shared_prefix else 2, max_prompt + 1))
        o = int(rng.integers(1, max_output + 1))
        n = int(rng.integers(1, n_max + 1))
        sp = SharedPrefix("sys", shared_prefix) if shared_prefix and p > shared_prefix else None
        out.append(Request(id=f"r{i}", arrival=t, prompt_len=p, output_len=o, n=n, shared_prefix=sp))
    return out


def make_allocator(kind: str, rec: Recorder, capacity: int, **opts):
    if kind == "paged":
        from kvscope.alloc.paged import PagedAllocator

        return PagedAllocator(SPEC, capacity, rec, **opts)
    if kind == "static":
        from kvscope.alloc.static import StaticAllocator

        return StaticAllocator(SPEC, capacity, rec, **opts)
    if kind == "vmm":
        from kvscope.alloc.vmm import VMMAllocator
        from kvscope.backends.sim import SimMemory

        opts.setdefault("page_size", 4096)
        return VMMAllocator(SPEC, capacity, rec, backend=SimMemory(4096), **opts)
    raise ValueError(kind)


def run_engine(
    kind: str,
    requests,
    *,
    capacity: int = 64 * 1024,
    max_len: int = 96,
    max_batch: int = 8,
    max_tokens: int = 256,
    preemption: str = "recompute",
    chunked: bool = False,
    max_steps: int = 5000,
    **alloc_opts,
) -> Trace:
    """Run `requests` through the scheduler and a real allocator; return the in-memory trace."""
    from kvscope.engine.scheduler import Scheduler, SchedulerConfig

    rec = Recorder(None)
    if kind in ("static", "vmm"):
        alloc_opts.setdefault("max_len", max_len)
    if kind == "vmm":
        alloc_opts.setdefault("max_batch", max_batch)
    alloc = make_allocator(kind, rec, capacity, **alloc_opts)
    cfg = SchedulerConfig(
        max_len=max_len,
        max_batch=max_batch,
        max_tokens_per_step=max_tokens,
        chunked_prefill=chunked,
        preemption=preemption,
    )
    sched = Scheduler(requests, alloc, rec, cfg)
    rec.meta.update(
        allocator=kind,
        allocator_config=alloc.config(),
        device="sim",
        device_name="simulated",
        model=SPEC.name,
        spec=SPEC.to_dict(),
        requests={
            "seq": list(range(len(requests))),
            "id": [r.id for r in requests],
            "arrival": [r.arrival for r in requests],
            "prompt_len": [r.prompt_len for r in requests],
            "output_len": [r.output_len for r in requests],
            "n": [r.n for r in requests],
        },
    )
    clock = 0
    step = 0
    while not sched.done and step < max_steps:
        if not sched.busy:
            clock = max(clock, sched.next_arrival_ns() or 0)
        rec.step = step
        sched.arrive(clock)
        plan = sched.schedule()
        rec.emit(Kind.STEP_PREFILL, n=plan.prefill_tokens)
        rec.emit(Kind.STEP_DECODE, n=plan.decode_tokens)
        sched.complete(plan)
        alloc.pending_copies.clear()
        clock += STEP_NS
        rec.emit(Kind.STEP, n=len(plan.work), dur_ns=1000, aux=clock)
        emit_usage(rec, alloc.usage())
        rec.end_step()
        step += 1
    if hasattr(alloc, "close"):
        alloc.close()
    rec.close(steps=step)
    trace = trace_from_recorder(rec)
    trace._engine = sched  # the scheduler's own counters, for cross-checks
    return trace


class Script:
    """Hand-written events: `at(step)` sets the step, `emit` records, `acct(**usage)` writes one step's books."""

    def __init__(
        self, allocator: str, config: dict, requests: list[tuple[int, int]] | None = None, *, simulated: bool = True
    ) -> None:
        self.simulated = simulated
        meta = {
            "allocator": allocator,
            "allocator_config": config,
            "device": "sim",
            "model": SPEC.name,
            "spec": SPEC.to_dict(),
        }
        if requests is not None:
            meta["requests"] = {
                "seq": list(range(len(requests))),
                "id": [f"q{i}" for i in range(len(requests))],
                "arrival": [0.0] * len(requests),
                "prompt_len": [p for p, _ in requests],
                "output_len": [o for _, o in requests],
                "n": [1] * len(requests),
            }
        self.rec = Recorder(None, meta)
        self.clock = 0

    def at(self, step: int) -> Script:
        self.rec.step = step
        return self

    def emit(self, kind: Kind, **cols) -> Script:
        self.rec.emit(kind, **cols)
        return self

    def step_end(self, *, batch: int = 0, prefill: int = 0, decode: int = 0, **usage: int) -> Script:
        self.rec.emit(Kind.STEP_PREFILL, n=prefill)
        self.rec.emit(Kind.STEP_DECODE, n=decode)
        self.clock += STEP_NS
        self.rec.emit(Kind.STEP, n=batch, dur_ns=1000, aux=self.clock if self.simulated else -1)
        fields = [
            "capacity",
            "reserved",
            "used",
            "logical",
            "internal",
            "reservation",
            "mapped_idle",
            "cached_idle",
            "free",
        ]
        from kvscope.events import ACCT_FIELDS

        for kind, name in ACCT_FIELDS.items():
            assert name in fields
            self.rec.emit(kind, bytes=usage.get(name, 0))
        return self

    def trace(self, close: bool = True) -> Trace:
        if close:
            self.rec.close()
        return trace_from_recorder(self.rec)


# ---- checks of the generator itself ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["paged", "static", "vmm"])
def test_engine_loop_books_add_up(kind):
    opts = {"variant": "pow2"} if kind == "static" else {}
    trace = run_engine(kind, make_requests(12, seed=1), **opts)
    ev = trace.events
    acct = ev[ev["kind"].astype(str).str.startswith("acct_")]
    steps = ev.loc[ev["kind"] == "step", "step"]
    assert len(steps) > 0
    assert len(acct) == 9 * len(steps)
    assert trace._engine.finished_requests == 12


# ---- traces from the real engine (kvscope.engine.record_run, sim device) --------------------------------------
def record(kind: str, requests, path=None, **cfg) -> Trace:
    """A sim-device run of the real engine on the tiny model; extra keyword arguments go to RunConfig."""
    from kvscope.engine import RunConfig, record_run

    cfg.setdefault("model", "tiny")
    cfg.setdefault("kv_memory", 64 * 1024)
    cfg.setdefault("max_len", 128)
    cfg.setdefault("max_batch", 8)
    if kind == "vmm":
        cfg.setdefault("page_size", 4096)
    result = record_run(requests, RunConfig(allocator=kind, device="sim", **cfg), path=path, command="test")
    trace = result.trace()
    trace._stats = result.stats  # the engine's own counters, for cross-checks
    return trace


def books_mismatches(trace, steps=None, *, max_steps: int = 40) -> list[str]:
    """Compare the replayed unit states with the allocator's ACCT books at the end of `steps` (default: up to
    `max_steps` steps spread over the run, the first and last included); one line per disagreement."""
    from kvscope.analysis.fragmentation import block_states
    from kvscope.analysis.memory import memory_timeline

    tl = memory_timeline(trace).set_index("step")
    if steps is None:
        all_steps = tl.index.to_numpy()
        steps = all_steps[np.unique(np.linspace(0, len(all_steps) - 1, max_steps).round().astype(int))].tolist()
    alloc = trace.meta["allocator"]
    cfg = trace.meta["allocator_config"]
    bpt = trace.bytes_per_token
    out = []
    for step in steps:
        books = tl.loc[step]
        bs = block_states(trace, step)
        state = bs["state"].astype(str).to_numpy()
        fill = bs["fill"].to_numpy()
        if alloc == "paged":
            unit = cfg["block_size"] * bpt
            held = bs["ref_count"].to_numpy() > 0
            got = {
                "reserved": int(held.sum()) * unit,
                "used": int(fill[held].sum()) * bpt,
                "cached_idle": int((state == "cached_idle").sum()) * unit,
                "free": int((state == "free").sum()) * unit,
            }
        elif alloc == "vmm":
            page = cfg["page_size"]
            got = {
                "reserved": int((state != "pool").sum()) * page,
                "used": int(fill.sum()) * cfg["buffer_row_bytes"],
                "mapped_idle": int((state == "mapped_idle").sum()) * page,
                "reservation": int(((state == "mapped_used") & (fill == 0)).sum()) * page,
                "free": int((state == "pool").sum()) * page,
            }
        else:
            size = bs["capacity_tokens"].to_numpy()
            got = {name: int(size[state == name].sum()) * bpt for name in ("used", "reservation", "internal", "free")}
        for name, value in got.items():
            if value != int(books[name]):
                out.append(f"step {step}: {name} replayed {value} != books {int(books[name])}")
    return out


def test_record_helper_runs_the_real_engine():
    trace = record("paged", make_requests(6, seed=3))
    assert trace._stats.finished_requests == 6
    assert trace.meta["allocator"] == "paged" and trace.meta["requests"]["seq"] == list(range(6))


# ---- hand-written scenarios (block size 4, 8 blocks of 2048 bytes: capacity 16384) -----------------------------
PAGED4 = {"block_size": 4, "num_blocks": 8, "prefix_caching": True, "cpu_blocks": 0, "block_bytes": 4 * BPT}
CAP = 8 * 4 * BPT
BLOCK = 4 * BPT


def scenario_fork() -> Trace:
    """seq 0 (P=5, O=3) forks seq 2 after step 1; seq 1 (P=3, O=2) finishes in step 1; seq 0 copies-on-write.

    step 0: prefill both. b0, b1 (seq 0: 4 + 1 tokens), b2 (seq 1: 3 tokens)
    step 1: seq 0 -> 6 tokens, seq 1 -> 4 tokens and finishes (b2 freed); seq 2 forks from seq 0 (b0, b1 shared)
    step 2: seq 0 copies b1 to b3 and appends (7, finishes); seq 2 appends into b1 (7, finishes); all freed.
    """
    s = Script("paged", PAGED4, requests=[(5, 3), (3, 2)])
    s.at(0).emit(Kind.ARRIVE, seq=0, n=5, aux=3).emit(Kind.ARRIVE, seq=1, n=3, aux=2)
    s.emit(Kind.ADMIT, seq=0, n=5, aux=0)
    s.emit(Kind.BLOCK_ALLOC, seq=0, block=0, addr=0, bytes=BLOCK).emit(Kind.BLOCK_ALLOC, seq=0, block=1, addr=1)
    s.emit(Kind.APPEND, seq=0, n=5, aux=5)
    s.emit(Kind.ADMIT, seq=1, n=3, aux=0).emit(Kind.BLOCK_ALLOC, seq=1, block=2, addr=0)
    s.emit(Kind.APPEND, seq=1, n=3, aux=3)
    s.step_end(
        batch=2,
        prefill=8,
        capacity=CAP,
        reserved=3 * BLOCK,
        used=8 * BPT,
        logical=8 * BPT,
        internal=3 * BLOCK - 8 * BPT,
        free=5 * BLOCK,
    )
    s.at(1).emit(Kind.APPEND, seq=0, n=1, aux=6).emit(Kind.APPEND, seq=1, n=1, aux=4)
    s.emit(Kind.FINISH, seq=1, n=4).emit(Kind.BLOCK_FREE, seq=1, block=2, aux=0)
    s.emit(Kind.FORK, seq=2, n=6, aux=0)
    s.emit(Kind.BLOCK_SHARE, seq=2, block=0, addr=0, aux=2).emit(Kind.BLOCK_SHARE, seq=2, block=1, addr=1, aux=2)
    s.step_end(
        batch=2,
        decode=2,
        capacity=CAP,
        reserved=2 * BLOCK,
        used=6 * BPT,
        logical=12 * BPT,
        internal=2 * BLOCK - 6 * BPT,
        free=6 * BLOCK,
    )
    s.at(2).emit(Kind.BLOCK_COW, seq=0, block=3, addr=1, aux=1, bytes=BLOCK).emit(
        Kind.BLOCK_FREE, seq=0, block=1, aux=1
    )
    s.emit(Kind.APPEND, seq=0, n=1, aux=7).emit(Kind.APPEND, seq=2, n=1, aux=7)
    s.emit(Kind.FINISH, seq=0, n=7).emit(Kind.BLOCK_FREE, seq=0, block=3, aux=0).emit(
        Kind.BLOCK_FREE, seq=0, block=0, aux=1
    )
    s.emit(Kind.FINISH, seq=2, n=7).emit(Kind.BLOCK_FREE, seq=2, block=1, aux=0).emit(
        Kind.BLOCK_FREE, seq=2, block=0, aux=0
    )
    s.step_end(batch=2, decode=2, capacity=CAP, free=8 * BLOCK)
    return s.trace()


def scenario_prefix() -> Trace:
    """Prefix caching and a recompute preemption (hashes 100, 101, 102 chain seq 0's blocks b0, b1, b2).

    step 0: seq 0 (P=9, O=4) prefills 9 tokens: b0, b1 full and cached, b2 holds 1
    step 1: seq 1 (P=10, O=2) hits b0, b1 (8 tokens), computes 2 into b3; seq 0 -> 10 tokens
    step 2: seq 1 is preempted (recompute, it held 10); seq 0 -> 11
    step 3: seq 0 -> 12 (b2 full, cached) and finishes: b0, b1, b2 cached-idle; seq 1 comes back with 11 tokens
            (8 served again from the cache: a re-admission), finishes (P + O - 1 = 11)
    """
    s = Script("paged", PAGED4, requests=[(9, 4), (10, 2)])
    s.at(0).emit(Kind.ARRIVE, seq=0, n=9, aux=4).emit(Kind.ADMIT, seq=0, n=9, aux=0)
    s.emit(Kind.BLOCK_ALLOC, seq=0, block=0, addr=0).emit(Kind.BLOCK_CACHE, seq=0, block=0, aux=100)
    s.emit(Kind.BLOCK_ALLOC, seq=0, block=1, addr=1).emit(Kind.BLOCK_CACHE, seq=0, block=1, aux=101)
    s.emit(Kind.BLOCK_ALLOC, seq=0, block=2, addr=2).emit(Kind.APPEND, seq=0, n=9, aux=9)
    s.step_end(
        batch=1,
        prefill=9,
        capacity=CAP,
        reserved=3 * BLOCK,
        used=9 * BPT,
        logical=9 * BPT,
        internal=3 * BLOCK - 9 * BPT,
        free=5 * BLOCK,
    )
    s.at(1).emit(Kind.APPEND, seq=0, n=1, aux=10).emit(Kind.ARRIVE, seq=1, n=10, aux=2)
    s.emit(Kind.BLOCK_SHARE, seq=1, block=0, addr=0, aux=2).emit(Kind.BLOCK_SHARE, seq=1, block=1, addr=1, aux=2)
    s.emit(Kind.PREFIX_HIT, seq=1, n=8).emit(Kind.ADMIT, seq=1, n=10, aux=8)
    s.emit(Kind.BLOCK_ALLOC, seq=1, block=3, addr=2).emit(Kind.APPEND, seq=1, n=2, aux=10)
    s.step_end(
        batch=2,
        prefill=2,
        decode=1,
        capacity=CAP,
        reserved=4 * BLOCK,
        used=12 * BPT,
        logical=20 * BPT,
        internal=4 * BLOCK - 12 * BPT,
        free=4 * BLOCK,
    )
    s.at(2).emit(Kind.PREEMPT, seq=1, n=10, aux=0)
    s.emit(Kind.BLOCK_FREE, seq=1, block=3, aux=0).emit(Kind.BLOCK_FREE, seq=1, block=1, aux=1)
    s.emit(Kind.BLOCK_FREE, seq=1, block=0, aux=1).emit(Kind.APPEND, seq=0, n=1, aux=11)
    s.step_end(
        batch=1,
        decode=1,
        capacity=CAP,
        reserved=3 * BLOCK,
        used=11 * BPT,
        logical=11 * BPT,
        internal=3 * BLOCK - 11 * BPT,
        free=5 * BLOCK,
    )
    s.at(3).emit(Kind.APPEND, seq=0, n=1, aux=12).emit(Kind.BLOCK_CACHE, seq=0, block=2, aux=102)
    s.emit(Kind.FINISH, seq=0, n=12)
    for b in (2, 1, 0):
        s.emit(Kind.BLOCK_FREE, seq=0, block=b, aux=0)
    s.emit(Kind.BLOCK_SHARE, seq=1, block=0, addr=0, aux=1).emit(Kind.BLOCK_SHARE, seq=1, block=1, addr=1, aux=1)
    s.emit(Kind.PREFIX_HIT, seq=1, n=8).emit(Kind.ADMIT, seq=1, n=11, aux=8)
    s.emit(Kind.BLOCK_ALLOC, seq=1, block=3, addr=2).emit(Kind.APPEND, seq=1, n=3, aux=11)
    s.emit(Kind.FINISH, seq=1, n=11)
    for b in (3, 1, 0):
        s.emit(Kind.BLOCK_FREE, seq=1, block=b, aux=0)
    s.step_end(batch=1, prefill=3, decode=1, capacity=CAP, cached_idle=3 * BLOCK, free=5 * BLOCK)
    return s.trace()


@pytest.mark.parametrize("build", [scenario_fork, scenario_prefix])
def test_scenarios_books_add_up(build):
    from kvscope.alloc.base import Usage
    from kvscope.analysis.memory import FIELDS, memory_timeline

    for row in memory_timeline(build()).to_dict("records"):
        Usage(**{f: int(row[f]) for f in FIELDS}).check()


def write_trace_file(trace: Trace, path, *, flush_events: int = 64, close: bool = True) -> None:
    """Write an in-memory trace's events to a .kvtrace file in small batches (so that cutting the file leaves some
    complete batches). Times are re-stamped by the recorder; every other column is kept."""
    from kvscope.events import KIND_BY_NAME

    rec = Recorder(path, trace.meta, flush_events=flush_events)
    for row in trace.events.itertuples(index=False):
        rec.step = int(row.step)
        rec.emit(
            KIND_BY_NAME[str(row.kind)],
            seq=int(row.seq),
            block=int(row.block),
            n=int(row.n),
            bytes=int(row.bytes),
            addr=int(row.addr),
            aux=int(row.aux),
            dur_ns=int(row.dur_ns),
        )
    if close:
        rec.abort()  # the events already end with RUN_END when the source trace had one
