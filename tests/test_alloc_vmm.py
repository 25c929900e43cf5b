"""VMM allocator (vAttention) on the sim backend: layout, page mapping events, accounting by hand, megacache
granularity, eager mapping, deferred reclamation with best fit, OOM atomicity, fault-injection rollback, close().
(Every driver call failing at every point of a workload, on every backend: test_vmm_faults.py.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kvscope.alloc.base import Copy, KVAllocator, KVOutOfMemory
from kvscope.alloc.vmm import VMMAllocator
from kvscope.backends.base import BackendError, BackendOutOfMemory
from kvscope.backends.sim import SimMemory
from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.spec import KVSpec, get_spec

SPEC = get_spec("tiny")  # 2 layers: 4 per-layer buffers of 128-byte rows; 512 bytes per token
PAGE = 4096  # 32 tokens per page in a per-layer buffer, 8 in the megacache
GROUP = 4 * PAGE  # one page in each of the 4 buffers
BPT = 512


def make(groups: int = 8, *, max_batch: int = 4, max_len: int = 128, **kw) -> VMMAllocator:
    backend = kw.pop("backend", None) or SimMemory(PAGE)
    nbuf = 1 if kw.get("megacache") else 4
    return VMMAllocator(
        SPEC, groups * nbuf * PAGE, Recorder(), backend=backend, max_batch=max_batch, max_len=max_len,
        page_size=PAGE, **kw,
    )  # fmt: skip


def events(alloc: VMMAllocator, *kinds: Kind) -> list[dict]:
    df = alloc.recorder.to_table().to_pandas()
    names = {k.name.lower() for k in kinds}
    return df[df["kind"].isin(names)].to_dict("records")


def toks(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.int64)


def checked(alloc: VMMAllocator):
    alloc.check_invariants()
    u = alloc.usage()
    u.check()
    return u


def test_is_a_kv_allocator():
    assert isinstance(make(), KVAllocator)


def test_layout_and_construction_events():
    alloc = make(groups=3)
    assert alloc.num_buffers == 4 and alloc.buffer_row_bytes == 128
    assert alloc.rows_per_slot == 128 and alloc.slot_bytes == 128 * 128  # 4 pages a slot, already page-aligned
    assert alloc.buffer_shape == (4 * 128, 2, 16)
    assert alloc.num_pages == 12 and alloc.usage().capacity == 12 * PAGE
    bases = alloc.buffer_addresses()
    assert len(set(bases)) == 4
    (res,) = events(alloc, Kind.VMM_RESERVE)
    assert (res["n"], res["bytes"]) == (4, 4 * 4 * 128 * 128)
    creates = events(alloc, Kind.PAGE_CREATE)
    assert [e["block"] for e in creates] == list(range(12))
    assert all(e["bytes"] == PAGE and e["dur_ns"] >= 0 for e in creates)
    assert alloc.backend.live_handles == 12 and alloc.backend.live_reservations == 4


def test_capacity_is_rounded_down_to_whole_page_groups():
    alloc = VMMAllocator(SPEC, 10 * PAGE + 5, backend=SimMemory(PAGE), max_batch=2, max_len=64, page_size=PAGE)
    assert alloc.num_pages == 8  # two groups of 4; the 2 pages left could never be used


def test_megacache_layout_and_growth_granularity_for_llama3_8b():
    spec = get_spec("llama-3-8b")
    per_layer = VMMAllocator(spec, 1 << 30, backend=SimMemory(), max_batch=2, max_len=4096)
    mega = VMMAllocator(spec, 1 << 30, backend=SimMemory(), max_batch=2, max_len=4096, megacache=True)
    assert per_layer.config()["tokens_per_page"] == 1024  # 2 KiB rows per layer buffer
    assert mega.config()["tokens_per_page"] == 16  # 128 KiB rows: one row holds every layer's K and V
    assert mega.buffer_shape == (2 * 4096, 32, 2, 8, 128)
    for alloc in (per_layer, mega):
        alloc.admit(1, toks(17), 100)
        alloc.append(1, toks(17))
    assert per_layer.usage().reserved == 64 * (2 << 20)  # one page in each of 64 buffers: 128 MiB for 17 tokens
    assert mega.usage().reserved == 2 * (2 << 20)  # two 2 MiB pages
    assert mega.usage().internal == (4 << 20) - 17 * spec.bytes_per_token


def test_growth_maps_pages_in_order_with_events():
    alloc = make()
    alloc.admit(5, toks(10), 100)
    alloc.append(5, toks(10))
    alloc.append(5, toks(30))  # 40 tokens: a second page in every buffer
    maps = events(alloc, Kind.PAGE_MAP)
    access = events(alloc, Kind.PAGE_ACCESS)
    assert [(e["block"], e["n"], e["addr"]) for e in maps] == [
        (0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 3, 0),
        (4, 0, PAGE), (5, 1, PAGE), (6, 2, PAGE), (7, 3, PAGE),
    ]  # fmt: skip
    assert all(e["seq"] == 5 and e["aux"] == 0 and e["dur_ns"] >= 0 for e in maps + access)
    assert [(e["block"], e["n"], e["addr"]) for e in access] == [(e["block"], e["n"], e["addr"]) for e in maps]
    (slot,) = events(alloc, Kind.SLOT_ALLOC)
    assert (slot["seq"], slot["addr"]) == (5, 0)
    assert [(e["n"], e["aux"]) for e in events(alloc, Kind.APPEND)] == [(10, 10), (30, 40)]
    # The backend sees page b of group g at buffer b's base + slot offset + g * page size.
    for e in maps:
        va = alloc.buffer_addresses()[e["n"]] + alloc.slot_of(5) * alloc.slot_bytes + e["addr"]
        assert alloc.backend.mapped_handle(va) == alloc._handles[e["block"]]


def test_usage_by_hand():
    alloc = make()
    alloc.admit(1, toks(10), 100)
    u = checked(alloc)
    assert (u.reserved, u.used, u.reservation) == (GROUP, 0, GROUP)  # the prompt's page, before the prefill
    alloc.append(1, toks(10))
    alloc.append(1, toks(30))
    u = checked(alloc)
    assert (u.reserved, u.used, u.logical) == (2 * GROUP, 40 * BPT, 40 * BPT)
    assert (u.internal, u.reservation, u.mapped_idle, u.cached_idle) == (2 * GROUP - 40 * BPT, 0, 0, 0)
    assert u.free == 6 * GROUP and u.capacity == 8 * GROUP


def test_token_base_is_slot_times_rows_per_slot():
    alloc = make()
    for seq in (1, 2, 3):
        alloc.admit(seq, toks(1), 10)
    assert [alloc.token_base(s) for s in (1, 2, 3)] == [0, 128, 256]


def test_rows_that_do_not_divide_the_page_keep_slots_row_and_page_aligned():
    spec = KVSpec("odd", num_layers=1, num_kv_heads=5, head_dim=16, dtype="float32")  # 320-byte rows
    alloc = VMMAllocator(spec, 8 * PAGE, backend=SimMemory(PAGE), max_batch=3, max_len=50, page_size=PAGE)
    assert alloc.slot_bytes == 20480 and alloc.rows_per_slot == 64  # lcm(4096, 320) = 20480
    for seq in (1, 2):
        alloc.admit(seq, toks(13), 50)  # 13 * 320 = 4160 bytes: two pages
        alloc.append(seq, toks(13))
    assert alloc.token_base(2) == 64
    assert alloc.mapped_groups(alloc.slot_of(2)) == 2
    checked(alloc)


def test_eager_pages_are_counted_as_reservation():
    alloc = make(eager_pages=1)
    alloc.admit(1, toks(10), 100)
    alloc.append(1, toks(10))
    u = checked(alloc)
    assert u.reserved == 2 * GROUP  # one needed, one ahead
    assert (u.internal, u.reservation) == (GROUP - 10 * BPT, GROUP)
    alloc.append(1, toks(30))  # now needs the second group: a third is mapped ahead
    assert checked(alloc).reserved == 3 * GROUP
    alloc.append(1, toks(88))  # 128 tokens = the whole slot: nothing beyond it to map ahead
    u = checked(alloc)
    assert (u.reserved, u.reservation, u.internal) == (4 * GROUP, 0, 0)


def test_eager_mapping_is_best_effort_and_never_unmaps_idle_slots():
    alloc = make(groups=3, eager_pages=1)
    alloc.admit(1, toks(1), 100)  # 1 group needed + 1 ahead
    alloc.admit(2, toks(1), 100)  # 1 group needed; the pool has no second one to map ahead: no error
    assert (alloc.mapped_groups(0), alloc.mapped_groups(1)) == (2, 1)
    alloc.free(1)  # slot 0: 2 idle groups
    alloc.append(2, toks(2))
    assert alloc.mapped_groups(0) == 2 and events(alloc, Kind.PAGE_UNMAP) == []  # ahead-mapping steals nothing
    alloc.append(2, toks(31))  # 33 tokens: a second group is needed, so the idle slot gives one up
    assert (alloc.mapped_groups(0), alloc.mapped_groups(1)) == (1, 2)
    u = checked(alloc)
    assert (u.mapped_idle, u.reservation, u.free) == (GROUP, 0, 0)


def test_deferred_reclaim_best_fit():
    alloc = make(groups=16, max_batch=4)
    sizes = {1: 1, 2: 3, 3: 2}  # page-groups each sequence ends up with
    for seq, groups in sizes.items():
        alloc.admit(seq, toks(32 * groups - 1), 128)
        alloc.append(seq, toks(32 * groups - 1))
    for seq in sizes:
        alloc.free(seq)
    frees = events(alloc, Kind.SLOT_FREE)
    assert [(e["seq"], e["addr"], e["n"]) for e in frees] == [(1, 0, 4), (2, 1, 12), (3, 2, 8)]
    u = checked(alloc)
    assert (u.mapped_idle, u.reserved, u.used) == (6 * GROUP, 6 * GROUP, 0)
    maps_before = len(events(alloc, Kind.PAGE_MAP))

    alloc.admit(10, toks(40), 128)  # prompt + 1 = 41 tokens -> 2 groups: the 2-group slot fits exactly
    assert alloc.slot_of(10) == 2
    alloc.admit(11, toks(5), 128)  # 1 group: the 1-group slot, not the 3-group one (less waste)
    assert alloc.slot_of(11) == 0
    alloc.admit(12, toks(100), 128)  # 4 groups: no idle slot fits -> the largest one (3 groups) + 1 new map
    assert alloc.slot_of(12) == 1
    reclaims = events(alloc, Kind.RECLAIM)
    assert [(e["seq"], e["addr"], e["n"]) for e in reclaims] == [(10, 2, 8), (11, 0, 4), (12, 1, 12)]
    assert len(events(alloc, Kind.PAGE_MAP)) == maps_before + 4  # only seq 12's fourth group needed the driver
    checked(alloc)


def test_a_dry_pool_takes_pages_from_idle_slot_tails():
    alloc = make(groups=4)
    alloc.admit(1, toks(64), 128)  # 2 groups, slot 0
    alloc.append(1, toks(64))
    alloc.admit(2, toks(64), 128)  # 2 groups, slot 1
    alloc.append(2, toks(64))
    alloc.free(1)
    assert checked(alloc).free == 0
    assert alloc.can_append(2, 32)
    alloc.append(2, toks(1))  # a third group: the pool is dry, slot 0 gives up its tail
    unmaps = events(alloc, Kind.PAGE_UNMAP)
    assert [(e["seq"], e["aux"], e["addr"]) for e in unmaps] == [(-1, 0, PAGE)] * 4
    assert sorted(e["block"] for e in unmaps) == [4, 5, 6, 7]  # slot 0's second group
    u = checked(alloc)
    assert (u.mapped_idle, u.free, alloc.mapped_groups(1)) == (GROUP, 0, 3)
    alloc.append(2, toks(32))  # the fourth group: slot 0 gives up its last one
    assert alloc.mapped_groups(0) == 0 and checked(alloc).mapped_idle == 0
    assert alloc.can_append(2, 31) and not alloc.can_append(2, 32)  # 97 + 32 > max_len


def test_without_deferred_reclaim_free_unmaps_at_once():
    alloc = make(deferred_reclaim=False)
    alloc.admit(1, toks(40), 100)
    alloc.append(1, toks(40))
    alloc.free(1)
    unmaps = events(alloc, Kind.PAGE_UNMAP)
    assert len(unmaps) == 8 and all(e["seq"] == 1 and e["aux"] == 0 for e in unmaps)
    assert [e["addr"] for e in unmaps[:4]] == [PAGE] * 4  # the tail goes first
    (free,) = events(alloc, Kind.SLOT_FREE)
    assert free["n"] == 0
    u = checked(alloc)
    assert (u.reserved, u.free) == (0, u.capacity)
    assert alloc.backend.live_mappings == 0
    alloc.admit(2, toks(1), 10)
    assert events(alloc, Kind.RECLAIM) == []


def test_fork_without_page_sharing_takes_a_new_slot_and_queues_a_row_copy():
    alloc = make(page_sharing=False)
    alloc.admit(1, toks(40), 100)
    alloc.append(1, toks(40))
    alloc.fork(1, 2)
    assert alloc.num_tokens(2) == 40 and alloc.slot_of(2) == 1
    assert alloc.pending_copies == [Copy("rows", 0, 128, 40)]
    assert alloc.mapped_groups(1) == 2
    assert events(alloc, Kind.FORK) == []  # the engine owns FORK; the allocator only takes a slot (SLOT_ALLOC)
    assert [e["addr"] for e in events(alloc, Kind.SLOT_ALLOC) if e["seq"] == 2] == [1]
    u = checked(alloc)
    assert (u.used, u.logical, u.reserved) == (80 * BPT, 80 * BPT, 4 * GROUP)


def test_out_of_memory_is_atomic():
    alloc = make(groups=3, max_batch=2)
    assert not alloc.can_admit(97, 100)  # 4 groups > 3
    before = checked(alloc)
    with pytest.raises(KVOutOfMemory, match="needs 4 page-groups, 3 available"):
        alloc.admit(1, toks(97), 100)
    assert checked(alloc) == before and alloc.live_sequences() == []
    (oom,) = events(alloc, Kind.OOM)
    assert (oom["seq"], oom["n"], oom["bytes"]) == (1, 97, 4 * GROUP)

    alloc.admit(1, toks(64), 100)
    alloc.append(1, toks(64))
    alloc.admit(2, toks(30), 100)
    alloc.append(2, toks(30))
    assert not alloc.can_admit(1, 10)  # both slots taken
    with pytest.raises(KVOutOfMemory, match="slots are taken"):
        alloc.admit(3, toks(1), 10)
    assert alloc.can_append(2, 2) and not alloc.can_append(2, 3)  # 32 fits in the mapped group, 33 would not
    before = checked(alloc)
    with pytest.raises(KVOutOfMemory):
        alloc.append(2, toks(3))
    assert checked(alloc) == before and alloc.num_tokens(2) == 30
    with pytest.raises(KVOutOfMemory, match="max_len"):
        alloc.append(1, toks(65))
    with pytest.raises(ValueError, match="exceeds max_len=128"):
        alloc.admit(4, toks(1), 129)


@pytest.mark.parametrize("op", ["map", "set_access"])
@pytest.mark.parametrize("nth", [1, 3, 6])
def test_backend_failure_during_admit_rolls_back(op, nth):
    backend = SimMemory(PAGE)
    alloc = make(backend=backend)
    alloc.admit(1, toks(10), 100)
    before, mappings = checked(alloc), backend.live_mappings
    backend.inject_fault(op, nth)  # fails inside the first (nth <= 4) or the second group
    with pytest.raises(KVOutOfMemory) as err:
        alloc.admit(2, toks(40), 100)
    assert isinstance(err.value.__cause__, BackendOutOfMemory)
    assert checked(alloc) == before and backend.live_mappings == mappings
    assert alloc.live_sequences() == [1]
    # The trace stays replayable: every page it saw mapped for seq 2 was unmapped, and the slot freed again.
    mapped = [e["block"] for e in events(alloc, Kind.PAGE_MAP) if e["seq"] == 2]
    unmapped = [e["block"] for e in events(alloc, Kind.PAGE_UNMAP) if e["seq"] == 2]
    assert sorted(mapped) == sorted(unmapped)
    assert [e["seq"] for e in events(alloc, Kind.SLOT_FREE)] == [2]
    alloc.admit(2, toks(40), 100)  # the pages are all still usable
    assert alloc.mapped_groups(alloc.slot_of(2)) == 2


def test_backend_failure_during_append_rolls_back():
    backend = SimMemory(PAGE)
    alloc = make(backend=backend)
    alloc.admit(1, toks(32), 100)
    alloc.append(1, toks(32))
    before = checked(alloc)
    backend.inject_fault("map", 2)
    with pytest.raises(KVOutOfMemory):
        alloc.append(1, toks(1))
    assert checked(alloc) == before and alloc.num_tokens(1) == 32
    alloc.append(1, toks(1))
    assert alloc.mapped_groups(0) == 2


def test_backend_failure_while_mapping_ahead_keeps_the_append():
    backend = SimMemory(PAGE)
    alloc = make(backend=backend, eager_pages=2)
    backend.inject_fault("map", 6)  # the second group is the first one mapped ahead
    alloc.admit(1, toks(10), 100)
    assert alloc.mapped_groups(0) == 1
    alloc.append(1, toks(10))
    assert alloc.num_tokens(1) == 10 and checked(alloc).reservation == 2 * GROUP  # the next append maps ahead


def test_a_failed_set_access_is_recorded_as_it_happened():
    """The map went through, the set access did not, the rollback unmapped: the trace says exactly that."""
    backend = SimMemory(PAGE)
    alloc = make(backend=backend)
    backend.inject_fault("set_access", 3)
    with pytest.raises(KVOutOfMemory):
        alloc.admit(1, toks(10), 100)
    assert [e["n"] for e in events(alloc, Kind.PAGE_MAP)] == [0, 1, 2]  # buffer 2 was mapped...
    assert [e["n"] for e in events(alloc, Kind.PAGE_ACCESS)] == [0, 1]  # ...but never got access
    assert [e["n"] for e in events(alloc, Kind.PAGE_UNMAP)] == [2, 1, 0]  # and each real mapping was undone
    assert backend.live_mappings == 0 and alloc.backend_books() == backend.state()


def test_a_non_memory_failure_while_mapping_ahead_is_raised_with_nothing_changed():
    backend = SimMemory(PAGE)
    alloc = make(backend=backend, eager_pages=1)
    alloc.admit(1, toks(10), 100)
    alloc.append(1, toks(10))  # 2 groups: 1 needed, 1 ahead
    before, books = checked(alloc), alloc.backend_books()
    backend.inject_fault("map", 5, oom=False)  # the second group of this grow: mapped ahead, not needed
    with pytest.raises(BackendError, match="injected") as err:
        alloc.append(1, toks(55))  # 65 tokens: a third group (mapped), then a fourth ahead (fails)
    assert not isinstance(err.value, KVOutOfMemory | BackendOutOfMemory)
    assert checked(alloc) == before and alloc.backend_books() == books and alloc.num_tokens(1) == 10
    alloc.append(1, toks(55))
    assert alloc.mapped_groups(0) == 4


def test_page_creation_failure_leaks_nothing():
    backend = SimMemory(PAGE)
    backend.inject_fault("create", 5)
    with pytest.raises(KVOutOfMemory) as err:
        make(backend=backend)
    assert isinstance(err.value.__cause__, BackendOutOfMemory)
    assert (backend.live_handles, backend.live_reservations) == (0, 0)


def test_close_unmaps_and_releases_everything():
    backend = SimMemory(PAGE)
    alloc = make(backend=backend)
    alloc.admit(1, toks(40), 100)
    alloc.append(1, toks(40))
    alloc.admit(2, toks(10), 100)
    alloc.free(2)  # one idle group
    alloc.close()
    alloc.close()
    assert (backend.live_handles, backend.live_mappings, backend.live_reservations) == (0, 0, 0)
    assert backend.calls["create"] == backend.calls["release"] == 32
    assert backend.calls["map"] == backend.calls["unmap"] == 12
    releases = events(alloc, Kind.PAGE_RELEASE)
    assert sorted(e["block"] for e in releases) == list(range(32))
    assert [(e["seq"], e["addr"]) for e in events(alloc, Kind.SLOT_FREE)] == [(2, 1), (1, 0)]  # close drops seq 1
    assert not alloc.can_admit(1, 10)
    checked(alloc)


def test_ensure_room_maps_ahead_without_appending():
    alloc = make()
    alloc.admit(1, toks(30), 100)
    alloc.append(1, toks(30))
    assert alloc.ensure_room(1, 33) == 1  # the next step's token needs a second group
    assert alloc.num_tokens(1) == 30
    u = checked(alloc)
    assert u.reservation == GROUP
    assert alloc.ensure_room(1, 40) == 0
    maps = len(events(alloc, Kind.PAGE_MAP))
    alloc.append(1, toks(3))
    assert len(events(alloc, Kind.PAGE_MAP)) == maps  # already mapped
    with pytest.raises(KVOutOfMemory):
        alloc.ensure_room(1, 129)


def test_ensure_room_on_a_background_thread_with_appends():
    """The engine maps the next step's pages on a thread while appending on the main one."""
    alloc = make(groups=64, max_batch=4, max_len=4096)
    for seq in range(4):
        alloc.admit(seq, toks(1), 4096)
        alloc.append(seq, toks(1))
    stop = threading.Event()
    errors: list[BaseException] = []

    def mapper() -> None:
        try:
            while not stop.is_set():
                for seq in range(4):
                    alloc.ensure_room(seq, min(alloc.num_tokens(seq) + 40, 4096))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    thread = threading.Thread(target=mapper)
    thread.start()
    try:
        for _ in range(400):
            for seq in range(4):
                if alloc.can_append(seq, 1):
                    alloc.append(seq, toks(1))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert [alloc.num_tokens(s) for s in range(4)] == [401] * 4
    u = checked(alloc)
    assert u.used == 4 * 401 * BPT


