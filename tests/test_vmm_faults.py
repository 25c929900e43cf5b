"""Every driver call of the VMM allocator can fail (issue 7, item 7).

For each backend that runs here (sim, cpu, and the cuda backend over the fake driver of test_cuda_vmm; the real
cuda driver under @pytest.mark.gpu), each driver operation (reserve, create, map, set access, unmap, release, free
the reservation) and EVERY index at which the workload below makes that call, one injected failure. After it:

- the allocator's books equal the backend's real state (`backend_books() == backend.state()`; on cpu also the
  kernel's /proc/self/maps; on the fake driver its own tables; on a GPU the driver's cuMemRetainAllocationHandle);
- the failed operation raised the documented error (KVOutOfMemory for lack of memory, chained to the backend's
  BackendOutOfMemory; the backend's error otherwise) and left the live sequences and their pages as they were;
- the trace replays (analysis PageReplay) to the same pages, slots and owners as the books;
- the workload goes on, then close() (retried once if the failure hit it; a third call is a no-op) leaves no
  handle, mapping or reservation, every page created once and released once; on cpu the memfd is closed and no
  reservation is left in the address space.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvscope.alloc.base import KVOutOfMemory
from kvscope.alloc.vmm import VMMAllocator
from kvscope.analysis.replay import Events, PageReplay
from kvscope.backends.base import FAULT_OPS, BackendError, BackendOutOfMemory, BackendState, Fault
from kvscope.backends.host import HostMemory, _proc_maps
from kvscope.backends.sim import SimMemory
from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.spec import get_spec

SPEC = get_spec("tiny")  # 4 buffers (2 layers x K and V) of 128-byte rows
ROW = SPEC.token_bytes_per_layer_kv
GROUPS = 5  # 20 pages: the workload below drives the pool dry, so idle slots give pages up
MAX_BATCH = 3
SLOT_GROUPS = 3  # max_len = 3 pages' worth of tokens


# ---- the workload ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    kind: str  # admit | append | fork | free | ensure_room | drain (the executor runs the pending copies)
    seq: int
    pages: float = 0  # admit: the prompt, append: new tokens, ensure_room: room in all; in pages' worth of tokens
    parent: int = -1  # fork


WORKLOAD = (
    Op("admit", 1, 1.25),  # slot 0: 2 groups
    Op("admit", 2, 0.25),  # slot 1: 1 group
    Op("fork", 3, parent=1),  # slot 2: 2 groups; the pool is dry
    Op("free", 3),  # deferred: slot 2 keeps 2 idle groups; without: unmapped
    Op("append", 2, 1),  # a second group for seq 2: an idle slot gives up its tail
    Op("ensure_room", 1, 2.5),  # a third group for seq 1: the idle slot gives up its last
    Op("free", 1),
    Op("admit", 4, 0.5),  # best fit: slot 0's idle groups are reclaimed without a driver call
    Op("append", 4, 1.75),
    Op("free", 2),
    Op("admit", 5, 0.1),
    Op("free", 4),  # seq 5 stays live: close() drops it
)
# Page sharing (issue 11): forks map the parent's pages, the first write into a shared partly filled page copies
# it (COW), a freed source of a pending copy waits for the drain, prompts of zeros share their full page-groups.
SHARED_WORKLOAD = (
    Op("admit", 1, 1.5),  # slot 0: 2 groups, the second half full
    Op("fork", 2, parent=1),  # slot 1 maps those 8 pages: no new page
    Op("append", 2, 0.25),  # copy-on-write of the shared half-full group (4 fresh pages), copy from slot 0
    Op("free", 1),  # slot 0 is the pending copy's source: it waits, mapped
    Op("drain", 0),  # the executor ran the copy: slot 0's teardown (its first group is still shared) runs
    Op("admit", 3, 1.25),  # with prefix sharing: seq 2's first full group; else 2 fresh groups
    Op("fork", 4, parent=3),
    Op("append", 3, 0.5),  # copy-on-write again (seq 4 shares the group)
    Op("append", 4, 0.5),  # seq 4 holds its group alone now: no copy
    Op("free", 2),
    Op("drain", 0),
    Op("append", 3, 1),  # the pool is dry: an idle slot gives up pages
    Op("ensure_room", 4, 2.5),
    Op("free", 4),
)
CONFIGS = {
    "deferred": {"page_sharing": False},
    "eager": {"eager_pages": 1, "page_sharing": False},
    "no-reclaim": {"deferred_reclaim": False, "page_sharing": False},
    "shared": {},
    "shared-no-reclaim": {"deferred_reclaim": False},
    "shared-prefix": {"prefix_sharing": True, "eager_pages": 1},
}
WORKLOADS = {name: SHARED_WORKLOAD if name.startswith("shared") else WORKLOAD for name in CONFIGS}


def toks(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.int64)


# ---- what runs it, and what it checks --------------------------------------------------------------------------
class ReplayCheck:
    """Replays the allocator's events through the analysis' PageReplay as they come, and holds the replayed pages
    against the books: the trace says a page is mapped, at which slot, offset and buffer, exactly when the books do;
    created-and-not-released pages and slot owners agree too."""

    def __init__(self, alloc: VMMAllocator) -> None:
        self.alloc = alloc
        self.replay = PageReplay(SimpleNamespace(meta={"allocator": "vmm", "allocator_config": alloc.config()}))
        self.seen = 0
        self.codes = {k.name.lower(): int(k) for k in Kind}
        self.relevant = {int(k) for k in PageReplay.kinds}

    def check(self) -> None:
        table = self.alloc.recorder.to_table().slice(self.seen)
        self.seen += table.num_rows
        codes = np.array([self.codes[k] for k in table.column("kind").to_pylist()], np.int64)
        keep = np.isin(codes, list(self.relevant))
        columns = [np.asarray(table.column(c))[keep] for c in ("seq", "block", "n", "addr", "aux")]
        events = Events(codes[keep], *columns)
        self.replay.apply(events, 0, len(events))
        a, r = self.alloc, self.replay
        replayed = {
            p: {(r.slot[p], r.offset[p], r.buffer[p]), *r.more.get(p, [])} for p in range(r.n) if r.slot[p] >= 0
        }
        assert replayed == book_places(a), "the trace and the books disagree on mapped pages"
        assert [p for p in range(r.n) if r.live[p]] == list(range(len(a._handles))), "live pages disagree"
        owners = {a.slot_of(seq): seq for seq in a.live_sequences()}
        assert r.slot_owner == owners, "the trace and the books disagree on slot owners"
        # The states the analysis reports (pool / mapped-used / mapped-idle): a stray's pages are idle. (Except
        # a stray in a live slot's region, which only two failures in one operation leave: the trace has no
        # event for strays, so it shows those pages as the live request's mapped-ahead ones.)
        states = {p: int(c) for p, c in enumerate(r.codes()[: len(a._handles)]) if c}
        want = {pid: 2 for pid in book_places(a)}
        for seq in owners.values():
            slot = a.slot_of(seq)
            want.update({pid: 1 for _, pid in mapped_places(a, slot)})
            want.update({pid: 1 for g in a._strays.values() if g.slot == slot for pid in g.pages[: g.mapped]})
        assert states == want, "page states disagree"


def mapped_places(a: VMMAllocator, slot: int) -> list[tuple[int, int]]:
    """(flat index, page mapped there) for a slot's places: where a failed copy-on-write left a hole, what the
    driver has there (nothing: left out)."""
    out = []
    for i, pid in enumerate(a._slot_pages[slot]):
        hole = a._holes.get((slot, i))
        if hole is not None:
            if hole.current < 0:
                continue
            pid = hole.current
        out.append((i, pid))
    return out


def book_places(a: VMMAllocator) -> dict[int, set[tuple[int, int, int]]]:
    """page -> {(slot, byte offset in the slot's region, buffer)} for every page the books say is mapped (a shared
    page at several places)."""
    nbuf, page = a.num_buffers, a.page_size
    places: dict[int, set[tuple[int, int, int]]] = {}
    for slot in range(a.max_batch):
        for i, pid in mapped_places(a, slot):
            group, b = divmod(i, nbuf)
            places.setdefault(pid, set()).add((slot, group * page, b))
    for g in a._strays.values():
        for b in range(g.mapped):
            places.setdefault(g.pages[b], set()).add((g.slot, g.index * page, b))
    return places


@dataclass
class Backend:
    """One backend under test: how to build it, the driver's own view of what it holds (beyond its books), and the
    leak checks once the allocator closed (`check_released`) and once the backend itself closed (`check_closed`)."""

    name: str
    make: Callable[[], Any]
    real_state: Callable[[Any], BackendState] = lambda b: b.state()
    check_os: Callable[[Any, BackendState], None] = lambda b, s: None
    check_released: Callable[[Any, list[tuple[int, int]]], None] = lambda b, r: None
    check_closed: Callable[[Any, dict], None] = lambda b, before: None
    before_close: Callable[[Any], dict] = lambda b: {}


# ---- cpu: the kernel's view (/proc/self/maps, the memfd) ----------------------------------------------------------
def _cpu_check_os(backend: HostMemory, state: BackendState) -> None:
    """Every OS page mapped from the memfd is one the books map, at the right offset, with the right access; every
    reservation is still in the address space."""
    g = backend.granularity
    want = {}
    for va, size, handle, rw in state.mappings:
        for k in range(0, size, g):
            want[va + k] = (handle.offset + k, rw)
    maps = _proc_maps()
    assert backend.os_pages(maps) == want, "the kernel's memfd mappings differ from the books"
    assert backend.os_missing(sorted(state.reservations), maps) == [], "reservations missing from the address space"


def _cpu_check_released(backend: HostMemory, reservations: list[tuple[int, int]]) -> None:
    """After the allocator's close: nothing of the memfd is mapped, no reservation is left."""
    maps = _proc_maps()
    assert backend.os_pages(maps) == {}, "memfd pages still mapped"
    for lo, hi, perms, _offset, inode in maps:
        for va, size in reservations:
            # A freed range may be reused by the process, but not as a PROT_NONE anonymous reservation.
            left = lo < va + size and va < hi and perms == "---p" and inode == 0
            assert not left, f"reservation {va:#x}+{size} is still in the address space"


def _cpu_before_close(backend: HostMemory) -> dict:
    return {"fd": backend.fd, "inode": os.fstat(backend.fd).st_ino}


def _cpu_check_closed(backend: HostMemory, before: dict) -> None:
    """After the backend's close: the memfd is closed (its number may have been reused, not by it) and unmapped."""
    # Compare the inode of memfd mappings only: inode numbers are per filesystem, and a mapped library on another
    # filesystem can carry the same number (seen once on the GPU machine's image).
    with open("/proc/self/maps") as f:
        memfd_inodes = {int(line.split()[4]) for line in f if "memfd:" in line}
    assert before["inode"] not in memfd_inodes, "a mapping of the memfd is left"
    try:
        reused = os.fstat(before["fd"]).st_ino
    except OSError:
        return
    assert reused != before["inode"], "the memfd is still open"


def _sim_check_closed(backend: SimMemory, before: dict) -> None:
    assert backend.live() == {"reservations": 0, "handles": 0, "mappings": 0}


BACKENDS = {
    "sim": Backend("sim", lambda: SimMemory(4096), check_closed=_sim_check_closed),
    "cpu": Backend(
        "cpu", HostMemory, check_os=_cpu_check_os, check_released=_cpu_check_released,
        check_closed=_cpu_check_closed, before_close=_cpu_before_close,
    ),
}  # fmt: skip


# ---- cuda over test_cuda_vmm's fake driver: the driver's own tables are the real state ------------------------------
try:
    from test_cuda_vmm import FakeDriver

    from kvscope.backends.cuda_vmm import CudaMemory
except (ImportError, pytest.skip.Exception):  # cuda-python missing: test_cuda_vmm skips itself at import
    FakeDriver = None


def _fake_state(mem: Any) -> BackendState:
    d = mem._driver
    return BackendState(
        reservations=frozenset(d.reservations.items()),
        handles=frozenset(d.handles),
        mappings=frozenset((va, size, h, va in d.access) for va, (size, h) in d.maps.items()),
    )


def _fake_check_closed(mem: Any, before: dict) -> None:
    assert mem._driver.ctx_refs == 0 and _fake_state(mem).empty


if FakeDriver is not None:
    BACKENDS["cuda-fake"] = Backend(
        "cuda-fake", lambda: CudaMemory(0, driver=FakeDriver()), real_state=_fake_state, check_closed=_fake_check_closed
    )


@dataclass
class Run:
    """The allocator, its backend and the model of what the live sequences hold."""

    spec: Backend
    backend: Any
    alloc: VMMAllocator
    replay: ReplayCheck
    live: dict[int, int] = field(default_factory=dict)  # seq -> tokens
    errors: list[BaseException] = field(default_factory=list)

    @property
    def tpp(self) -> int:
        return self.alloc.page_size // ROW  # tokens a page holds in one buffer

    def check(self, *, deep: bool = True) -> None:
        """Books == the backend's real state == the replayed trace, and the model holds. `deep` adds the OS's view
        (cpu: /proc/self/maps, ~1 ms a read in a process with torch loaded), taken after failures and closes."""
        a = self.alloc
        a.check_invariants()
        a.usage().check()
        books = a.backend_books()
        assert books == self.backend.state(), "books != backend.state()"
        assert books == self.spec.real_state(self.backend), "books != what the driver holds"
        if deep:
            self.spec.check_os(self.backend, books)
        assert sorted(a.live_sequences()) == sorted(self.live)
        for seq, n in self.live.items():
            assert a.num_tokens(seq) == n
        live_slots = {a.slot_of(seq) for seq in self.live}
        assert not [g for g in a._strays.values() if g.slot in live_slots], "one failure left a stray in a live slot"
        self.replay.check()


def make_allocator(backend: Any, config: dict, recorder: Recorder) -> VMMAllocator:
    page = backend.granularity
    return VMMAllocator(
        SPEC, GROUPS * 4 * page, recorder, backend=backend, max_batch=MAX_BATCH, max_len=SLOT_GROUPS * page // ROW,
        page_size=page, **config,
    )  # fmt: skip


def snapshot(run: Run) -> tuple:
    a = run.alloc
    slots = {seq: (a.slot_of(seq), tuple(a._slot_pages[a.slot_of(seq)])) for seq in a.live_sequences()}
    return a.usage(), slots, a.backend_books(), len(a.pending_copies)


def _fits(run: Run, op: Op) -> bool:
    """Whether the op is one the workload may make: live sequences, within max_len and memory (can_admit /
    can_append). Ops that would fail for lack of memory anyway are skipped, so that every error is the fault's."""
    a, tpp = run.alloc, run.tpp
    if op.kind == "drain":
        return True
    if op.kind == "admit":
        return op.seq not in run.live and a.can_admit(int(op.pages * tpp), a.max_len)
    if op.kind == "fork":
        return op.seq not in run.live and op.parent in run.live and a.can_fork(op.parent)
    if op.seq not in run.live:
        return False
    if op.kind == "append":
        return a.can_append(op.seq, int(op.pages * tpp))
    if op.kind == "ensure_room":
        room = int(op.pages * tpp) - run.live[op.seq]
        return room <= 0 or a.can_append(op.seq, room)
    return True


def apply(run: Run, op: Op) -> None:
    """Run one op (admit includes its prefill, as the engine does), then check everything. On a failure: the
    documented error (checked by the caller), and the live sequences and pages as they were."""
    if not _fits(run, op):
        return
    a, tpp = run.alloc, run.tpp
    before = snapshot(run)
    events_before = a.recorder.to_table().num_rows
    try:
        if op.kind == "drain":
            a.pending_copies.clear()  # what an executor does once it applied them
        elif op.kind == "admit":
            prompt = int(op.pages * tpp)
            hit = a.admit(op.seq, toks(prompt), a.max_len)  # prefix sharing: the full groups others hold
            run.live[op.seq] = hit
            a.append(op.seq, toks(prompt - hit))  # the prefill: admit took the room, so this never needs the driver
            run.live[op.seq] = prompt
        elif op.kind == "fork":
            a.fork(op.parent, op.seq)
            run.live[op.seq] = run.live[op.parent]
        elif op.kind == "append":
            n = int(op.pages * tpp)
            a.append(op.seq, toks(n))
            run.live[op.seq] += n
        elif op.kind == "ensure_room":
            a.ensure_room(op.seq, int(op.pages * tpp))
        else:
            del run.live[op.seq]  # free always frees, even when it raises
            a.free(op.seq)
    except (KVOutOfMemory, BackendError) as e:
        run.errors.append(e)
        run.check()
        after = snapshot(run)
        if op.kind != "free":
            _check_as_it_was(run, before, after, events_before)
        else:  # nothing new mapped; the rest of the slot is unmapped or left as strays
            assert after[2].mappings <= before[2].mappings
        return
    run.check(deep=False)


def _check_as_it_was(run: Run, before: tuple, after: tuple, events_before: int) -> None:
    """A failed admit / fork / append / ensure_room leaves the sequences, their slots and pages, and the pending
    copies as they were. Only idle slots may have given pages up on the way (a dry pool takes them before mapping);
    where none did (no unmap with seq -1 among the op's events), the books are exactly as they were."""
    (u0, slots0, books0, copies0), (u1, slots1, books1, copies1) = before, after
    assert slots1 == slots0 and copies1 == copies0
    table = run.alloc.recorder.to_table().slice(events_before).to_pandas()
    idle_unmaps = ((table["kind"] == "page_unmap") & (table["seq"] == -1)).any()
    if not idle_unmaps:
        assert (u1, books1) == (u0, books0), "a failed operation changed the books"
    assert u1.used == u0.used and u1.reserved <= u0.reserved
    assert books1.mappings <= books0.mappings and books1.handles == books0.handles


def close_and_check(run: Run) -> None:
    """close(), retried once if the injected failure hit it; then nothing is held, a further close() is a no-op,
    every page was created once and released once."""
    a = run.alloc
    try:
        a.close()
    except BackendError as e:
        run.errors.append(e)
        run.live.clear()  # close drops the sequences first
        run.check()
        a.close()  # retries only what is left: the backend would refuse a second release of anything
    run.live.clear()
    run.check()
    calls = Counter(run.backend.calls)
    a.close()
    assert run.backend.calls == calls, "a close() after a successful one called the driver"
    assert a.backend_books().empty and run.backend.state().empty and run.spec.real_state(run.backend).empty
    assert a.usage().capacity == 0 and a.buffer_addresses() == []
    table = a.recorder.to_table().to_pandas()
    created = table.loc[table["kind"] == "page_create", "block"].tolist()
    released = table.loc[table["kind"] == "page_release", "block"].tolist()
    assert sorted(created) == sorted(released) == list(range(a.num_pages))


@dataclass
class Case:
    backend: Any
    run: Run | None  # None: the construction failed
    fault: Fault | None

    @property
    def fired(self) -> bool:
        return self.fault is not None and self.fault in self.backend.faults.fired


Fault3 = tuple[str, int, bool | None]  # (op, nth, oom)


def run_case(spec: Backend, config: dict, fault: Fault3 | None, workload: tuple[Op, ...] = WORKLOAD) -> Case:
    """Build the allocator with the fault armed, run the workload, close; every check above along the way."""
    backend = spec.make()
    armed = None if fault is None else backend.inject_fault(fault[0], fault[1], oom=fault[2])
    try:
        alloc = make_allocator(backend, config, Recorder())
    except (KVOutOfMemory, BackendError) as e:
        _check_error(e, armed)
        assert backend.state().empty and spec.real_state(backend).empty, "a failed construction leaked"
        spec.check_released(backend, [])
        _close_backend(spec, backend)
        return Case(backend, None, armed)
    run = Run(spec, backend, alloc, ReplayCheck(alloc))
    reservations = [(base, alloc.buffer_bytes) for base in alloc.buffer_addresses()]
    run.check()
    for op in workload:
        apply(run, op)
    close_and_check(run)
    spec.check_released(backend, reservations)
    for e in run.errors:
        _check_error(e, armed)
    _close_backend(spec, backend)
    return Case(backend, run, armed)


def _check_error(e: BaseException, armed: Fault | None) -> None:
    """KVOutOfMemory only for lack of memory (chained to the backend's BackendOutOfMemory), else the backend's
    error; and always the injected one."""
    assert armed is not None, f"an error without an injected fault: {e!r}"
    if isinstance(e, KVOutOfMemory):
        assert armed.oom and isinstance(e.__cause__, BackendOutOfMemory), "KVOutOfMemory for a non-memory failure"
        assert "injected" in str(e.__cause__)
    else:
        assert isinstance(e, BackendError) and "injected" in str(e), f"not the injected failure: {e!r}"
        assert isinstance(e, BackendOutOfMemory) == armed.oom


def _close_backend(spec: Backend, backend: Any) -> None:
    before = spec.before_close(backend)
    backend.close()
    backend.close()  # twice is fine
    assert backend.leaked == {"reservations": 0, "handles": 0, "mappings": 0}, "the allocator left something"
    spec.check_closed(backend, before)


def call_counts(name: str) -> Counter[str]:
    """How often the workload makes each driver call (the same on every backend: the allocator decides)."""
    return Counter(run_case(BACKENDS["sim"], CONFIGS[name], None, WORKLOADS[name]).backend.calls)


COUNTS = {name: call_counts(name) for name in CONFIGS}
# Each op with its natural error (OOM for reserve/create/map/set_access, BackendError for the teardown calls), plus
# a map and a set-access that fail for another reason than memory (a bad argument, a lost context).
FAULTS = [(op, None) for op in FAULT_OPS] + [("map", False), ("set_access", False)]
FAULT_IDS = [op if oom is None else f"{op}-error" for op, oom in FAULTS]


def case_count(backends: list[str]) -> int:
    """(backend x config x fault x call index) combinations test_one_failure_at_every_call_index runs."""
    return len(backends) * sum(COUNTS[config][op] for config in CONFIGS for op, _ in FAULTS)


# ---- the tests ------------------------------------------------------------------------------------------------------
def test_the_workload_reaches_every_driver_call_and_the_interesting_paths():
    for name, counts in COUNTS.items():
        assert all(counts[op] > 0 for op in FAULT_OPS), (name, counts)
    case = run_case(BACKENDS["sim"], CONFIGS["deferred"], None)
    table = case.run.alloc.recorder.to_table().to_pandas()
    assert (table["kind"] == "reclaim").any(), "no slot reclaimed idle pages"
    assert ((table["kind"] == "page_unmap") & (table["seq"] == -1)).any(), "no idle slot gave pages up"
    assert len(case.run.alloc.live_sequences()) == 0 and case.run.errors == []
    for name in ("shared", "shared-no-reclaim", "shared-prefix"):
        case = run_case(BACKENDS["sim"], CONFIGS[name], None, WORKLOADS[name])
        table = case.run.alloc.recorder.to_table().to_pandas()
        assert (table["kind"] == "page_cow").sum() == 8, f"{name}: not two copy-on-writes of a 4-page group"
        maps = table[table["kind"] == "page_map"]
        assert maps.duplicated(["block"]).any(), f"{name}: no page mapped twice"
        assert case.run.errors == []
    table = run_case(BACKENDS["sim"], CONFIGS["shared-prefix"], None, WORKLOADS["shared-prefix"]).run
    hits = table.alloc.recorder.to_table().to_pandas()
    assert (hits["kind"] == "prefix_hit").any(), "no prompt shared a page-group"
    assert case_count(list(BACKENDS)) > 1000


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("op,oom", FAULTS, ids=FAULT_IDS)
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_one_failure_at_every_call_index(backend, op, oom, config):
    for nth in range(1, COUNTS[config][op] + 1):
        try:
            case = run_case(BACKENDS[backend], CONFIGS[config], (op, nth, oom), WORKLOADS[config])
        except AssertionError as e:
            raise AssertionError(f"{backend}, {config}: {op} call {nth} fails (oom={oom}): {e}") from e
        assert case.fired, f"{op} call {nth} never failed"


def _sim_run(config: dict) -> Run:
    backend = SimMemory(4096)
    alloc = make_allocator(backend, config, Recorder())
    return Run(BACKENDS["sim"], backend, alloc, ReplayCheck(alloc))


def test_a_failed_unmap_halfway_through_a_group_leaves_a_stray_that_a_retry_finishes():
    run = _sim_run({"page_sharing": False})
    a = run.alloc
    for op in WORKLOAD[:4]:
        apply(run, op)
    run.backend.inject_fault("unmap", 2)
    with pytest.raises(BackendError, match="injected"):
        a.append(2, toks(run.tpp))  # the pool is dry: slot 2 gives up its tail group; buffer 3 goes, buffer 2 fails
    (stray,) = a._strays.values()
    assert (stray.slot, stray.index, stray.mapped) == (2, 1, 3)
    assert a.mapped_groups(2) == 1 and a.num_tokens(2) == int(0.25 * run.tpp)
    run.check()  # the books say which 3 of its 4 pages are still mapped; the backend and the trace agree
    # Still held: slot 2's first group and the stray's 3 mapped pages (the one unmapped is back in the pool).
    assert a.usage().mapped_idle == a.group_bytes + 3 * a.page_size
    a.append(2, toks(run.tpp))  # the retry: the stray is finished first, its pages then mapped for seq 2
    run.live[2] += run.tpp
    assert not a._strays
    run.check()
    close_and_check(run)


def test_free_without_deferred_reclaim_frees_even_when_an_unmap_fails():
    run = _sim_run({"deferred_reclaim": False, "page_sharing": False})
    a = run.alloc
    apply(run, WORKLOAD[0])  # seq 1: 2 groups on slot 0
    run.backend.inject_fault("unmap", 6)  # the tail group goes (4 unmaps), then the first group tears after 1
    with pytest.raises(BackendError, match="injected"):
        del run.live[1]
        a.free(1)
    assert a.live_sequences() == [] and a.mapped_groups(0) == 0
    assert [(g.index, g.mapped) for g in a._strays.values()] == [(0, 3)]
    run.check()
    apply(run, Op("admit", 2, 0.5))  # slot 0 again: its stray is finished before the slot is taken
    assert not a._strays and a.slot_of(2) == 0
    close_and_check(run)


def test_a_failed_release_at_close_is_retried_once_and_only_for_what_is_left():
    run = _sim_run({"page_sharing": False})
    a, backend = run.alloc, run.backend
    for op in WORKLOAD[:3]:
        apply(run, op)
    backend.inject_fault("release", 7)
    with pytest.raises(BackendError, match="injected"):
        a.close()
    assert len(a._handles) == a.num_pages - 6 == backend.live_handles
    assert a.live_sequences() == [] and backend.live_mappings == 0
    run.live.clear()
    run.check()
    with pytest.raises(RuntimeError, match="closed"):
        a.admit(9, toks(1), 10)
    close_and_check(run)
    assert backend.calls["release"] == a.num_pages + 1  # the failed one, then each of the rest once


def test_a_failed_construction_gives_back_what_it_took():
    for op, nth in (("reserve", 3), ("create", 11)):
        backend = SimMemory(4096)
        backend.inject_fault(op, nth)
        recorder = Recorder()
        with pytest.raises(KVOutOfMemory):
            make_allocator(backend, {}, recorder)
        assert backend.state().empty
        table = recorder.to_table().to_pandas()
        created = table.loc[table["kind"] == "page_create", "block"].tolist()
        assert sorted(table.loc[table["kind"] == "page_release", "block"]) == created  # the trace says so too


OPS = st.sampled_from(["admit", "append", "fork", "free", "ensure_room", "drain"])


@settings(max_examples=60, deadline=None)
@given(
    config=st.sampled_from(list(CONFIGS)),
    ops=st.lists(st.tuples(OPS, st.integers(1, 6), st.floats(0, 2.5), st.integers(1, 6)), min_size=1, max_size=24),
    fault=st.tuples(
        st.sampled_from([op for op, _ in FAULTS]), st.integers(1, 60), st.sampled_from([None, False, True])
    ),
)
def test_random_workloads_with_one_failure(config, ops, fault):
    """The same checks on random workloads, with one failure anywhere (where it never fires, nothing failed)."""
    workload = tuple(Op(kind, seq, pages, parent) for kind, seq, pages, parent in ops)
    case = run_case(BACKENDS["sim"], CONFIGS[config], fault, workload)
    if not case.fired and case.run is not None:
        assert case.run.errors == []


# ---- the real CUDA driver -------------------------------------------------------------------------------------------
def _gpu_state(mem: Any) -> BackendState:
    """The driver's own answer at every page-sized place of every reservation (cuMemRetainAllocationHandle,
    cuMemGetAccess). The driver cannot list handles or reservations: those are the backend's."""
    g = mem.granularity
    maps = set()
    for base, size in mem._res_size.items():
        for va in range(base, base + size, g):
            got = mem.driver_mapping(va)
            if got is not None:
                maps.add((va, g, got[0], got[1]))
    return BackendState(frozenset(mem._res_size.items()), frozenset(mem._handles), frozenset(maps))


def _gpu_check_closed(mem: Any, before: dict) -> None:
    assert mem.live() == {"reservations": 0, "handles": 0, "mappings": 0}


@pytest.mark.gpu
def test_gpu_one_failure_at_every_call_index_leaves_nothing_on_the_device():
    from kvscope.nvml import NvmlSampler, NvmlUnavailable

    if FakeDriver is None:
        pytest.skip("cuda-python is missing")
    spec = Backend("cuda", CudaMemory, real_state=_gpu_state, check_closed=_gpu_check_closed)
    CudaMemory().close()  # torch's primary context exists before the first reading
    try:
        nvml = NvmlSampler(0, sample_torch=False)
    except NvmlUnavailable as e:
        pytest.skip(str(e))
    try:
        before = nvml.used_bytes()
        # NVML sees the pages: a pool of 20 pages of 2 MiB is there while the allocator lives, gone after close().
        mem = CudaMemory()
        alloc = make_allocator(mem, {}, Recorder())
        held = nvml.used_bytes() - before
        alloc.close()
        mem.close()
        assert held >= alloc.num_pages * mem.granularity * 9 // 10, f"NVML saw {held} bytes for the pool"
        cases = 0
        for config in CONFIGS:
            for op, oom in FAULTS:
                for nth in range(1, COUNTS[config][op] + 1):
                    try:
                        case = run_case(spec, CONFIGS[config], (op, nth, oom), WORKLOADS[config])
                    except AssertionError as e:
                        raise AssertionError(f"cuda, {config}: {op} call {nth} fails (oom={oom}): {e}") from e
                    assert case.fired
                    cases += 1
        leaked = nvml.used_bytes() - before
    finally:
        nvml.stop()
    print(f"cuda: {cases} (config x fault x call index) cases; NVML used after - before: {leaked} bytes")
    assert cases == case_count(["cuda"])
    assert leaked < mem.granularity, f"{leaked} bytes of device memory left after {cases} cases"
