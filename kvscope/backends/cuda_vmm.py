"""Real GPU pages for the VMM allocator: the CUDA driver's virtual memory management API through cuda-python.

reserve -> cuMemAddressReserve, create -> cuMemCreate (pinned device memory), map -> cuMemMap, set_access ->
cuMemSetAccess (read/write for this device), unmap -> cuMemUnmap, release -> cuMemRelease, free_reservation ->
cuMemAddressFree. Everything lives in the device's *primary* context, the one torch uses, so torch ops, Triton
kernels and SDPA run on the mapped addresses (wrap them with `tensor_view`).

The driver API needs a current context on the calling thread; torch makes the primary context current only on the
threads it touches, so every call first binds it on its own thread (once per thread). That is what lets the VMM
allocator map pages from a background thread while the forward pass runs.

SimMemory's strict checks run before every driver call (no mapping over a mapping, no release of a mapped handle...),
its books show leaks (`live()`, `state()`), and `close()` gives back whatever its user forgot, unmapping before
releasing before freeing address space. `inject_fault` (SimMemory's, through base.FaultPlan) makes the k-th call of
any of the seven driver operations fail before it reaches the driver, to test the allocator's rollback.
"""

# This module is longer than 400 lines: every CUDA driver call it makes is wrapped, timed, made fault-injectable
# and undone on failure here, next to the books of what the driver holds, so that close() can give back exactly that.

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

from kvscope.backends.base import FAULT_OPS, BackendError, BackendOutOfMemory, BackendUnavailable, Fault
from kvscope.backends.sim import SimMemory
from kvscope.cudainfo import import_driver, result_name

# Driver results that mean "no memory left", as opposed to a bad call.
_OOM_RESULTS = frozenset({"CUDA_ERROR_OUT_OF_MEMORY"})
# Fault and FAULT_OPS live in backends.base now (every backend injects faults); still importable from here.
__all__ = ["DL_CPU", "DL_CUDA", "FAULT_OPS", "CudaArray", "CudaMemory", "Fault", "dlpack_capsule", "tensor_view"]


