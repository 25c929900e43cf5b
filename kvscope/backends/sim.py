"""Bookkeeping-only physical memory for the VMM allocator (`sim`), and the strict checks every backend shares.

SimMemory hands out fake virtual addresses and integer page handles, and refuses everything a real driver would
refuse (or would silently get wrong): mapping over a mapped range, mapping outside a reservation, unmapping or
setting access on a range that is not exactly one mapping, releasing a mapped or unknown handle, freeing a
reservation that still has mappings. A bug in the allocator therefore surfaces as a BackendError at the call that
made it, not as a wrong number at the end of a run.

Live counts (`live_handles`, `live_mappings`, `live_reservations`) and per-call counts (`calls`) let tests prove
that nothing leaks. HostMemory (backends/host.py) reuses these checks and adds the real OS calls through the
`_os_*` hooks.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

from kvscope.backends.base import BackendError, BackendOutOfMemory

_SIM_BASE = 1 << 44  # fake addresses start high, like a GPU VA range; nothing ever dereferences them


class SimMemory:
    name = "sim"

    def __init__(self, granularity: int = 4096, *, max_bytes: int | None = None) -> None:
        if granularity <= 0:
            raise ValueError(f"granularity must be positive, got {granularity}")
        self.granularity = granularity
        self.max_bytes = max_bytes  # physical bytes create() may hand out in all (None: unlimited)
        self.calls: Counter[str] = Counter()
        self.physical_bytes = 0
        self._next_handle = 0
        self._next_va = _SIM_BASE
        self._handles: dict[Any, int] = {}  # handle -> size
        self._handle_maps: Counter = Counter()  # handle -> live mappings of it (a page may be mapped twice)
        self._res_starts: list[int] = []  # sorted reservation bases
        self._res_size: dict[int, int] = {}
        self._res_maps: Counter[int] = Counter()  # reservation base -> live mappings inside it
        self._maps: dict[int, tuple[int, Any, bool]] = {}  # va -> (size, handle, accessible)
        # Overlap checks in O(1): address space cut into cells of the first mapping's size; every mapping is listed
        # in each cell it touches (a page-sized mapping touches one or two), so a new range only looks at its cells.
        self._cell_size = 0
        self._cells: dict[int, set[int]] = {}
        self._faults: dict[str, int] = {}  # op -> calls left until an injected failure
        self._closed = False

    # ---- fault injection (tests) ------------------------------------------------------------------------------
    def inject_fault(self, op: str, nth: int = 1) -> None:
        """Make the `nth` next call of `op` (create, map or set_access) raise BackendOutOfMemory, as a driver out of
        memory would: for testing that callers roll back. (CudaMemory has its own, richer inject_fault.)"""
        if op not in ("create", "map", "set_access"):
            raise ValueError(f"inject_fault: op must be create, map or set_access, got {op!r}")
        if nth < 1:
            raise ValueError(f"inject_fault: nth must be >= 1, got {nth}")
        self._faults[op] = nth

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def faults_pending(self) -> int:
        """Injected failures armed and not fired yet."""
        return len(self._faults)

    def _fault(self, op: str) -> None:
        left = self._faults.get(op)
        if left is not None:
            if left > 1:
                self._faults[op] = left - 1
            else:
                del self._faults[op]
                raise BackendOutOfMemory(f"{self.name}: injected {op} failure")

    # ---- counts for tests and leak checks -------------------------------------------------------------------
    @property
    def live_handles(self) -> int:
        return len(self._handles)

    @property
    def live_mappings(self) -> int:
        return len(self._maps)

    @property
    def live_reservations(self) -> int:
        return len(self._res_size)

    def mapped_handle(self, va: int) -> Any:
        """The handle mapped at exactly `va` (BackendError if none)."""
        if va not in self._maps:
            raise BackendError(f"{self.name}: nothing mapped at {va:#x}")
        return self._maps[va][1]

    # ---- protocol ---------------------------------------------------------------------------------------------
    def reserve(self, size: int) -> int:
        self._check_open()
        self.calls["reserve"] += 1
        self._check_size("reserve", size)
        va = self._os_reserve(size)
        bisect.insort(self._res_starts, va)
        self._res_size[va] = size
        return va

    def free_reservation(self, va: int, size: int) -> None:
        self.calls["free_reservation"] += 1
        if self._res_size.get(va) != size:
            raise BackendError(f"{self.name}: free_reservation({va:#x}, {size}) does not match a reservation")
        if self._res_maps[va]:
            raise BackendError(f"{self.name}: free_reservation({va:#x}) with {self._res_maps[va]} live mappings")
        self._os_free_reservation(va, size)
        del self._res_size[va]
        del self._res_maps[va]
        self._res_starts.pop(bisect.bisect_left(self._res_starts, va))

    def create(self, size: int) -> Any:
        self._check_open()
        self.calls["create"] += 1
        self._check_size("create", size)
        if self._faults:
            self._fault("create")
        if self.max_bytes is not None and self.physical_bytes + size > self.max_bytes:
            raise BackendOutOfMemory(
                f"{self.name}: create({size}) exceeds max_bytes={self.max_bytes} ({self.physical_bytes} in use)"
            )
        handle = self._os_create(size)
        self._handles[handle] = size
        self.physical_bytes += size
        return handle

    def map(self, va: int, size: int, handle: Any) -> None:
        self._check_open()
        self.calls["map"] += 1
        if self._faults:
            self._fault("map")
        if handle not in self._handles:
            raise BackendError(f"{self.name}: map of unknown or released handle {handle!r}")
        if size != self._handles[handle]:
            raise BackendError(f"{self.name}: map size {size} != page size {self._handles[handle]}")
        if va % self.granularity:
            raise BackendError(f"{self.name}: map address {va:#x} not aligned to {self.granularity}")
        res = self._reservation_of(va, size)
        if not self._cell_size:
            self._cell_size = size
        cells = self._cells_of(va, size)
        for cell in cells:
            for other in self._cells.get(cell, ()):
                if other < va + size and va < other + self._maps[other][0]:
                    raise BackendError(f"{self.name}: map of {va:#x}+{size} over the mapping at {other:#x}")
        self._os_map(va, size, handle)
        for cell in cells:
            self._cells.setdefault(cell, set()).add(va)
        self._maps[va] = (size, handle, False)
        self._handle_maps[handle] += 1
        self._res_maps[res] += 1

    def set_access(self, va: int, size: int) -> None:
        self.calls["set_access"] += 1
        if self._faults:
            self._fault("set_access")
        entry = self._maps.get(va)
        if entry is None or entry[0] != size:
            raise BackendError(f"{self.name}: set_access({va:#x}, {size}) is not exactly one mapping")
        self._os_set_access(va, size)
        self._maps[va] = (size, entry[1], True)

    def unmap(self, va: int, size: int) -> None:
        self.calls["unmap"] += 1
        entry = self._maps.get(va)
        if entry is None or entry[0] != size:
            raise BackendError(f"{self.name}: unmap({va:#x}, {size}) of a range that is not exactly one mapping")
        res = self._reservation_of(va, size)
        self._os_unmap(va, size)
        del self._maps[va]
        for cell in self._cells_of(va, size):
            owners = self._cells[cell]
            owners.discard(va)
            if not owners:
                del self._cells[cell]
        handle = entry[1]
        self._handle_maps[handle] -= 1
        if not self._handle_maps[handle]:
            del self._handle_maps[handle]
        self._res_maps[res] -= 1

    def release(self, handle: Any) -> None:
        self.calls["release"] += 1
        if handle not in self._handles:
            raise BackendError(f"{self.name}: release of unknown or released handle {handle!r}")
        if self._handle_maps[handle]:
            raise BackendError(f"{self.name}: release of handle {handle!r} still mapped {self._handle_maps[handle]}x")
        self._os_release(handle, self._handles[handle])
        self.physical_bytes -= self._handles.pop(handle)

    def close(self) -> None:
        self._closed = True

    # ---- helpers --------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"{self.name}: backend is closed")

    def _check_size(self, op: str, size: int) -> None:
        if size <= 0 or size % self.granularity:
            raise BackendError(f"{self.name}: {op} size {size} is not a positive multiple of {self.granularity}")

    def _cells_of(self, va: int, size: int) -> range:
        return range(va // self._cell_size, (va + size - 1) // self._cell_size + 1)

    def _reservation_of(self, va: int, size: int) -> int:
        i = bisect.bisect_right(self._res_starts, va) - 1
        if i < 0 or va + size > self._res_starts[i] + self._res_size[self._res_starts[i]]:
            raise BackendError(f"{self.name}: range {va:#x}+{size} is outside every reservation")
        return self._res_starts[i]

    # ---- OS hooks: the sim backend only invents addresses and handles ----------------------------------------
    def _os_reserve(self, size: int) -> int:
        va = self._next_va
        # A guard gap between reservations so that an off-by-one in the allocator lands outside every reservation.
        self._next_va += -(-size // self.granularity) * self.granularity + self.granularity
        return va

    def _os_free_reservation(self, va: int, size: int) -> None:
        pass

    def _os_create(self, size: int) -> Any:
        self._next_handle += 1
        return self._next_handle

    def _os_map(self, va: int, size: int, handle: Any) -> None:
        pass

    def _os_set_access(self, va: int, size: int) -> None:
        pass

    def _os_unmap(self, va: int, size: int) -> None:
        pass

    def _os_release(self, handle: Any, size: int) -> None:
        pass
