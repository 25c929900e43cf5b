"""The cuda VMM backend: the no-driver path and the driver plumbing on any machine (through a fake driver that keeps
cuda-python's real structs, enums and calling convention), the real driver calls on a GPU (@pytest.mark.gpu)."""

from __future__ import annotations

import threading

import pytest

from kvscope.backends.base import BackendError, BackendOutOfMemory, BackendUnavailable, PhysicalMemory
from kvscope.cudainfo import probe, require_cuda

cuda_driver = pytest.importorskip("cuda.bindings.driver", reason="cuda-python (a kvscope dependency) is missing")
from kvscope.backends.cuda_vmm import CudaArray, CudaMemory  # noqa: E402

MiB = 1 << 20
PAGE = 2 * MiB
R = cuda_driver.CUresult
HAS_DRIVER = probe().available


class FakeDriver:
    """cuda-python's driver module, minus the GPU: same return tuples, same argument types, the same refusals a real
    driver makes for the VMM calls (mapping over a mapping, freeing address space that still has mappings...).
    `results` forces a CUresult for the next call of a function name."""

    def __init__(self, *, physical_pages: int = 64, init_error: R | None = None, init_raises: bool = False) -> None:
        # The real module's types: the backend must build its structs exactly as cuda-python wants them.
        for name in (
            "CUresult",
            "CUmemAllocationProp",
            "CUmemAccessDesc",
            "CUmemAllocationType",
            "CUmemLocationType",
            "CUmemAccess_flags",
            "CUmemAllocationGranularity_flags",
        ):
            setattr(self, name, getattr(cuda_driver, name))
        self.physical_pages = physical_pages
        self.init_error = init_error
        self.init_raises = init_raises
        self.results: dict[str, R] = {}
        self.log: list[str] = []
        self.bound_threads: set[int] = set()
        self.ctx_refs = 0
        self.reservations: dict[int, int] = {}
        self.handles: dict[int, int] = {}
        self.maps: dict[int, tuple[int, int]] = {}
        self.access: dict[int, object] = {}
        self._next_va = 1 << 40
        self._next_handle = 100

    def _result(self, fn: str) -> R:
        self.log.append(fn)
        return self.results.pop(fn, R.CUDA_SUCCESS)

    def cuInit(self, flags):
        if self.init_raises:
            raise RuntimeError('"cuda" is an NVIDIA driver library and can only be found via system search.')
        return (self.init_error or R.CUDA_SUCCESS,)

    def cuDeviceGet(self, ordinal):
        return (self._result("cuDeviceGet"), ordinal)

    def cuDevicePrimaryCtxRetain(self, dev):
        self.ctx_refs += 1
        return (self._result("cuDevicePrimaryCtxRetain"), "primary-ctx")

    def cuDevicePrimaryCtxRelease(self, dev):
        self.ctx_refs -= 1
        return (self._result("cuDevicePrimaryCtxRelease"),)

    def cuCtxSetCurrent(self, ctx):
        assert ctx == "primary-ctx"
        self.bound_threads.add(threading.get_ident())
        return (self._result("cuCtxSetCurrent"),)

    def cuCtxSynchronize(self):
        return (self._result("cuCtxSynchronize"),)

    def _on_bound_thread(self) -> None:
        # A real driver answers CUDA_ERROR_INVALID_CONTEXT on a thread with no current context.
        assert threading.get_ident() in self.bound_threads, "driver called on a thread with no current context"

    def cuMemGetAllocationGranularity(self, prop, option):
        assert isinstance(prop, cuda_driver.CUmemAllocationProp)
        assert prop.type == cuda_driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        assert prop.location.type == cuda_driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        return (self._result("cuMemGetAllocationGranularity"), PAGE)

    def cuMemAddressReserve(self, size, alignment, addr, flags):
        self._on_bound_thread()
        err = self._result("cuMemAddressReserve")
        if err != R.CUDA_SUCCESS:
            return (err, cuda_driver.CUdeviceptr(0))
        va = self._next_va
        self._next_va += size + PAGE
        self.reservations[va] = size
        return (err, cuda_driver.CUdeviceptr(va))

    def cuMemAddressFree(self, ptr, size):
        self._on_bound_thread()
        va = int(ptr)
        if self.reservations.get(va) != size or any(va <= m < va + size for m in self.maps):
            return (R.CUDA_ERROR_INVALID_VALUE,)
        err = self._result("cuMemAddressFree")
        if err == R.CUDA_SUCCESS:
            del self.reservations[va]
        return (err,)

    def cuMemCreate(self, size, prop, flags):
        self._on_bound_thread()
        err = self._result("cuMemCreate")
        if err == R.CUDA_SUCCESS and sum(self.handles.values()) + size > self.physical_pages * PAGE:
            err = R.CUDA_ERROR_OUT_OF_MEMORY
        if err != R.CUDA_SUCCESS:
            return (err, cuda_driver.CUmemGenericAllocationHandle(0))
        self._next_handle += 1
        self.handles[self._next_handle] = size
        return (err, cuda_driver.CUmemGenericAllocationHandle(self._next_handle))

    def cuMemRelease(self, handle):
        self._on_bound_thread()
        if int(handle) not in self.handles:
            return (R.CUDA_ERROR_INVALID_VALUE,)
        err = self._result("cuMemRelease")
        if err == R.CUDA_SUCCESS:
            del self.handles[int(handle)]
        return (err,)

    def cuMemMap(self, ptr, size, offset, handle, flags):
        self._on_bound_thread()
        va = int(ptr)
        if int(handle) not in self.handles or va in self.maps:
            return (R.CUDA_ERROR_INVALID_VALUE,)
        err = self._result("cuMemMap")
        if err == R.CUDA_SUCCESS:
            self.maps[va] = (size, int(handle))
        return (err,)

    def cuMemSetAccess(self, ptr, size, desc, count):
        self._on_bound_thread()
        assert count == 1 and desc[0].flags == cuda_driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        if int(ptr) not in self.maps:
            return (R.CUDA_ERROR_INVALID_VALUE,)
        err = self._result("cuMemSetAccess")
        if err == R.CUDA_SUCCESS:
            self.access[int(ptr)] = desc[0]
        return (err,)

    def cuMemUnmap(self, ptr, size):
        self._on_bound_thread()
        if int(ptr) not in self.maps:
            return (R.CUDA_ERROR_INVALID_VALUE,)
        err = self._result("cuMemUnmap")
        if err == R.CUDA_SUCCESS:
            del self.maps[int(ptr)]
            self.access.pop(int(ptr), None)
        return (err,)


