"""Physical memory for the VMM allocator: the six driver operations, behind one protocol.

The CUDA backend calls cuMemAddressReserve / cuMemCreate / cuMemMap / cuMemSetAccess / cuMemUnmap / cuMemRelease;
the cpu backend does the same with the OS (an mmap'd PROT_NONE range, memfd pages mapped in with MAP_FIXED); the sim
backend only does bookkeeping. The VMM allocator times each call (perf_counter_ns) and records it as an event.

Every backend carries a FaultPlan: tests arm "the nth call of op fails" and the backend consults the plan right
before its real call (after its own argument checks), so an injected failure looks exactly like a driver that
refused a valid call: the backend's own error type, nothing changed. `state()` reports what a backend really holds
(BackendState), to set against the allocator's books after a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class BackendError(RuntimeError):
    """A driver/OS call failed for a reason other than memory (bad argument, no driver)."""


class BackendOutOfMemory(BackendError):
    """Creating or mapping physical memory failed for lack of memory."""


class BackendUnavailable(BackendError):
    """The backend cannot run on this machine (no CUDA driver, no memfd). str() is one line for the user."""


@runtime_checkable
class PhysicalMemory(Protocol):
    name: str  # "cuda" | "cpu" | "sim"
    granularity: int  # smallest page size (bytes) this backend can map; page sizes must be multiples of it

    def reserve(self, size: int) -> int:
        """Reserve `size` bytes of virtual address space; returns its base address."""

    def free_reservation(self, va: int, size: int) -> None: ...

    def create(self, size: int) -> Any:
        """Create one physical page of `size` bytes; returns an opaque handle. Raises BackendOutOfMemory."""

    def map(self, va: int, size: int, handle: Any) -> None: ...

    def set_access(self, va: int, size: int) -> None:
        """Make a mapped range readable and writable by the device (a no-op where mapping already does it)."""

    def unmap(self, va: int, size: int) -> None: ...

    def release(self, handle: Any) -> None: ...

    def close(self) -> None: ...


# The driver calls a fault can be injected into: the six VMM operations and the freeing of address space.
FAULT_OPS = ("reserve", "create", "map", "set_access", "unmap", "release", "free_reservation")
# Calls that can run out of memory on a real driver; an injected fault in them is BackendOutOfMemory by default.
# The others (tearing down) fail for other reasons (a bad handle, a lost context): BackendError.
_OOM_OPS = frozenset({"reserve", "create", "map", "set_access"})


@dataclass
class Fault:
    """The `nth` call of `op` counted from when the fault was armed (1-based) fails before reaching the driver:
    with BackendOutOfMemory when `oom`, else with BackendError."""

    op: str
    nth: int
    oom: bool
    seen: int = 0


@dataclass
class FaultPlan:
    """Injected driver failures for one backend. Several faults may be armed at once (each counts its own calls);
    a fault fires once and is gone. `fired` keeps what fired, in order, for tests to assert on."""

    backend: str
    armed: list[Fault] = field(default_factory=list)
    fired: list[Fault] = field(default_factory=list)

    def arm(self, op: str, nth: int = 1, *, oom: bool | None = None) -> Fault:
        if op not in FAULT_OPS:
            raise ValueError(f"inject_fault: unknown op {op!r}; choose from {', '.join(FAULT_OPS)}")
        if nth < 1:
            raise ValueError(f"inject_fault: nth must be >= 1, got {nth}")
        fault = Fault(op, nth, op in _OOM_OPS if oom is None else oom)
        self.armed.append(fault)
        return fault

    def check(self, op: str) -> None:
        """Called by the backend right before its real `op` call: raise if an armed fault says this call fails."""
        for fault in self.armed:
            if fault.op != op:
                continue
            fault.seen += 1
            if fault.seen == fault.nth:
                self.armed.remove(fault)
                self.fired.append(fault)
                message = f"{self.backend} backend: {op} failed: injected fault (call {fault.nth})"
                raise BackendOutOfMemory(message) if fault.oom else BackendError(message)

    def clear(self) -> None:
        self.armed.clear()

    @property
    def pending(self) -> int:
        return len(self.armed)


@dataclass(frozen=True)
class BackendState:
    """What a backend holds, as sets, comparable with ==: VMMAllocator.backend_books() says what the allocator
    believes, a backend's state() what it really holds."""

    reservations: frozenset[tuple[int, int]] = frozenset()  # (base address, size)
    handles: frozenset[Any] = frozenset()
    mappings: frozenset[tuple[int, int, Any, bool]] = frozenset()  # (address, size, handle, accessible)

    @property
    def empty(self) -> bool:
        return not (self.reservations or self.handles or self.mappings)

    def counts(self) -> dict[str, int]:
        return {"reservations": len(self.reservations), "handles": len(self.handles), "mappings": len(self.mappings)}