def test_user_mistakes_are_value_errors():
    with pytest.raises(ValueError, match="granularity"):
        VMMAllocator(SPEC, 1 << 20, backend=SimMemory(PAGE), max_batch=2, max_len=64, page_size=PAGE + 512)
    with pytest.raises(ValueError, match="less than one page-group"):
        VMMAllocator(SPEC, 3 * PAGE, backend=SimMemory(PAGE), max_batch=2, max_len=64, page_size=PAGE)
    with pytest.raises(ValueError, match="max_batch"):
        VMMAllocator(SPEC, 1 << 20, backend=SimMemory(PAGE), max_batch=0, max_len=64, page_size=PAGE)
    with pytest.raises(ValueError, match="eager_pages"):
        make(eager_pages=-1)


def test_config():
    cfg = make(megacache=True, eager_pages=1).config()
    assert cfg["megacache"] and cfg["eager_pages"] == 1 and cfg["deferred_reclaim"]
    assert (cfg["backend"], cfg["pages"], cfg["buffers"], cfg["page_size"]) == ("sim", 8, 1, PAGE)
    assert cfg["tokens_per_page"] == 8 and cfg["rows_per_slot"] == 128


# ---- page sharing (issue 11) ---------------------------------------------------------------------------------------
def test_a_fork_maps_the_parents_pages_and_the_first_write_copies_the_shared_half_page():
    alloc = make()
    alloc.admit(1, toks(40), 100)
    alloc.append(1, toks(40))  # a full group (32 tokens a page) and 8 tokens of the next
    alloc.fork(1, 2)
    assert alloc.pending_copies == [] and alloc.slot_of(2) == 1
    assert alloc.page_refs()[:8] == [2] * 8 and sum(alloc.page_refs()) == 16 and alloc.shared_pages() == 8
    child_maps = [e for e in events(alloc, Kind.PAGE_MAP) if e["seq"] == 2]
    assert sorted(e["block"] for e in child_maps) == list(range(8)) and {e["aux"] for e in child_maps} == {1}
    u = checked(alloc)
    assert (u.used, u.logical, u.reserved, u.internal) == (40 * BPT, 80 * BPT, 2 * GROUP, 2 * GROUP - 40 * BPT)
    alloc.append(2, toks(1))  # into the shared half-full group: a fresh page per buffer first
    cows = events(alloc, Kind.PAGE_COW)
    assert [(e["seq"], e["aux"], e["n"]) for e in cows] == [(2, 7, 3), (2, 6, 2), (2, 5, 1), (2, 4, 0)]
    assert alloc.pending_copies == [Copy("rows", 32, 128 + 32, 8)]  # the half page's 8 rows, from the parent
    u = checked(alloc)
    # Distinct: the shared full group once, each half group with its own tokens.
    assert (u.used, u.logical, u.reserved) == ((32 + 8 + 9) * BPT, 81 * BPT, 3 * GROUP)
    alloc.append(1, toks(1))  # the parent holds its half page alone now: no copy
    assert len(events(alloc, Kind.PAGE_COW)) == 4 and alloc.shared_pages() == 4
    checked(alloc)