def fake_memory(**kwargs) -> tuple[CudaMemory, FakeDriver]:
    driver = FakeDriver(**kwargs)
    return CudaMemory(0, driver=driver), driver


def map_page(mem: CudaMemory, va: int) -> int:
    handle = mem.create(PAGE)
    mem.map(va, PAGE, handle)
    mem.set_access(va, PAGE)
    return handle


# ---- no driver --------------------------------------------------------------------------------------------------


def test_no_driver_is_one_line_backend_unavailable():
    with pytest.raises(BackendUnavailable) as err:
        CudaMemory(0, driver=FakeDriver(init_raises=True))
    assert "\n" not in str(err.value)
    assert "no NVIDIA driver" in str(err.value)


def test_no_device_names_the_cuinit_result():
    with pytest.raises(BackendUnavailable, match="CUDA_ERROR_NO_DEVICE") as err:
        CudaMemory(0, driver=FakeDriver(init_error=R.CUDA_ERROR_NO_DEVICE))
    assert "\n" not in str(err.value)


@pytest.mark.skipif(HAS_DRIVER, reason="this machine has a usable CUDA driver")
def test_real_no_driver_machine_gives_one_line():
    info = probe()
    assert not info.available and info.reason and "\n" not in info.reason
    with pytest.raises(BackendUnavailable) as err:
        require_cuda()
    assert str(err.value) == info.reason
    with pytest.raises(BackendUnavailable) as err:
        CudaMemory()
    assert "\n" not in str(err.value)


