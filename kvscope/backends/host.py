"""`cpu` physical memory for the VMM allocator: the CUDA VMM calls, done with the operating system.

    reserve      -> mmap(PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE): address space only
    create       -> a page-sized region of ONE memfd (grown with ftruncate; released regions are reused)
    map          -> mmap(MAP_SHARED|MAP_FIXED) of that region at the address, still PROT_NONE
    set_access   -> mprotect(PROT_READ|PROT_WRITE)
    unmap        -> mmap(PROT_NONE, MAP_ANONYMOUS|MAP_FIXED) over it: the page leaves, the reservation stays
    release      -> fallocate(PUNCH_HOLE|KEEP_SIZE): the page's memory goes back to the OS
    free_reservation -> munmap

Like cuMemMap, one page mapped at two addresses shows the same bytes through both (tests prove it). Pages are backed
lazily: memory is taken when a page is first written, and given back when it is released.

The strict bookkeeping (no double map, no unmap of an unmapped range, no leaked handles) comes from SimMemory.
Touching an address that is not mapped with access kills the process (SIGSEGV): only read what is mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
import sys
from dataclasses import dataclass

from kvscope.backends.base import BackendError, BackendOutOfMemory, BackendUnavailable
from kvscope.backends.sim import SimMemory

# Linux values (identical on x86-64 and arm64).
_PROT_NONE = 0x0
_PROT_RW = 0x1 | 0x2
_MAP_SHARED = 0x01
_MAP_PRIVATE = 0x02
_MAP_FIXED = 0x10
_MAP_ANONYMOUS = 0x20
_MAP_NORESERVE = 0x4000
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_MAP_FAILED = ctypes.c_void_p(-1).value
_OOM_ERRNOS = {errno.ENOMEM, errno.ENOSPC, errno.EFBIG}


@dataclass(frozen=True)
class HostPage:
    """A physical page: `size` bytes at `offset` in the backend's memfd. `serial` keeps handles of reused regions
    distinct, so that a stale handle is still refused after its region was released and handed out again."""

    serial: int
    offset: int
    size: int


@functools.cache  # find_library runs ldconfig: once a process is enough
def _load_libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mprotect.restype = ctypes.c_int
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.fallocate.restype = ctypes.c_int
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return libc


def _proc_maps() -> list[tuple[int, int, str, int, int]]:
    """/proc/self/maps as (start, end, perms, file offset, inode) rows."""
    rows = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            rows.append((lo, hi, fields[1], int(fields[2], 16), int(fields[4])))
    return rows


def host_view(va: int, size: int) -> memoryview:
    """A writable memoryview of `size` bytes at `va` (for tests and the cpu executor; torch.frombuffer accepts it).
    Only for ranges that are mapped with access: anything else faults."""
    return memoryview((ctypes.c_char * size).from_address(va)).cast("B")


class HostMemory(SimMemory):
    name = "cpu"

    def __init__(self, *, max_bytes: int | None = None) -> None:
        if sys.platform != "linux" or not hasattr(os, "memfd_create"):
            raise BackendUnavailable(f"the cpu VMM backend needs Linux memfd_create (not available on {sys.platform})")
        try:
            self._fd = os.memfd_create("kvscope-kv", os.MFD_CLOEXEC)
        except OSError as e:
            raise BackendUnavailable(f"the cpu VMM backend could not create a memfd: {e.strerror}") from None
        super().__init__(mmap.PAGESIZE, max_bytes=max_bytes)
        self._libc = _load_libc()
        self._file_size = 0
        self._holes: dict[int, list[int]] = {}  # size -> offsets of released regions, reused before growing
        self._serial = 0
        self._inode = os.fstat(self._fd).st_ino  # names this memfd's mappings in /proc/self/maps

    @property
    def fd(self) -> int:
        """The memfd holding every page (os.pread(fd, n, page.offset) reads a page without mapping it)."""
        return self._fd

    def close(self) -> None:
        """Give everything back to the OS, whatever the allocator left behind: munmap each reservation (the mappings
        inside it go with it), then close the memfd (its pages go with it). The books drop each thing once the OS
        gave it back, so a failed munmap raises BackendError with the rest still on the books and a second close()
        retries only that; once everything is back, close() is a no-op. `leaked` says what the user left."""
        if self._closed and self._fd < 0:
            return
        if not self._closed:
            self.leaked = self.live()
            self._closed = True
        errors: list[str] = []
        for va, size in list(self._res_size.items()):
            if self._libc.munmap(va, size) != 0:
                errors.append(f"munmap({va:#x}, {size}): {os.strerror(ctypes.get_errno())}")
                continue
            for mapped in [m for m in self._maps if va <= m < va + size]:
                self._forget_mapping(mapped)
            self._forget_reservation(va)
        if errors:  # pages still mapped into a reservation that stayed: keep the memfd for the retry
            raise BackendError("cpu: close: " + "; ".join(errors))
        os.close(self._fd)
        self._fd = -1
        self._forget_everything()  # the handles: regions of the memfd, gone with it

    # ---- the kernel's own view (tests) ------------------------------------------------------------------------
    def os_pages(self, maps: list[tuple[int, int, str, int, int]] | None = None) -> dict[int, tuple[int, bool]]:
        """What the kernel has mapped from this backend's memfd, read from /proc/self/maps (or `maps`, rows as
        _proc_maps gives them): OS page address -> (offset in the memfd, writable). Independent of the books, so
        tests can hold the books against it."""
        g = self.granularity
        pages: dict[int, tuple[int, bool]] = {}
        for lo, hi, perms, offset, inode in _proc_maps() if maps is None else maps:
            if inode != self._inode or "s" not in perms:
                continue
            for va in range(lo, hi, g):
                pages[va] = (offset + va - lo, "w" in perms)
        return pages

    def os_missing(
        self, ranges: list[tuple[int, int]], maps: list[tuple[int, int, str, int, int]] | None = None
    ) -> list[tuple[int, int]]:
        """The (va, size) ranges that the process does not have fully mapped (a live reservation always is)."""
        rows = sorted(_proc_maps() if maps is None else maps)
        missing = []
        for va, size in ranges:
            covered = va
            for lo, hi, *_rest in rows:
                if lo <= covered < hi:
                    covered = hi
            if covered < va + size:
                missing.append((va, size))
        return missing

    # ---- OS hooks -------------------------------------------------------------------------------------------
    def _os_reserve(self, size: int) -> int:
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE
        return self._mmap("reserve", None, size, _PROT_NONE, flags, -1, 0)

    def _os_free_reservation(self, va: int, size: int) -> None:
        if self._libc.munmap(va, size) != 0:
            raise self._error("munmap", ctypes.get_errno())

    def _os_create(self, size: int) -> HostPage:
        holes = self._holes.get(size)
        if holes:
            offset = holes.pop()
        else:
            offset = self._file_size
            try:
                os.ftruncate(self._fd, offset + size)
            except OSError as e:
                raise self._error("ftruncate", e.errno or 0) from None
            self._file_size = offset + size
        self._serial += 1
        return HostPage(self._serial, offset, size)

    def _os_map(self, va: int, size: int, handle: HostPage) -> None:
        self._mmap("map", va, size, _PROT_NONE, _MAP_SHARED | _MAP_FIXED, self._fd, handle.offset)

    def _os_set_access(self, va: int, size: int) -> None:
        if self._libc.mprotect(va, size, _PROT_RW) != 0:
            raise self._error("mprotect", ctypes.get_errno())

    def _os_unmap(self, va: int, size: int) -> None:
        flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE
        self._mmap("unmap", va, size, _PROT_NONE, flags, -1, 0)

    def _os_release(self, handle: HostPage, size: int) -> None:
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if self._libc.fallocate(self._fd, mode, handle.offset, size) != 0:
            raise self._error("fallocate(PUNCH_HOLE)", ctypes.get_errno())
        self._holes.setdefault(size, []).append(handle.offset)

    # ---- helpers --------------------------------------------------------------------------------------------
    def _mmap(self, op: str, va: int | None, size: int, prot: int, flags: int, fd: int, offset: int) -> int:
        got = self._libc.mmap(va, size, prot, flags, fd, offset)
        if got is None or got == _MAP_FAILED:
            raise self._error(f"mmap ({op})", ctypes.get_errno())
        if va is not None and got != va:
            raise BackendError(f"cpu: mmap ({op}) placed the range at {got:#x}, not {va:#x}")
        return got

    @staticmethod
    def _error(call: str, code: int) -> BackendError:
        cls = BackendOutOfMemory if code in _OOM_ERRNOS else BackendError
        return cls(f"cpu: {call} failed: {os.strerror(code)}")