def test_free_unmaps_from_the_first_shared_group_and_waits_for_copies_that_read_it():
    alloc = make()
    alloc.admit(1, toks(40), 100)
    alloc.append(1, toks(40))
    alloc.fork(1, 2)
    alloc.append(2, toks(1))  # copies the parent's half page: the parent's rows are the copy's source
    alloc.free(1)
    assert alloc.mapped_groups(0) == 2  # kept as it is until the executor ran the copy
    alloc.admit(3, toks(1), 10)  # not reclaimed meanwhile: a new sequence takes another slot
    assert alloc.slot_of(3) == 2 and not [e for e in events(alloc, Kind.RECLAIM) if e["addr"] == 0]
    alloc.free(3)
    alloc.pending_copies.clear()
    checked(alloc)  # drained: the teardown runs (its first group is the child's too: everything goes)
    assert alloc.mapped_groups(0) == 0 and alloc.page_refs()[:4] == [1] * 4
    unmaps = [e for e in events(alloc, Kind.PAGE_UNMAP) if e["aux"] == 0]
    assert len(unmaps) == 8
    alloc.free(2)  # nothing shared any more: deferred reclamation keeps its pages
    assert alloc.mapped_groups(1) == 2
    u = checked(alloc)
    assert u.mapped_idle == (2 + 1) * GROUP and u.used == 0  # slot 1, and slot 2 from seq 3