# ---- driver plumbing (fake driver) -----------------------------------------------------------------------------


def test_follows_the_protocol_and_reads_the_granularity():
    mem, _ = fake_memory()
    assert isinstance(mem, PhysicalMemory)
    assert mem.name == "cuda" and mem.granularity == PAGE


def test_map_unmap_round_trip_reaches_the_driver_in_order():
    mem, drv = fake_memory()
    va = mem.reserve(8 * PAGE)
    handles = [map_page(mem, va + i * PAGE) for i in range(3)]
    assert set(drv.maps) == {va, va + PAGE, va + 2 * PAGE}
    assert set(drv.access) == set(drv.maps)
    assert mem.live() == {"reservations": 1, "handles": 3, "mappings": 3}
    for i, h in enumerate(handles):
        mem.unmap(va + i * PAGE, PAGE)
        mem.release(h)
    mem.free_reservation(va, 8 * PAGE)
    assert drv.maps == {} and drv.handles == {} and drv.reservations == {}
    assert mem.live() == {"reservations": 0, "handles": 0, "mappings": 0}
    mem.close()
    assert mem.leaked == {"reservations": 0, "handles": 0, "mappings": 0}
    assert drv.ctx_refs == 0


def test_driver_oom_becomes_backend_out_of_memory_and_changes_nothing():
    mem, drv = fake_memory(physical_pages=2)
    va = mem.reserve(4 * PAGE)
    map_page(mem, va)
    map_page(mem, va + PAGE)
    with pytest.raises(BackendOutOfMemory, match="cuMemCreate failed: CUDA_ERROR_OUT_OF_MEMORY"):
        mem.create(PAGE)
    assert mem.live_handles == 2 and len(drv.handles) == 2


def test_other_driver_errors_name_the_cuda_result():
    mem, drv = fake_memory()
    va = mem.reserve(2 * PAGE)
    handle = mem.create(PAGE)
    drv.results["cuMemMap"] = R.CUDA_ERROR_INVALID_DEVICE
    with pytest.raises(BackendError, match="cuMemMap failed: CUDA_ERROR_INVALID_DEVICE") as err:
        mem.map(va, PAGE, handle)
    assert not isinstance(err.value, BackendOutOfMemory)
    assert mem.live_mappings == 0
    mem.map(va, PAGE, handle)  # the books were left as they were: the same map now goes through
    assert mem.live_mappings == 1


def test_strict_checks_stop_bad_calls_before_the_driver():
    mem, drv = fake_memory()
    va = mem.reserve(2 * PAGE)
    handle = map_page(mem, va)
    calls_before = len(drv.log)
    with pytest.raises(BackendError, match="over the mapping"):
        mem.map(va, PAGE, mem.create(PAGE))
    with pytest.raises(BackendError, match="still mapped"):
        mem.release(handle)
    with pytest.raises(BackendError, match="multiple of"):
        mem.create(PAGE + 4096)
    assert drv.log[calls_before:] == ["cuMemCreate"]  # only the (legal) create reached the driver


def test_fault_injection_fails_the_kth_call_and_leaves_books_unchanged():
    mem, drv = fake_memory()
    va = mem.reserve(4 * PAGE)
    mem.inject_fault("map", nth=2)
    h0 = map_page(mem, va)
    h1 = mem.create(PAGE)
    with pytest.raises(BackendOutOfMemory, match="injected"):
        mem.map(va + PAGE, PAGE, h1)
    assert set(drv.maps) == {va} and mem.live_mappings == 1
    mem.map(va + PAGE, PAGE, h1)  # armed once: the next map goes through
    mem.inject_fault("create", nth=1, oom=False)
    with pytest.raises(BackendError) as err:
        mem.create(PAGE)
    assert not isinstance(err.value, BackendOutOfMemory)
    assert mem.live_handles == 2 == len(drv.handles)
    assert {h0, h1} == set(drv.handles)
    with pytest.raises(ValueError, match="unknown op"):
        mem.inject_fault("mmap")


