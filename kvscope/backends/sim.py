"""Bookkeeping-only physical memory for the VMM allocator (`sim`), and the strict checks every backend shares.

SimMemory hands out fake virtual addresses and integer page handles, and refuses everything a real driver would
refuse (or would silently get wrong): mapping over a mapped range, mapping outside a reservation, unmapping or
setting access on a range that is not exactly one mapping, releasing a mapped or unknown handle, freeing a
reservation that still has mappings. A bug in the allocator therefore surfaces as a BackendError at the call that
made it, not as a wrong number at the end of a run.

Live counts (`live_handles`, `live_mappings`, `live_reservations`, `live()`), the full record (`state()`) and
per-call counts (`calls`) let tests prove that nothing leaks. `inject_fault` arms a failure of the nth call of any
driver operation (base.FaultPlan); it fires after the checks and before the `_os_*` hook, so a failed call changes
nothing. HostMemory (backends/host.py) and CudaMemory (backends/cuda_vmm.py) reuse these checks and books and add
the real calls through the `_os_*` hooks.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

from kvscope.backends.base import BackendError, BackendOutOfMemory, BackendState, Fault, FaultPlan

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
        self.faults = FaultPlan(self.name)
        self.leaked: dict[str, int] = {}  # what close() found still held (all zeros: the user gave everything back)
        self._closed = False

    # ---- fault injection (tests) ------------------------------------------------------------------------------
    def inject_fault(self, op: str, nth: int = 1, *, oom: bool | None = None) -> Fault:
        """Make the `nth` next call of `op` (any of base.FAULT_OPS) fail as the driver would, with nothing changed:
        BackendOutOfMemory (oom) or BackendError; by default OOM for reserve/create/map/set_access, BackendError
        for unmap/release/free_reservation. For testing that callers roll back."""
        return self.faults.arm(op, nth, oom=oom)

    def clear_faults(self) -> None:
        self.faults.clear()

    @property
    def faults_pending(self) -> int:
        """Injected failures armed and not fired yet."""
        return self.faults.pending

    def _fault(self, op: str) -> None:
        # The plan is empty in every real run: one truth test on the hot path (map runs millions of times in a sim).
        if self.faults.armed:
            self.faults.check(op)

    # ---- counts and state for tests and leak checks ---------------------------------------------------------
    @property
    def live_handles(self) -> int:
        return len(self._handles)

    @property
    def live_mappings(self) -> int:
        return len(self._maps)

    @property
    def live_reservations(self) -> int:
        return len(self._res_size)

    def live(self) -> dict[str, int]:
        """What this backend holds right now (counts); all zeros once its user gave everything back."""
        return {"reservations": self.live_reservations, "handles": self.live_handles, "mappings": self.live_mappings}

    def state(self) -> BackendState:
        """Every reservation, handle and mapping this backend holds: after each call it is exactly what the
        driver holds, since the books change only once the driver call went through."""
        return BackendState(
            reservations=frozenset(self._res_size.items()),
            handles=frozenset(self._handles),
            mappings=frozenset((va, size, h, rw) for va, (size, h, rw) in self._maps.items()),
        )

    def mapped_handle(self, va: int) -> Any:
        """The handle mapped at exactly `va` (BackendError if none)."""
        if va not in self._maps:
            raise BackendError(f"{self.name}: nothing mapped at {va:#x}")
        return self._maps[va][1]

    # ---- protocol: checks, then the injected fault, then the real call, then the books ---------------------
    def reserve(self, size: int) -> int:
        self._check_open()
        self.calls["reserve"] += 1
        self._check_size("reserve", size)
        self._fault("reserve")
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
        self._fault("free_reservation")
        self._os_free_reservation(va, size)
        self._forget_reservation(va)

    def create(self, size: int) -> Any:
        self._check_open()
        self.calls["create"] += 1
        self._check_size("create", size)
        if self.max_bytes is not None and self.physical_bytes + size > self.max_bytes:
            raise BackendOutOfMemory(
                f"{self.name}: create({size}) exceeds max_bytes={self.max_bytes} ({self.physical_bytes} in use)"
            )
        self._fault("create")
        handle = self._os_create(size)
        self._handles[handle] = size
        self.physical_bytes += size
        return handle

    def map(self, va: int, size: int, handle: Any) -> None:
        self._check_open()
        self.calls["map"] += 1
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
        if self.faults.armed:
            self.faults.check("map")
        self._os_map(va, size, handle)
        for cell in cells:
            self._cells.setdefault(cell, set()).add(va)
        self._maps[va] = (size, handle, False)
        self._handle_maps[handle] += 1
        self._res_maps[res] += 1

    def set_access(self, va: int, size: int) -> None:
        self.calls["set_access"] += 1
        entry = self._maps.get(va)
        if entry is None or entry[0] != size:
            raise BackendError(f"{self.name}: set_access({va:#x}, {size}) is not exactly one mapping")
        if self.faults.armed:
            self.faults.check("set_access")
        self._os_set_access(va, size)
        self._maps[va] = (size, entry[1], True)

    def unmap(self, va: int, size: int) -> None:
        self.calls["unmap"] += 1
        entry = self._maps.get(va)
        if entry is None or entry[0] != size:
            raise BackendError(f"{self.name}: unmap({va:#x}, {size}) of a range that is not exactly one mapping")
        self._reservation_of(va, size)
        if self.faults.armed:
            self.faults.check("unmap")
        self._os_unmap(va, size)
        self._forget_mapping(va)

    def release(self, handle: Any) -> None:
        self.calls["release"] += 1
        if handle not in self._handles:
            raise BackendError(f"{self.name}: release of unknown or released handle {handle!r}")
        if self._handle_maps[handle]:
            raise BackendError(f"{self.name}: release of handle {handle!r} still mapped {self._handle_maps[handle]}x")
        self._fault("release")
        self._os_release(handle, self._handles[handle])
        self._forget_handle(handle)

    def close(self) -> None:
        """Nothing real to give back: what the user left is recorded in `leaked` and the books are emptied (a closed
        backend holds nothing). Safe to call twice."""
        if self._closed:
            return
        self.leaked = self.live()
        self._forget_everything()
        self._closed = True

    # ---- books: each forgets one thing once the driver gave it back (the close paths use them too) ---------
    def _forget_mapping(self, va: int) -> None:
        size, handle, _rw = self._maps.pop(va)
        for cell in self._cells_of(va, size):
            owners = self._cells[cell]
            owners.discard(va)
            if not owners:
                del self._cells[cell]
        self._handle_maps[handle] -= 1
        if not self._handle_maps[handle]:
            del self._handle_maps[handle]
        self._res_maps[self._reservation_of(va, size)] -= 1

    def _forget_handle(self, handle: Any) -> None:
        self.physical_bytes -= self._handles.pop(handle)

    def _forget_reservation(self, va: int) -> None:
        del self._res_size[va]
        self._res_maps.pop(va, None)
        self._res_starts.pop(bisect.bisect_left(self._res_starts, va))

    def _forget_everything(self) -> None:
        for va in list(self._maps):
            self._forget_mapping(va)
        for handle in list(self._handles):
            self._forget_handle(handle)
        for va in list(self._res_size):
            self._forget_reservation(va)

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