@pytest.mark.parametrize(("megacache", "shared_pages"), [(False, 0), (True, 2)], ids=["per-layer", "megacache"])
def test_only_whole_pages_stay_shared(megacache, shared_pages):
    """The page-size trade-off: a 20-token prompt fills no 32-token page of a per-layer buffer, so once the samples
    write, nothing is shared; megacache pages hold 8 tokens, so two of its three pages stay shared."""
    alloc = make(megacache=megacache)
    alloc.admit(1, toks(20), 100)
    alloc.append(1, toks(20))
    alloc.fork(1, 2)
    alloc.append(1, toks(1))
    alloc.append(2, toks(1))
    assert alloc.shared_pages() == shared_pages
    u = checked(alloc)
    assert u.logical - u.used == shared_pages * (alloc.tokens_per_page * BPT if megacache else 0)


def test_prefix_sharing_maps_the_full_page_groups_a_live_sequence_holds():
    alloc = make(prefix_sharing=True)
    prompt = np.arange(70)
    assert alloc.admit(1, prompt, 100) == 0
    alloc.append(1, prompt)  # groups 0 and 1 full (64 tokens), 6 tokens in group 2
    other = np.concatenate([prompt[:64], np.arange(1000, 1010)])
    assert alloc.admit(2, other, 100) == 64
    (hit,) = events(alloc, Kind.PREFIX_HIT)
    assert (hit["seq"], hit["n"]) == (2, 64)
    assert alloc.num_tokens(2) == 64 and alloc.page_refs()[:8] == [2] * 8
    alloc.append(2, other[64:])
    u = checked(alloc)
    assert (u.used, u.logical) == ((70 + 10) * BPT, (70 + 74) * BPT)
    assert alloc.admit(3, np.concatenate([prompt[:40], np.arange(2000, 2030)]), 100) == 32  # differs in group 1
    assert alloc.admit(4, prompt[:64], 100) == 32  # the last prompt token is always computed
    alloc.free(1)  # the others keep the shared pages
    alloc.free(3)
    alloc.free(4)
    assert alloc.num_tokens(2) == 74 and alloc.page_refs()[:8] == [1] * 8
    assert alloc.admit(5, prompt, 100) == 64  # seq 2 holds the same groups: still findable
    checked(alloc)


def test_prefix_sharing_needs_pages_of_whole_rows():
    spec = KVSpec("odd", 1, 3, 16, "float32", 6, 96, 128, 256)  # 192-byte rows: 4096 is not a multiple
    with pytest.raises(ValueError, match="whole rows"):
        VMMAllocator(spec, 1 << 20, backend=SimMemory(4096), max_batch=2, max_len=100, page_size=4096,
                     prefix_sharing=True)  # fmt: skip
    alloc = VMMAllocator(spec, 1 << 20, backend=SimMemory(4096), max_batch=2, max_len=100, page_size=4096)
    assert alloc.page_sharing is False  # forks copy rows instead