def test_teardown_faults_are_backend_errors_that_change_nothing():
    mem, drv = fake_memory()
    va = mem.reserve(2 * PAGE)
    handle = map_page(mem, va)
    for op, call in (
        ("unmap", lambda: mem.unmap(va, PAGE)),
        ("release", lambda: mem.release(handle)),
        ("free_reservation", lambda: mem.free_reservation(va, 2 * PAGE)),
    ):
        before, driver_log = mem.state(), len(drv.log)
        mem.inject_fault(op)
        with pytest.raises(BackendError, match=f"{op} failed: injected") as err:
            call()
        assert not isinstance(err.value, BackendOutOfMemory)  # tearing down does not fail for lack of memory
        assert mem.state() == before and len(drv.log) == driver_log  # it never reached the driver
        call()  # the fault fired once: the same call now goes through
    assert mem.state().empty and drv.maps == drv.handles == drv.reservations == {}
    assert [f.op for f in mem.faults.fired] == ["unmap", "release", "free_reservation"]
    with pytest.raises(ValueError, match="unknown op"):
        mem.inject_fault("cuMemMap")


def test_close_after_a_driver_failure_raises_and_a_retry_gives_back_only_the_rest():
    mem, drv = fake_memory()
    va = mem.reserve(4 * PAGE)
    for i in range(2):
        map_page(mem, va + i * PAGE)
    mem.create(PAGE)  # created, never mapped
    drv.results["cuMemRelease"] = R.CUDA_ERROR_INVALID_VALUE  # the first release fails, once
    with pytest.raises(BackendError, match="cuMemRelease: CUDA_ERROR_INVALID_VALUE"):
        mem.close()
    assert mem.live() == {"reservations": 0, "handles": 1, "mappings": 0} and len(drv.handles) == 1
    assert drv.ctx_refs == 1  # the context stays until everything is back
    assert mem.leaked == {"reservations": 1, "handles": 3, "mappings": 2}
    mem.close()
    assert drv.handles == {} and drv.ctx_refs == 0
    assert drv.log.count("cuMemRelease") == 4  # three handles, the failed one twice: none released twice
    calls = len(drv.log)
    mem.close()  # done: a no-op
    assert len(drv.log) == calls


def test_every_thread_gets_the_primary_context_before_calling_the_driver():
    mem, drv = fake_memory()
    va = mem.reserve(16 * PAGE)
    errors: list[BaseException] = []
    all_alive = threading.Barrier(4)  # thread ids are reused once a thread ends: keep all four alive together

    def grow(first: int) -> None:
        try:
            all_alive.wait(timeout=30)
            for i in range(first, 16, 4):
                map_page(mem, va + i * PAGE)
            all_alive.wait(timeout=30)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=grow, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(drv.bound_threads) == 5  # the creating thread and the four growers
    assert mem.live_mappings == 16 == len(drv.maps)


def test_close_gives_back_what_was_left_in_the_right_order():
    mem, drv = fake_memory()
    va = mem.reserve(8 * PAGE)
    for i in range(3):
        map_page(mem, va + i * PAGE)
    mem.create(PAGE)  # created, never mapped
    mem.close()
    assert mem.leaked == {"reservations": 1, "handles": 4, "mappings": 3}
    assert drv.maps == {} and drv.handles == {} and drv.reservations == {}
    assert drv.ctx_refs == 0
    with pytest.raises(BackendError, match="closed"):
        mem.create(PAGE)
    mem.close()  # twice is fine


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64"])
def test_dlpack_capsule_views_memory_in_place(dtype):
    import numpy as np
    import torch

    from kvscope.backends.cuda_vmm import DL_CPU, dlpack_capsule

    torch_dtype = getattr(torch, dtype)
    raw = np.zeros(2 * 3 * 4 * 8, dtype=np.uint8)  # 8 bytes an element at most
    t = torch.from_dlpack(dlpack_capsule(raw.ctypes.data, (2, 3, 4), torch_dtype, DL_CPU, 0))
    assert t.data_ptr() == raw.ctypes.data and t.dtype == torch_dtype
    assert t.shape == (2, 3, 4) and t.stride() == (12, 4, 1)
    t[1, 2, 3] = 7
    flat = torch.from_numpy(raw[: t.numel() * t.element_size()]).view(torch_dtype)
    assert float(flat[23]) == 7 and float(flat.sum()) == 7  # the write landed in place, nowhere else


