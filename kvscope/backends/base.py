"""Physical memory for the VMM allocator: the six driver operations, behind one protocol.

The CUDA backend calls cuMemAddressReserve / cuMemCreate / cuMemMap / cuMemSetAccess / cuMemUnmap / cuMemRelease;
the cpu backend does the same with the OS (an mmap'd PROT_NONE range, memfd pages mapped in with MAP_FIXED); the sim
backend only does bookkeeping. The VMM allocator times each call (perf_counter_ns) and records it as an event.
"""

from __future__ import annotations

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