class CudaMemory(SimMemory):
    """PhysicalMemory over CUDA VMM on one device (default: torch's current device).

    The strict checks and live counts (`live_handles`, `live_mappings`, `live_reservations`, `calls`) come from
    SimMemory; the `_os_*` hooks below make the driver calls. `max_bytes` caps the physical bytes create() hands out
    (BackendOutOfMemory past it), so a run can be held to a KV budget smaller than the card.
    """

    name = "cuda"

    def __init__(self, device: int | None = None, *, max_bytes: int | None = None, driver: Any = None) -> None:
        self._driver = driver if driver is not None else _load_driver()
        d = self._driver
        _check_init(d)
        self.device = _pick_device(device)
        self._dev = _checked("cuDeviceGet", d.cuDeviceGet(self.device))
        # The primary context is the one torch's runtime uses; retaining it keeps it alive until close().
        self._ctx = _checked("cuDevicePrimaryCtxRetain", d.cuDevicePrimaryCtxRetain(self._dev))
        self._local = threading.local()
        self._bind()

        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device
        self._prop = prop
        flags = d.CUmemAllocationGranularity_flags
        minimum = _checked(
            "cuMemGetAllocationGranularity",
            d.cuMemGetAllocationGranularity(prop, flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
        )
        self.recommended_granularity = int(
            _checked(
                "cuMemGetAllocationGranularity",
                d.cuMemGetAllocationGranularity(prop, flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
            )
        )
        access = d.CUmemAccessDesc()
        access.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.device
        access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        super().__init__(int(minimum), max_bytes=max_bytes)
        # One lock around every operation: the allocator's background mapper and the engine thread both call in,
        # and SimMemory's books are plain dicts.
        self._lock = threading.RLock()
        self._ctx_held = True  # the primary context retained above, until close() releases it

    # ---- threads ----------------------------------------------------------------------------------------------
    def _bind(self) -> None:
        """Make the primary context current on the calling thread (once per thread)."""
        if getattr(self._local, "bound", False):
            return
        _checked("cuCtxSetCurrent", self._driver.cuCtxSetCurrent(self._ctx))
        self._local.bound = True

    def reserve(self, size: int) -> int:
        self._bind()
        with self._lock:
            return super().reserve(size)

    def free_reservation(self, va: int, size: int) -> None:
        self._bind()
        with self._lock:
            super().free_reservation(va, size)

    def create(self, size: int) -> Any:
        self._bind()
        with self._lock:
            return super().create(size)

    def map(self, va: int, size: int, handle: Any) -> None:
        self._bind()
        with self._lock:
            super().map(va, size, handle)

    def set_access(self, va: int, size: int) -> None:
        self._bind()
        with self._lock:
            super().set_access(va, size)

    def unmap(self, va: int, size: int) -> None:
        self._bind()
        with self._lock:
            super().unmap(va, size)

    def release(self, handle: Any) -> None:
        self._bind()
        with self._lock:
            super().release(handle)

    def inject_fault(self, op: str, nth: int = 1, *, oom: bool | None = None) -> Fault:
        """SimMemory.inject_fault, under the lock: the background mapper may be calling in meanwhile."""
        with self._lock:
            return super().inject_fault(op, nth, oom=oom)

    def driver_mapping(self, va: int) -> tuple[int, bool] | None:
        """What the driver itself has mapped at `va`: (handle, read-write for this device), or None where nothing
        is (cuMemRetainAllocationHandle, whose extra reference is dropped again; cuMemGetAccess). The driver's own
        view, independent of the books, for tests to hold the books against."""
        self._bind()
        d = self._driver
        err, handle = d.cuMemRetainAllocationHandle(va)
        if int(err) != 0:
            return None
        _checked("cuMemRelease", d.cuMemRelease(handle))
        flags = _checked("cuMemGetAccess", d.cuMemGetAccess(self._access[0].location, va))
        return int(handle), int(flags) == int(d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE)

    # ---- driver hooks (called by SimMemory after its checks, under the lock) ----------------------------------
    def _timed(self, what: str, ret_fn: Any, *args: Any) -> Any:
        """Call the driver, charge its time to the calling thread (see `take_thread_driver_ns`), check the result."""
        t0 = time.perf_counter_ns()
        ret = ret_fn(*args)
        local = self._local
        local.driver_ns = getattr(local, "driver_ns", 0) + time.perf_counter_ns() - t0
        return _checked(what, ret)

    def take_thread_driver_ns(self) -> int:
        """Nanoseconds the calling thread spent in VMM driver calls since it last asked (then reset to 0). The cuda
        executor uses it to split mapping time into on the critical path (engine thread) and off it (mapper)."""
        local = self._local
        ns = getattr(local, "driver_ns", 0)
        local.driver_ns = 0
        return ns

    def _os_reserve(self, size: int) -> int:
        d = self._driver
        return int(self._timed("cuMemAddressReserve", d.cuMemAddressReserve, size, self.granularity, 0, 0))

    def _os_free_reservation(self, va: int, size: int) -> None:
        self._timed("cuMemAddressFree", self._driver.cuMemAddressFree, va, size)

    def _os_create(self, size: int) -> int:
        return int(self._timed("cuMemCreate", self._driver.cuMemCreate, size, self._prop, 0))

    def _os_map(self, va: int, size: int, handle: Any) -> None:
        self._timed("cuMemMap", self._driver.cuMemMap, va, size, 0, handle, 0)

    def _os_set_access(self, va: int, size: int) -> None:
        self._timed("cuMemSetAccess", self._driver.cuMemSetAccess, va, size, self._access, 1)

    def _os_unmap(self, va: int, size: int) -> None:
        self._timed("cuMemUnmap", self._driver.cuMemUnmap, va, size)

    def _os_release(self, handle: Any, size: int) -> None:
        self._timed("cuMemRelease", self._driver.cuMemRelease, handle)

    # ---- teardown -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Give back whatever is still held (mappings, then handles, then reservations), then drop the context.
        The books drop each thing once the driver gave it back, so a failure raises BackendError with the rest still
        on the books and a second close() retries only that; once everything is back it is a no-op. Injected faults
        do not apply here (this is the teardown of last resort). `leaked` says what the user left behind."""
        if self._closed and not self._ctx_held:
            return
        self._bind()
        with self._lock:
            if not self._closed:
                self.leaked = self.live()
                self._closed = True
                self.faults.clear()
            errors = self._give_back_all()
            if not errors and self._ctx_held:
                errors += _quiet("cuDevicePrimaryCtxRelease", self._driver.cuDevicePrimaryCtxRelease(self._dev))
                self._ctx_held = bool(errors)
        if errors:
            raise BackendError("cuda backend: close: " + "; ".join(errors))

    def _give_back_all(self) -> list[str]:
        """Unmap, release, free (in that order: the driver refuses the others while something is mapped); what
        fails stays on the books. Returns the failures."""
        d = self._driver
        errors: list[str] = []
        for va, (size, _handle, _rw) in list(self._maps.items()):
            failed = _quiet("cuMemUnmap", d.cuMemUnmap(va, size))
            if not failed:
                self._forget_mapping(va)
            errors += failed
        for handle in [h for h in self._handles if not self._handle_maps[h]]:
            failed = _quiet("cuMemRelease", d.cuMemRelease(handle))
            if not failed:
                self._forget_handle(handle)
            errors += failed
        for va, size in [(va, size) for va, size in self._res_size.items() if not self._res_maps[va]]:
            failed = _quiet("cuMemAddressFree", d.cuMemAddressFree(va, size))
            if not failed:
                self._forget_reservation(va)
            errors += failed
        return errors

    def synchronize(self) -> None:
        """Wait for all work in the primary context (before unmapping memory a kernel may still read)."""
        self._bind()
        _checked("cuCtxSynchronize", self._driver.cuCtxSynchronize())

    def __enter__(self) -> CudaMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- driver plumbing ------------------------------------------------------------------------------------------


def _checked(what: str, ret: Any) -> Any:
    """Check a cuda-python return tuple (err, *values); return the value (None when there is none).
    OOM results raise BackendOutOfMemory, every other failure BackendError naming the CUresult."""
    err = ret[0] if isinstance(ret, tuple) else ret
    if int(err) != 0:
        name = result_name(err)
        message = f"cuda backend: {what} failed: {name}"
        if name in _OOM_RESULTS:
            raise BackendOutOfMemory(message)
        raise BackendError(message)
    if isinstance(ret, tuple) and len(ret) > 1:
        return ret[1] if len(ret) == 2 else ret[1:]
    return None


def _quiet(what: str, ret: Any) -> list[str]:
    err = ret[0] if isinstance(ret, tuple) else ret
    return [] if int(err) == 0 else [f"{what}: {result_name(err)}"]


def _check_init(d: Any) -> None:
    try:
        (err,) = d.cuInit(0)
    except RuntimeError:
        # cuda.pathfinder raises (DynamicLibNotFoundError) when libcuda.so is nowhere: a CPU-only machine.
        raise BackendUnavailable("cuda backend: no NVIDIA driver on this machine (libcuda not found)") from None
    if int(err) != 0:
        raise BackendUnavailable(f"cuda backend: no usable CUDA device (cuInit: {result_name(err)})")


def _pick_device(device: int | None) -> int:
    """torch's current device by default, after making sure torch has created its primary context."""
    try:
        import torch
    except ImportError:
        return device or 0
    if not torch.cuda.is_available():
        if device is not None:
            return device  # a driver without a CUDA torch: the backend still works, tensor views do not
        raise BackendUnavailable(f"cuda backend: torch {torch.__version__} cannot use CUDA (a CPU-only build?)")
    torch.cuda.init()
    index = torch.cuda.current_device() if device is None else device
    # The runtime creates its primary context on first use; make sure that has happened before we retain it.
    torch.cuda.synchronize(index)
    return index


def _load_driver() -> Any:
    try:
        return import_driver()
    except ImportError:
        raise BackendUnavailable("cuda backend: cuda-python is not installed (pip install cuda-python)") from None


# ---- tensors over VMM memory -----------------------------------------------------------------------------------
#
# torch.as_tensor(obj with __cuda_array_interface__) asks the driver which device owns the pointer
# (cudaPointerGetAttributes), and the driver calls an address with nothing mapped at it host memory: a VMM buffer,
# whose pages are mapped only as sequences grow, cannot be wrapped that way before its first page is mapped. A DLPack
# capsule names the device itself, so torch.from_dlpack takes any address, mapped or not; that is what tensor_view
# builds. The capsule's structs are plain ctypes (DLPack is a C ABI; see dlpack.h, DLManagedTensor).


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.CFUNCTYPE(None, ctypes.c_void_p)),  # left NULL: the memory is the allocator's
    ]


