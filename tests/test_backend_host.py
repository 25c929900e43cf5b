"""Physical memory backends: the cpu backend (memfd + mmap) does real VMM on the OS; both it and the sim backend
refuse every misuse, so allocator bugs surface as errors."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np
import pytest

from kvscope.alloc.base import KVOutOfMemory
from kvscope.alloc.vmm import VMMAllocator
from kvscope.backends.base import BackendError, BackendOutOfMemory, BackendUnavailable, PhysicalMemory
from kvscope.backends.host import HostMemory, host_view
from kvscope.backends.sim import SimMemory
from kvscope.spec import get_spec


@pytest.fixture
def host():
    backend = HostMemory()
    yield backend
    backend.close()


def _maps_line(va: int) -> str | None:
    """The /proc/self/maps line whose range holds `va`."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= va < hi:
                return line
    return None


def test_both_backends_implement_the_protocol(host):
    assert isinstance(host, PhysicalMemory)
    assert isinstance(SimMemory(), PhysicalMemory)
    assert host.name == "cpu" and host.granularity == os.sysconf("SC_PAGE_SIZE")


def test_a_write_through_the_mapped_address_lands_in_the_memfd_page(host):
    g = host.granularity
    va = host.reserve(4 * g)
    pages = [host.create(g) for _ in range(2)]
    host.map(va + g, g, pages[1])
    host.set_access(va + g, g)
    view = host_view(va + g, g)
    view[:5] = b"hello"
    view[g - 1] = 0x7F
    assert os.pread(host.fd, 5, pages[1].offset) == b"hello"
    assert os.pread(host.fd, 1, pages[1].offset + g - 1) == b"\x7f"
    assert os.pread(host.fd, 5, pages[0].offset) == b"\0" * 5  # the other page is untouched
    host.unmap(va + g, g)
    for p in pages:
        host.release(p)
    host.free_reservation(va, 4 * g)


def test_one_page_mapped_at_two_addresses_shares_its_data(host):
    g = host.granularity
    a = host.reserve(2 * g)
    b = host.reserve(2 * g)
    page = host.create(g)
    for va in (a, b + g):
        host.map(va, g, page)
        host.set_access(va, g)
    host_view(a, g)[100:104] = b"kvkv"
    assert bytes(host_view(b + g, g)[100:104]) == b"kvkv"
    host_view(b + g, g)[0] = 42
    assert host_view(a, g)[0] == 42
    host.unmap(a, g)
    host.unmap(b + g, g)
    host.release(page)
    host.free_reservation(a, 2 * g)
    host.free_reservation(b, 2 * g)


def test_unmap_keeps_the_reservation_and_release_gives_the_memory_back(host):
    g = host.granularity
    va = host.reserve(8 * g)
    assert _maps_line(va).split()[1] == "---p"  # address space only, no access
    page = host.create(8 * g)
    host.map(va, 8 * g, page)
    host.set_access(va, 8 * g)
    assert _maps_line(va).split()[1] == "rw-s"  # shared file mapping with access
    np.frombuffer(host_view(va, 8 * g), np.uint8)[:] = 1  # touch every byte: the memfd now holds 8 pages
    blocks_touched = os.fstat(host.fd).st_blocks
    assert blocks_touched > 0
    host.unmap(va, 8 * g)
    assert _maps_line(va).split()[1] == "---p"  # the reservation survives the unmap
    host.release(page)
    assert os.fstat(host.fd).st_blocks < blocks_touched  # fallocate(PUNCH_HOLE) returned the pages
    again = host.create(8 * g)
    assert again.offset == page.offset  # the released region is reused before the memfd grows
    host.release(again)
    host.free_reservation(va, 8 * g)


def test_host_counts_and_close_release_everything():
    backend = HostMemory()
    g = backend.granularity
    va = backend.reserve(2 * g)
    page = backend.create(g)
    backend.map(va, g, page)
    assert (backend.live_reservations, backend.live_handles, backend.live_mappings) == (1, 1, 1)
    backend.close()
    backend.close()  # twice is fine
    with pytest.raises(BackendError, match="closed"):
        backend.create(g)


def test_missing_memfd_is_a_one_line_unavailable_error(monkeypatch):
    monkeypatch.delattr(os, "memfd_create")
    with pytest.raises(BackendUnavailable) as err:
        HostMemory()
    assert "memfd" in str(err.value) and "\n" not in str(err.value)


