"""Physical memory backends: the cpu backend (memfd + mmap) does real VMM on the OS; both it and the sim backend
refuse every misuse, so allocator bugs surface as errors."""

from __future__ import annotations

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
    """End to end: tokens written through a sequence's rows survive, fork copies them into the child's slot, and
    close() leaves nothing in the OS."""
    spec = get_spec("tiny")  # 128-byte rows per layer buffer, 512 bytes per token
    backend = HostMemory()
    g = backend.granularity
    alloc = VMMAllocator(spec, 16 * 4 * g, backend=backend, max_batch=4, max_len=100, page_size=g)
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


def test_vmm_on_host_memory_that_cannot_hold_the_pool_fails_cleanly():
    g = mmap.PAGESIZE
    backend = HostMemory(max_bytes=10 * g)
    with pytest.raises(KVOutOfMemory) as err:
        VMMAllocator(get_spec("tiny"), 16 * g, backend=backend, max_batch=2, max_len=64, page_size=g)
    assert isinstance(err.value.__cause__, BackendOutOfMemory)
    assert (backend.live_handles, backend.live_mappings, backend.live_reservations) == (0, 0, 0)
    backend.close()
