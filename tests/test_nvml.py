"""NVML sampler: the clean fallback without NVML, the sampling thread and its hand-over to the recorder (through a
fake pynvml with the real module's calling convention), and the real library on a GPU (@pytest.mark.gpu)."""

from __future__ import annotations

import sys
import threading
import types

import pytest

from kvscope.events import Kind
from kvscope.nvml import MemorySample, NvmlSampler, NvmlUnavailable, emit_samples, nvml_available
from kvscope.recorder import Recorder

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False

MiB = 1 << 20


class FakeNvml(types.ModuleType):
    """pynvml's surface the sampler uses. `used` is what the device reports; `v2` False behaves like a driver
    without nvmlDeviceGetMemoryInfo_v2 (NVMLError_FunctionNotFound)."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        def __str__(self) -> str:
            return "NVML Shared Library Not Found"

    nvmlMemory_v2 = 0x02000028

    def __init__(self, *, missing: bool = False, v2: bool = True) -> None:
        super().__init__("pynvml")
        self.missing = missing
        self.v2 = v2
        self.used = 1000 * MiB
        self.inits = 0
        self.shutdowns = 0
        self.calls = 0
        self.versions_seen: list[object] = []
        self.sampled = threading.Event()

    def nvmlInit(self) -> None:
        if self.missing:
            raise self.NVMLError_LibraryNotFound()
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        return ("bus", bus_id)

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("index", index)

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        self.versions_seen.append(version)
        if version is not None and not self.v2:
            raise self.NVMLError("Function Not Found")
        self.calls += 1
        if self.calls >= 3:
            self.sampled.set()
        return types.SimpleNamespace(used=self.used, total=80 * 1024 * MiB, free=0)


@pytest.fixture
def fake_nvml(monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def kinds_and_bytes(recorder: Recorder) -> list[tuple[str, int]]:
    table = recorder.to_table().to_pydict()
    return [(k, b) for k, b in zip(table["kind"], table["bytes"], strict=True) if k != "run_end"]


# ---- no NVML ---------------------------------------------------------------------------------------------------


def test_missing_library_is_one_line_and_try_start_returns_none(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(missing=True))
    with pytest.raises(NvmlUnavailable) as err:
        NvmlSampler(0)
    assert "\n" not in str(err.value) and "NVML Shared Library Not Found" in str(err.value)
    assert NvmlSampler.try_start(0) is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvscope: NVML unavailable")
    ok, reason = nvml_available()
    assert not ok and "\n" not in reason


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU (and likely NVML)")
def test_real_cpu_machine_falls_back_cleanly(capsys):
    ok, reason = nvml_available()
    assert not ok and reason.startswith("NVML unavailable") and "\n" not in reason
    assert NvmlSampler.try_start(0) is None
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_bad_interval_is_a_value_error(fake_nvml):
    with pytest.raises(ValueError, match="interval_s"):
        NvmlSampler(0, interval_s=0)


# ---- sampling and draining (fake NVML) ----------------------------------------------------------------------------


def test_thread_samples_and_drain_emits_nvml_events(fake_nvml):
    recorder = Recorder()
    sampler = NvmlSampler(0, interval_s=0.001, clock=recorder.now_ns, sample_torch=False)
    with sampler:
        assert fake_nvml.sampled.wait(timeout=30), "the sampler thread never sampled"
        assert sampler.running
    assert not sampler.running and fake_nvml.shutdowns == 1 == fake_nvml.inits
    n = sampler.drain(recorder)
    assert n >= 3
    events = kinds_and_bytes(recorder)
    assert events == [("mem_nvml", 1000 * MiB)] * n  # torch not sampled: no mem_torch rows
    assert sampler.drain(recorder) == 0  # drained means empty
    assert fake_nvml.versions_seen[0] == FakeNvml.nvmlMemory_v2  # the v2 struct first (used == nvidia-smi)


def test_samples_are_ordered_and_carry_their_own_time(fake_nvml):
    ticks = iter(range(100, 10_000, 100))
    sampler = NvmlSampler(0, clock=lambda: next(ticks), sample_torch=False)
    fake_nvml.used = 5 * MiB
    sampler.sample()
    fake_nvml.used = 7 * MiB
    sampler.sample()
    samples = sampler.take()
    assert [(s.t_ns, s.nvml_used) for s in samples] == [(100, 5 * MiB), (200, 7 * MiB)]
    sampler.stop()


def test_falls_back_to_v1_when_the_driver_lacks_v2(monkeypatch):
    fake = FakeNvml(v2=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    sampler = NvmlSampler(0, sample_torch=False)
    assert sampler.used_bytes() == 1000 * MiB
    assert sampler.used_bytes() == 1000 * MiB
    assert fake.versions_seen == [FakeNvml.nvmlMemory_v2, None, None]  # v2 tried once only
    sampler.stop()


def test_bounded_queue_counts_what_it_drops(fake_nvml):
    sampler = NvmlSampler(0, sample_torch=False, max_samples=2)
    for _ in range(5):
        sampler.sample()
    assert len(sampler.take()) == 2 and sampler.dropped == 3
    sampler.stop()


def test_emit_samples_uses_emit_at_when_the_recorder_has_it():
    seen: list[tuple] = []

    class TimedRecorder:
        def emit_at(self, t_ns, kind, **cols):
            seen.append((t_ns, Kind(kind), cols["bytes"]))

        def emit(self, *a, **k):  # pragma: no cover - must not be used
            raise AssertionError("emit used although emit_at exists")

    emit_samples(TimedRecorder(), [MemorySample(42, 10, 100, 7), MemorySample(43, 11, 100, -1)])
    assert seen == [(42, Kind.MEM_NVML, 10), (42, Kind.MEM_TORCH, 7), (43, Kind.MEM_NVML, 11)]


def test_emit_samples_on_a_recorder_keep_the_sample_time():
    recorder = Recorder()
    emit_samples(recorder, [MemorySample(1, 10, 100, 7)])
    assert kinds_and_bytes(recorder) == [("mem_nvml", 10), ("mem_torch", 7)]
    assert recorder.to_table().column("t_ns").to_pylist() == [1, 1]


# ---- the real library --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_nvml_sees_cuda_vmm_pages_come_and_go():
    from kvscope.backends.cuda_vmm import CudaMemory

    sampler = NvmlSampler(torch.cuda.current_device(), sample_torch=True)
    mem = CudaMemory()
    page = mem.granularity
    count = 128  # 256 MiB at 2 MiB pages: far above any other process's churn on a test machine
    try:
        before = sampler.used_bytes()
        handles = [mem.create(page) for _ in range(count)]
        grown = sampler.used_bytes()
        for h in handles:
            mem.release(h)
        after = sampler.used_bytes()
        sample = sampler.sample()
    finally:
        mem.close()
        sampler.stop()
    assert grown - before >= 0.9 * count * page
    assert grown - after >= 0.9 * count * page
    assert sample.torch_reserved >= 0 and sample.nvml_total > sample.nvml_used > 0