def test_host_create_beyond_max_bytes_is_out_of_memory():
    backend = HostMemory(max_bytes=3 * mmap.PAGESIZE)
    g = backend.granularity
    pages = [backend.create(g) for _ in range(3)]
    with pytest.raises(BackendOutOfMemory):
        backend.create(g)
    for p in pages:
        backend.release(p)
    backend.close()


@pytest.fixture(params=["sim", "cpu"])
def backend(request):
    b = SimMemory() if request.param == "sim" else HostMemory()
    yield b
    b.close()


def test_misuse_is_refused(backend):
    g = backend.granularity
    va = backend.reserve(4 * g)
    p, q = backend.create(g), backend.create(g)
    backend.map(va, g, p)
    with pytest.raises(BackendError, match="over"):
        backend.map(va, g, q)  # double map of an address
    with pytest.raises(BackendError, match="over"):
        backend.map(va, 2 * g, backend.create(2 * g))  # overlapping range
    with pytest.raises(BackendError, match="outside"):
        backend.map(va + 4 * g, g, q)  # past the end of the reservation
    with pytest.raises(BackendError, match="aligned"):
        backend.map(va + 1, g, q)
    with pytest.raises(BackendError, match="not exactly one mapping"):
        backend.unmap(va + g, g)  # nothing mapped there
    with pytest.raises(BackendError, match="not exactly one mapping"):
        backend.set_access(va + g, g)
    with pytest.raises(BackendError, match="still mapped"):
        backend.release(p)
    with pytest.raises(BackendError, match="live mappings"):
        backend.free_reservation(va, 4 * g)
    with pytest.raises(BackendError, match="multiple"):
        backend.create(g + 1)
    backend.unmap(va, g)
    with pytest.raises(BackendError, match="not exactly one mapping"):
        backend.unmap(va, g)  # unmap twice
    backend.release(p)
    with pytest.raises(BackendError, match="unknown or released"):
        backend.release(p)  # release twice
    with pytest.raises(BackendError, match="unknown or released"):
        backend.map(va, g, p)  # map a released page
    with pytest.raises(BackendError, match="does not match"):
        backend.free_reservation(va, 2 * g)
    backend.free_reservation(va, 4 * g)
    assert backend.live_mappings == 0 and backend.live_reservations == 0
    assert backend.live_handles == 2  # q and the 2-page one


def test_vmm_allocator_on_host_memory_holds_real_data():
    """End to end: tokens written through a sequence's rows survive, fork (without page sharing) copies them into the
    child's slot, and close() leaves nothing in the OS."""
    spec = get_spec("tiny")  # 128-byte rows per layer buffer, 512 bytes per token
    backend = HostMemory()
    g = backend.granularity
    alloc = VMMAllocator(spec, 16 * 4 * g, backend=backend, max_batch=4, max_len=100, page_size=g, page_sharing=False)
    row = alloc.buffer_row_bytes
    alloc.admit(7, np.arange(50), final_len=90)
    alloc.append(7, np.arange(50))
    base = alloc.token_base(7)
    for b, va in enumerate(alloc.buffer_addresses()):
        rows = np.frombuffer(host_view(va + base * row, 50 * row), np.float32).reshape(50, -1)
        rows[:] = np.arange(50, dtype=np.float32)[:, None] + 1000 * b
    alloc.fork(7, 8)
    (copy,) = alloc.pending_copies
    assert (copy.kind, copy.src, copy.dst, copy.n) == ("rows", base, alloc.token_base(8), 50)
    for b, va in enumerate(alloc.buffer_addresses()):
        src = np.frombuffer(host_view(va + copy.src * row, copy.n * row), np.uint8)
        np.frombuffer(host_view(va + copy.dst * row, copy.n * row), np.uint8)[:] = src  # what an executor does
        child = np.frombuffer(host_view(va + copy.dst * row, 50 * row), np.float32).reshape(50, -1)
        assert child[:, 0].tolist() == [t + 1000 * b for t in range(50)]
    alloc.free(7)
    alloc.free(8)
    alloc.close()
    assert (backend.live_handles, backend.live_mappings, backend.live_reservations) == (0, 0, 0)
    backend.close()


def _rows(alloc: VMMAllocator, seq: int, buffer: int, n: int) -> np.ndarray:
    """A sequence's first n rows of one buffer, as float32 [n, kv_heads * head_dim], viewed in place."""
    va = alloc.buffer_addresses()[buffer] + alloc.token_base(seq) * alloc.buffer_row_bytes
    return np.frombuffer(host_view(va, n * alloc.buffer_row_bytes), np.float32).reshape(n, -1)