DL_CPU, DL_CUDA = 1, 2  # DLDeviceType
_DL_DTYPES = {  # torch dtype name -> (DLDataTypeCode, bits): kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4
    "bfloat16": (4, 16),
    "float16": (2, 16),
    "float32": (2, 32),
    "float64": (2, 64),
    "int8": (0, 8),
    "uint8": (1, 8),
    "int16": (0, 16),
    "int32": (0, 32),
    "int64": (0, 64),
}
_CAPSULE_NAME = ctypes.create_string_buffer(b"dltensor")  # PyCapsule keeps the pointer, not a copy
# torch reads a DLManagedTensor's deleter field when the tensor dies, so each struct (~100 bytes) must outlive its
# tensors: they are kept for the life of the process (a handful per run: one per VMM buffer).
_KEEPALIVE: list[Any] = []
_keepalive_lock = threading.Lock()


def _capsule_new() -> Any:
    fn = ctypes.pythonapi.PyCapsule_New
    fn.restype = ctypes.py_object
    fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return fn


def dlpack_capsule(address: int, shape: tuple[int, ...], dtype: Any, device_type: int, device_id: int) -> Any:
    """A legacy ("dltensor") DLPack capsule describing a C-contiguous array at `address` (no ownership)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DL_DTYPES:
        raise ValueError(f"tensor_view: unsupported dtype {dtype!r}")
    code, bits = _DL_DTYPES[name]
    ndim = len(shape)
    dims = (ctypes.c_int64 * max(ndim, 1))(*shape)
    strides = (ctypes.c_int64 * max(ndim, 1))()
    step = 1
    for i in range(ndim - 1, -1, -1):
        strides[i] = step
        step *= int(shape[i])
    managed = _DLManagedTensor()
    t = managed.dl_tensor
    t.data = address
    t.device = _DLDevice(device_type, device_id)
    t.ndim = ndim
    t.dtype = _DLDataType(code, bits, 1)
    t.shape = ctypes.cast(dims, ctypes.POINTER(ctypes.c_int64))
    t.strides = ctypes.cast(strides, ctypes.POINTER(ctypes.c_int64))
    t.byte_offset = 0
    with _keepalive_lock:
        _KEEPALIVE.append((managed, dims, strides))
    return _capsule_new()(ctypes.addressof(managed), ctypes.cast(_CAPSULE_NAME, ctypes.c_char_p), None)


class CudaArray:
    """A device address range described by __cuda_array_interface__ (v3), for CuPy / Numba / torch.as_tensor on
    mapped memory. `owner` is kept alive for as long as any array made from this object lives."""

    def __init__(self, address: int, shape: tuple[int, ...], typestr: str, owner: Any = None) -> None:
        self.address = int(address)
        self.shape = tuple(int(s) for s in shape)
        self.typestr = typestr
        self.owner = owner

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        # No "stream": the consumer does not synchronize; the memory is ready whenever it is mapped.
        return {"shape": self.shape, "typestr": self.typestr, "data": (self.address, False), "version": 3}


def tensor_view(address: int, shape: tuple[int, ...], dtype: Any, *, owner: Any = None, device: int | None = None):
    """A torch tensor over `prod(shape)` elements at device address `address` (a VMM buffer), no copy:
    `tensor_view(va, (rows, heads, dim), torch.bfloat16).data_ptr() == va`, whether or not pages are mapped yet.
    Only mapped parts may be touched. `device`: the CUDA device (default: `owner.backend.device`, or torch's current
    device); `owner` is only used to find the device (the tensor does not keep it alive)."""
    import torch

    if device is None:
        device = getattr(getattr(owner, "backend", None), "device", None)
    if device is None:
        device = torch.cuda.current_device()
    tensor = torch.from_dlpack(dlpack_capsule(address, shape, dtype, DL_CUDA, int(device)))
    if tensor.data_ptr() != address or tensor.dtype != dtype:
        raise BackendError(
            f"tensor_view: DLPack gave {tensor.dtype} at {tensor.data_ptr():#x}, not {dtype} at {address:#x}"
        )
    return tensor