def test_cuda_array_interface_describes_the_range():
    arr = CudaArray(0x7F0000000000, (4, 2, 8), "<i2", owner="keep-me")
    cai = arr.__cuda_array_interface__
    assert cai == {"shape": (4, 2, 8), "typestr": "<i2", "data": (0x7F0000000000, False), "version": 3}
    assert arr.owner == "keep-me"


# ---- the real driver ---------------------------------------------------------------------------------------------


@pytest.fixture
def gpu_mem():
    mem = CudaMemory()
    yield mem
    mem.close()


@pytest.mark.gpu
def test_gpu_granularity_and_round_trip(gpu_mem):
    import torch

    from kvscope.backends.cuda_vmm import tensor_view

    assert gpu_mem.granularity == PAGE
    va = gpu_mem.reserve(4 * PAGE)
    handles = [map_page(gpu_mem, va + i * PAGE) for i in range(4)]
    t = tensor_view(va, (4 * PAGE // 2,), torch.bfloat16)
    assert t.data_ptr() == va and t.device.type == "cuda" and t.dtype == torch.bfloat16
    src = torch.randn(t.shape, device="cuda", dtype=torch.bfloat16)
    t.copy_(src)
    assert torch.equal(t, src)
    del t
    torch.cuda.synchronize()
    for i, h in enumerate(handles):
        gpu_mem.unmap(va + i * PAGE, PAGE)
        gpu_mem.release(h)
    gpu_mem.free_reservation(va, 4 * PAGE)
    assert gpu_mem.live() == {"reservations": 0, "handles": 0, "mappings": 0}


@pytest.mark.gpu
def test_gpu_tensor_view_before_anything_is_mapped(gpu_mem):
    """A VMM buffer is wrapped when the executor starts, before any sequence has mapped a page into it."""
    import torch

    from kvscope.backends.cuda_vmm import tensor_view

    va = gpu_mem.reserve(4 * PAGE)
    t = tensor_view(va, (4, PAGE // 2), torch.bfloat16)  # one row a page, nothing mapped yet
    assert t.data_ptr() == va and t.device == torch.device("cuda", gpu_mem.device)
    h = map_page(gpu_mem, va + PAGE)
    t[1].fill_(2.0)
    torch.cuda.synchronize()
    assert float(t[1].float().mean()) == 2.0
    del t
    gpu_mem.unmap(va + PAGE, PAGE)
    gpu_mem.release(h)
    gpu_mem.free_reservation(va, 4 * PAGE)


@pytest.mark.gpu
def test_gpu_one_handle_at_two_addresses_shares_bytes(gpu_mem):
    import torch

    from kvscope.backends.cuda_vmm import tensor_view

    va = gpu_mem.reserve(4 * PAGE)
    handle = gpu_mem.create(PAGE)
    for at in (va, va + 2 * PAGE):
        gpu_mem.map(at, PAGE, handle)
        gpu_mem.set_access(at, PAGE)
    a = tensor_view(va, (PAGE // 4,), torch.float32)
    b = tensor_view(va + 2 * PAGE, (PAGE // 4,), torch.float32)
    a.copy_(torch.randn_like(a))
    torch.cuda.synchronize()
    assert torch.equal(a, b)
    b.fill_(3.0)
    torch.cuda.synchronize()
    assert bool((a == 3.0).all())
    del a, b
    gpu_mem.unmap(va, PAGE)
    gpu_mem.unmap(va + 2 * PAGE, PAGE)
    gpu_mem.release(handle)
    gpu_mem.free_reservation(va, 4 * PAGE)


@pytest.mark.gpu
def test_gpu_fault_injection_rollback_and_no_leaks():
    mem = CudaMemory()
    va = mem.reserve(4 * PAGE)
    mem.inject_fault("map", nth=2)
    map_page(mem, va)
    h = mem.create(PAGE)
    with pytest.raises(BackendOutOfMemory):
        mem.map(va + PAGE, PAGE, h)
    assert mem.live() == {"reservations": 1, "handles": 2, "mappings": 1}
    mem.close()  # the real driver accepts the clean-up of everything left
    assert mem.leaked == {"reservations": 1, "handles": 2, "mappings": 1}


@pytest.mark.gpu
def test_gpu_driver_oom_is_backend_out_of_memory():
    import torch

    free, _ = torch.cuda.mem_get_info()
    mem = CudaMemory()
    try:
        with pytest.raises(BackendOutOfMemory, match="CUDA_ERROR_OUT_OF_MEMORY"):
            mem.create((free // PAGE + 64) * PAGE)  # more than the card has free
    finally:
        mem.close()
    assert mem.leaked["handles"] == 0


@pytest.mark.gpu
def test_gpu_background_thread_maps_into_the_same_context(gpu_mem):
    import torch

    from kvscope.backends.cuda_vmm import tensor_view

    va = gpu_mem.reserve(2 * PAGE)
    errors: list[BaseException] = []

    def grow() -> None:
        try:
            map_page(gpu_mem, va)
        except BaseException as e:  # surfaced below
            errors.append(e)

    worker = threading.Thread(target=grow)
    worker.start()
    worker.join()
    assert errors == [] and gpu_mem.live_mappings == 1
    t = tensor_view(va, (PAGE // 2,), torch.float16)
    t.fill_(1.5)
    assert float(t.float().sum()) == 1.5 * t.numel()


# ---- VMM page sharing (issue 11): one handle mapped at several addresses ---------------------------------------------
def _sharing_allocator(mem: CudaMemory, megacache: bool = False):
    import numpy as np

    from kvscope.alloc.vmm import VMMAllocator
    from kvscope.recorder import Recorder
    from kvscope.spec import get_spec

    spec = get_spec("llama-3-8b", 1)  # 2 per-layer buffers of 2 KiB rows: 1024 tokens a 2 MiB page
    alloc = VMMAllocator(spec, 8 * 2 * PAGE, Recorder(), backend=mem, max_batch=2, max_len=2048, megacache=megacache)
    alloc.admit(1, np.zeros(1500, np.int64), 2048)
    alloc.append(1, np.zeros(1500, np.int64))  # one full page and half of the next, in each buffer
    return alloc


def _places(alloc, seq: int, page: int) -> list[int]:
    """The address of a sequence's page `page` in every buffer."""
    return [base + alloc.slot_of(seq) * alloc.slot_bytes + page * alloc.page_size for base in alloc.buffer_addresses()]


def test_vmm_fork_maps_one_handle_at_two_addresses_and_copy_on_write_splits_the_half_page():
    """Through the fake driver (its own tables are the truth): the fork calls cuMemMap with the parent's handles at
    the child's addresses (no cuMemCreate, no copy); the child's first write into the shared half-full page maps a
    fresh handle there and queues a rows copy, and the full page keeps one handle at both addresses."""
    import numpy as np

    mem, drv = fake_memory(physical_pages=16)
    alloc = _sharing_allocator(mem)
    creates = drv.log.count("cuMemCreate")
    alloc.fork(1, 2)
    assert drv.log.count("cuMemCreate") == creates and alloc.pending_copies == []
    for page in range(2):
        for parent_va, child_va in zip(_places(alloc, 1, page), _places(alloc, 2, page), strict=True):
            assert drv.maps[parent_va][1] == drv.maps[child_va][1]
    assert len(drv.maps) == 8 and alloc.shared_pages() == 4
    alloc.append(2, np.zeros(1, np.int64))
    (copy,) = alloc.pending_copies
    assert (copy.src, copy.dst, copy.n) == (1024, alloc.rows_per_slot + 1024, 1500 - 1024)
    for parent_va, child_va in zip(_places(alloc, 1, 1), _places(alloc, 2, 1), strict=True):
        assert drv.maps[parent_va][1] != drv.maps[child_va][1] and child_va in drv.access
    for parent_va, child_va in zip(_places(alloc, 1, 0), _places(alloc, 2, 0), strict=True):
        assert drv.maps[parent_va][1] == drv.maps[child_va][1]
    state = frozenset((va, size, h, va in drv.access) for va, (size, h) in drv.maps.items())
    assert {(va, size, int(h), rw) for va, size, h, rw in alloc.backend_books().mappings} == state
    alloc.check_invariants()
    alloc.free(1)  # the pending copy reads the parent's rows: its slot stays mapped until the copy ran
    assert len(drv.maps) == 8
    alloc.pending_copies.clear()  # the executor ran it: the parent's slot is unmapped from its shared page up
    alloc.check_invariants()
    assert len(drv.maps) == 4 and all(va in drv.maps for va in _places(alloc, 2, 0))
    alloc.close()
    mem.close()
    assert drv.maps == {} and drv.handles == {} and drv.reservations == {} and drv.ctx_refs == 0


def test_cuda_executor_path_runs_beams_and_samples_on_shared_pages():
    """The cuda executor on CPU tensors (reference kernels, every attention call checked against attention on the
    same K/V), over host pages with forks and beams: shared pages, copies on write, the same scheduler."""
    import torch

    from kvscope.alloc.vmm import VMMAllocator
    from kvscope.backends.host import HostMemory
    from kvscope.engine.base import ExecutorOptions
    from kvscope.engine.cuda_executor import CudaExecutor
    from kvscope.engine.cuda_options import CudaOptions
    from kvscope.engine.engine import Engine
    from kvscope.engine.scheduler import SchedulerConfig
    from kvscope.recorder import Recorder
    from kvscope.spec import get_spec
    from kvscope.workload import Request

    spec = get_spec("tiny")
    torch.set_num_threads(1)
    recorder = Recorder()
    backend = HostMemory()
    alloc = VMMAllocator(spec, 600 * spec.bytes_per_token, recorder, backend=backend, max_batch=8, max_len=128,
                         page_size=4096)  # fmt: skip
    ex = CudaExecutor(spec, alloc, ExecutorOptions(cuda=CudaOptions(kernels="reference", check=True)), device="cpu")
    reqs = [Request("a", 0.0, 40, 6, n=3), Request("b", 0.0, 20, 8, beam=3)]
    stats = Engine(reqs, alloc, ex, recorder, spec, SchedulerConfig(max_len=128, max_batch=8)).run()
    ex.close()
    alloc.close()
    backend.close()
    names = recorder.to_table().column("kind").to_pylist()
    assert stats.finished_requests == 2 and names.count("prune") > 0 and names.count("page_cow") > 0
    assert ex.max_check_error < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("megacache", [False, True], ids=["per-layer", "megacache"])
def test_gpu_vmm_fork_aliases_device_pages_and_copy_on_write_splits_them(gpu_mem, megacache):
    """On the GPU: the driver itself reports one handle at the parent's and the child's address; bytes written
    through one are read through the other; after the copy-on-write (its copy applied as the executor does) the
    split page holds its own bytes and the full page stays aliased."""
    import numpy as np
    import torch

    from kvscope.backends.cuda_vmm import tensor_view

    alloc = _sharing_allocator(gpu_mem, megacache)
    rows = alloc.max_batch * alloc.rows_per_slot
    width = alloc.buffer_row_bytes // 2  # bf16 elements of a row
    bufs = [tensor_view(va, (rows, width), torch.bfloat16, device=gpu_mem.device) for va in alloc.buffer_addresses()]
    base1 = alloc.token_base(1)
    data = torch.randn(1500, width, device="cuda", dtype=torch.bfloat16)
    for buf in bufs:
        buf[base1 : base1 + 1500] = data
    alloc.fork(1, 2)
    base2 = alloc.token_base(2)
    tpp = alloc.tokens_per_page
    full = 1500 // tpp  # pages the 1500 tokens fill
    for page in range(-(-1500 // tpp)):
        for parent_va, child_va in zip(_places(alloc, 1, page), _places(alloc, 2, page), strict=True):
            assert gpu_mem.driver_mapping(parent_va)[0] == gpu_mem.driver_mapping(child_va)[0]
    torch.cuda.synchronize()
    for buf in bufs:
        assert torch.equal(buf[base2 : base2 + 1500], data)
    bufs[0][base2 + 3] = 7.0  # through the child's address: the parent reads it
    torch.cuda.synchronize()
    assert bool((bufs[0][base1 + 3] == 7.0).all())
    alloc.append(2, np.zeros(1, np.int64))
    for c in alloc.pending_copies:
        for buf in bufs:
            buf[c.dst : c.dst + c.n] = buf[c.src : c.src + c.n]
    alloc.pending_copies.clear()
    torch.cuda.synchronize()
    split = full * tpp + 1  # a row of the page the child copied
    if split < 1500:
        bufs[0][base2 + split] = -5.0
        torch.cuda.synchronize()
        assert not bool((bufs[0][base1 + split] == -5.0).any())
        assert torch.equal(bufs[-1][base2 + split + 1], data[split + 1])  # the copy brought the rest over
    if full:
        bufs[-1][base1] = 3.0  # a full page: still one page at both addresses
        torch.cuda.synchronize()
        assert bool((bufs[-1][base2] == 3.0).all())
    alloc.check_invariants()
    del bufs
    torch.cuda.synchronize()
    alloc.close()
    assert gpu_mem.live() == {"reservations": 0, "handles": 0, "mappings": 0}


@pytest.mark.gpu
@pytest.mark.parametrize("megacache", [False, True], ids=["per-layer", "megacache"])
def test_gpu_beams_and_samples_on_shared_pages_attend_correctly(megacache):
    """The cuda executor on CUDA VMM pages shared by forks and beams (Triton kernels, every attention call checked
    against reference attention on the same memory), then a clean teardown."""
    from kvscope.alloc.vmm import VMMAllocator
    from kvscope.engine.base import ExecutorOptions
    from kvscope.engine.cuda_executor import CudaExecutor
    from kvscope.engine.cuda_options import CudaOptions
    from kvscope.engine.engine import Engine
    from kvscope.engine.scheduler import SchedulerConfig
    from kvscope.recorder import Recorder
    from kvscope.spec import get_spec
    from kvscope.workload import Request

    spec = get_spec("llama-3-8b", 2)
    recorder = Recorder()
    mem = CudaMemory()
    alloc = VMMAllocator(spec, 256 << 20, recorder, backend=mem, max_batch=16, max_len=512, megacache=megacache)
    ex = CudaExecutor(spec, alloc, ExecutorOptions(cuda=CudaOptions(check=True)))
    reqs = [Request("a", 0.0, 300, 40, n=4), Request("b", 0.0, 150, 60, beam=4), Request("c", 0.0, 90, 30)]
    stats = Engine(reqs, alloc, ex, recorder, spec, SchedulerConfig(max_len=512, max_batch=16)).run()
    ex.close()
    alloc.close()
    mem.close()
    names = recorder.to_table().column("kind").to_pylist()
    assert stats.finished_requests == 3 and names.count("prune") > 0 and names.count("page_cow") > 0
    assert ex.max_check_error < 2e-2
    assert mem.leaked == {"reservations": 0, "handles": 0, "mappings": 0}