def test_a_sharing_fork_maps_the_same_memfd_pages_and_copy_on_write_splits_them():
    """Page sharing on real OS memory: the child's slot maps the parent's memfd offsets (the kernel says so), a write
    through one address is read through the other, full pages stay aliased after the first append, and the partly
    filled page is split: after its copy, a write through one slot no longer shows through the other."""
    spec = get_spec("tiny")
    backend = HostMemory()
    g = backend.granularity  # 4 KiB: 32 rows of 128 bytes a page
    alloc = VMMAllocator(spec, 16 * 4 * g, backend=backend, max_batch=4, max_len=100, page_size=g)
    tpp = g // alloc.buffer_row_bytes
    alloc.admit(7, np.arange(40), final_len=90)
    alloc.append(7, np.arange(40))  # one full page and 8 rows of the second, in each of the 4 buffers
    for b in range(alloc.num_buffers):
        _rows(alloc, 7, b, 40)[:] = np.arange(40, dtype=np.float32)[:, None] + 1000 * b
    alloc.fork(7, 8)
    assert alloc.pending_copies == [] and alloc.shared_pages() == 2 * alloc.num_buffers
    os_pages = backend.os_pages()
    for b, base in enumerate(alloc.buffer_addresses()):
        for page in range(2):
            at = [base + alloc.slot_of(seq) * alloc.slot_bytes + page * g for seq in (7, 8)]
            assert os_pages[at[0]] == os_pages[at[1]], "not the same memfd offset at both addresses"
        assert _rows(alloc, 8, b, 40)[:, 0].tolist() == [t + 1000 * b for t in range(40)]
    _rows(alloc, 8, 0, 40)[3] = -1.0  # a write through the child's address is in the parent's rows too
    assert _rows(alloc, 7, 0, 40)[3, 0] == -1.0
    alloc.append(8, np.arange(1))  # the child writes into the shared half page: it copies it first
    (copy,) = alloc.pending_copies
    assert (copy.src, copy.dst, copy.n) == (alloc.token_base(7) + tpp, alloc.token_base(8) + tpp, 40 - tpp)
    for b in range(alloc.num_buffers):  # what an executor does with a rows copy
        src = _rows(alloc, 7, b, 41)[copy.src - alloc.token_base(7) :][: copy.n]
        _rows(alloc, 8, b, 41)[tpp : tpp + copy.n] = src
    alloc.pending_copies.clear()
    assert alloc.shared_pages() == alloc.num_buffers  # the full first pages stay shared
    _rows(alloc, 8, 1, 41)[tpp + 1] = -2.0  # the split page: the parent does not see it
    assert _rows(alloc, 7, 1, 41)[tpp + 1, 0] == 1000 + tpp + 1
    assert _rows(alloc, 8, 1, 41)[tpp:40, 0].tolist()[2:] == [1000 + t for t in range(tpp + 2, 40)]
    _rows(alloc, 7, 1, 40)[0] = -3.0  # the shared full page: still aliased
    assert _rows(alloc, 8, 1, 40)[0, 0] == -3.0
    alloc.check_invariants()
    assert alloc.backend_books() == backend.state()
    alloc.free(7)
    alloc.free(8)
    alloc.close()
    assert backend.os_pages() == {} and backend.live() == {"reservations": 0, "handles": 0, "mappings": 0}
    backend.close()


def test_vmm_on_host_memory_that_cannot_hold_the_pool_fails_cleanly():
    g = mmap.PAGESIZE
    backend = HostMemory(max_bytes=10 * g)
    with pytest.raises(KVOutOfMemory) as err:
        VMMAllocator(get_spec("tiny"), 16 * g, backend=backend, max_batch=2, max_len=64, page_size=g)
    assert isinstance(err.value.__cause__, BackendOutOfMemory)
    assert (backend.live_handles, backend.live_mappings, backend.live_reservations) == (0, 0, 0)
    backend.close()


FAULTS = {  # op -> the error an injected failure raises by default
    "reserve": BackendOutOfMemory,
    "create": BackendOutOfMemory,
    "map": BackendOutOfMemory,
    "set_access": BackendOutOfMemory,
    "unmap": BackendError,  # tearing down does not fail for lack of memory
    "release": BackendError,
    "free_reservation": BackendError,
}


@pytest.mark.parametrize("op", list(FAULTS))
def test_an_injected_fault_fails_the_call_and_changes_nothing(backend, op):
    """Each of the seven driver calls fails with the backend's own error, before the OS sees it; once."""
    g = backend.granularity
    va = backend.reserve(2 * g)
    page = backend.create(g)
    if op in ("set_access", "unmap"):
        backend.map(va, g, page)
    call = {
        "reserve": lambda: backend.reserve(2 * g),
        "create": lambda: backend.create(g),
        "map": lambda: backend.map(va, g, page),
        "set_access": lambda: backend.set_access(va, g),
        "unmap": lambda: backend.unmap(va, g),
        "release": lambda: backend.release(page),
        "free_reservation": lambda: backend.free_reservation(va, 2 * g),
    }[op]
    before = backend.state()
    os_before = backend.os_pages() if isinstance(backend, HostMemory) else None
    fault = backend.inject_fault(op)
    with pytest.raises(FAULTS[op], match="injected") as err:
        call()
    assert type(err.value) is FAULTS[op]
    assert backend.state() == before and backend.faults_pending == 0 and backend.faults.fired == [fault]
    if os_before is not None:
        assert backend.os_pages() == os_before
    call()  # the fault fired once: the same call now goes through


def test_a_fault_counts_calls_from_when_it_was_armed_and_can_be_either_kind(backend):
    g = backend.granularity
    backend.create(g)
    backend.inject_fault("create", 3, oom=False)
    backend.inject_fault("reserve", 1, oom=False)
    pages = [backend.create(g), backend.create(g)]
    with pytest.raises(BackendError) as err:
        backend.create(g)
    assert not isinstance(err.value, BackendOutOfMemory) and backend.live_handles == 3
    with pytest.raises(BackendError):
        backend.reserve(g)
    backend.inject_fault("release", oom=True)
    with pytest.raises(BackendOutOfMemory):
        backend.release(pages[0])
    backend.inject_fault("map", 5)
    backend.clear_faults()
    assert backend.faults_pending == 0


def test_host_os_view_follows_map_access_and_unmap(host):
    g = host.granularity
    va = host.reserve(4 * g)
    assert host.os_pages() == {} and host.os_missing([(va, 4 * g)]) == []
    page = host.create(2 * g)
    host.map(va + g, 2 * g, page)
    assert host.os_pages() == {va + g: (page.offset, False), va + 2 * g: (page.offset + g, False)}
    host.set_access(va + g, 2 * g)
    assert {v for v, (_off, rw) in host.os_pages().items() if rw} == {va + g, va + 2 * g}
    host.unmap(va + g, 2 * g)
    assert host.os_pages() == {}
    assert host.os_missing([(va, 4 * g), (va + 4 * g, 1 << 40)]) == [(va + 4 * g, 1 << 40)]  # only the reservation
    host.release(page)
    host.free_reservation(va, 4 * g)
    assert host.state().empty


class _FlakyMunmap:
    """The backend's libc with munmap failing `fail` times (EINVAL), the rest passed through."""

    def __init__(self, libc, fail: int) -> None:
        self._libc, self.fail, self.calls = libc, fail, 0

    def munmap(self, va, size):
        self.calls += 1
        if self.fail:
            self.fail -= 1
            ctypes.set_errno(errno.EINVAL)
            return -1
        return self._libc.munmap(va, size)

    def __getattr__(self, name):
        return getattr(self._libc, name)


def test_host_close_after_a_failed_munmap_raises_and_a_retry_frees_only_the_rest():
    backend = HostMemory()
    g = backend.granularity
    backend.reserve(2 * g)
    b = backend.reserve(2 * g)
    page = backend.create(g)
    backend.map(b, g, page)
    backend.set_access(b, g)
    fd, inode = backend.fd, os.fstat(backend.fd).st_ino
    backend._libc = flaky = _FlakyMunmap(backend._libc, fail=1)
    with pytest.raises(BackendError, match="munmap"):
        backend.close()
    assert backend.live_reservations == 1 and os.fstat(fd).st_ino == inode  # one range left; the memfd stays
    assert backend.leaked == {"reservations": 2, "handles": 1, "mappings": 1}
    backend.close()
    assert flaky.calls == 3  # the failed one twice, the other once
    assert backend.state().empty and backend.os_pages() == {}
    with pytest.raises(OSError):
        os.fstat(fd)
    backend.close()  # done: a no-op
    assert flaky.calls == 3
