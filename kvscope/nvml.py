"""Device memory as the driver sees it (NVML, what nvidia-smi prints) next to torch's reserved bytes, sampled on a
background thread while the engine runs, so a trace can set the allocator's own books against the real GPU.

Threading: the Recorder is not thread-safe, so the sampler thread never touches it. Samples go into a bounded deque
(appends and pops are atomic in CPython) and the engine thread moves them into the trace with `drain(recorder)` at
the end of each step. Each sample carries the time it was taken, on the recorder's clock; when the recorder offers
`emit_at(t_ns, kind, ...)` the event keeps that time, otherwise it is stamped when drained (at most one step late).

Without NVML (a CPU-only machine: NVMLError_LibraryNotFound) `NvmlSampler` raises NvmlUnavailable with one line, and
`NvmlSampler.try_start` returns None after printing that line once.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvscope.events import Kind


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here; str() is one line for the user."""


@dataclass(frozen=True)
class MemorySample:
    t_ns: int  # on the clock given to the sampler (the recorder's, normally)
    nvml_used: int  # bytes in use on the device, all processes (nvmlDeviceGetMemoryInfo, v2 struct)
    nvml_total: int
    torch_reserved: int  # torch.cuda.memory_reserved(device); -1 when torch is not sampled


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("NVML unavailable: nvidia-ml-py is not installed (pip install nvidia-ml-py)") from None
    return pynvml


def _nvml_error_text(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _handle_for(pynvml: Any, device: int) -> Any:
    """NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES; the PCI bus id names the same GPU as CUDA's index."""
    from kvscope.cudainfo import probe

    info = probe()
    if info.available and device < len(info.devices):
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(info.devices[device].pci_bus_id)
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device)


class NvmlSampler:
    """Samples one device's memory every `interval_s` on a daemon thread (start/stop, or use as a context manager)."""

    def __init__(
        self,
        device: int = 0,
        *,
        interval_s: float = 0.05,
        clock: Callable[[], int] | None = None,
        sample_torch: bool = True,
        max_samples: int = 1 << 16,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"NvmlSampler: interval_s must be positive, got {interval_s}")
        pynvml = _import_pynvml()
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise NvmlUnavailable(f"NVML unavailable ({_nvml_error_text(e)}): no GPU memory samples") from None
        try:
            self._handle = _handle_for(pynvml, device)
        except pynvml.NVMLError as e:
            pynvml.nvmlShutdown()
            raise NvmlUnavailable(f"NVML unavailable for device {device} ({_nvml_error_text(e)})") from None
        self._nvml = pynvml
        self.device = device
        self.interval_s = interval_s
        self.clock = clock or time.perf_counter_ns
        self._torch_reserved = _torch_reserved_reader(device) if sample_torch else None
        self._v2 = True  # the v2 struct makes `used` match nvidia-smi (v1 also counts driver-reserved memory)
        self._samples: deque[MemorySample] = deque(maxlen=max_samples)
        self.dropped = 0  # samples lost because nobody drained for max_samples intervals
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shut = False

    @classmethod
    def try_start(cls, device: int = 0, *, quiet: bool = False, **kwargs: Any) -> NvmlSampler | None:
        """A running sampler, or None with one line on stderr saying why there are no NVML samples."""
        try:
            return cls(device, **kwargs).start()
        except NvmlUnavailable as e:
            if not quiet:
                print(f"kvscope: {e}", file=sys.stderr)
            return None

    # ---- sampling ---------------------------------------------------------------------------------------------
    def memory_info(self) -> tuple[int, int]:
        """(used, total) bytes of the device right now (~10 us)."""
        nvml = self._nvml
        if self._v2:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(self._handle, version=nvml.nvmlMemory_v2)
                return int(info.used), int(info.total)
            except (nvml.NVMLError, AttributeError, TypeError):
                self._v2 = False  # an older driver or binding: v1 it is
        info = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        return int(info.used), int(info.total)

    def used_bytes(self) -> int:
        return self.memory_info()[0]

    def sample(self) -> MemorySample:
        """Take one sample now and queue it (callable from any thread)."""
        t = self.clock()
        used, total = self.memory_info()
        reserved = self._torch_reserved() if self._torch_reserved is not None else -1
        s = MemorySample(t, used, total, reserved)
        if len(self._samples) == self._samples.maxlen:
            self.dropped += 1
        self._samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as e:  # a sampler must never take the run down; say so once and stop sampling
                print(f"kvscope: NVML sampling stopped: {e}", file=sys.stderr)
                return
            self._stop.wait(self.interval_s)

    def start(self) -> NvmlSampler:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kvscope-nvml", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (one last sample is taken) and shut NVML down. Safe to call twice."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
        if not self._shut:
            self._shut = True
            self._nvml.nvmlShutdown()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- into the trace (engine thread only) ------------------------------------------------------------------
    def take(self) -> list[MemorySample]:
        """All queued samples, oldest first; the queue is emptied."""
        out = []
        while self._samples:
            out.append(self._samples.popleft())
        return out

    def drain(self, recorder: Any) -> int:
        """Emit the queued samples as MEM_NVML (+ MEM_TORCH) events; call from the thread that owns the recorder."""
        samples = self.take()
        emit_samples(recorder, samples)
        return len(samples)

    def __enter__(self) -> NvmlSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def emit_samples(recorder: Any, samples: list[MemorySample]) -> None:
    """MEM_NVML bytes=used (and MEM_TORCH bytes=reserved) per sample, at the time the sample was taken."""
    emit_at = recorder.emit_at
    for s in samples:
        emit_at(s.t_ns, Kind.MEM_NVML, bytes=s.nvml_used)
        if s.torch_reserved >= 0:
            emit_at(s.t_ns, Kind.MEM_TORCH, bytes=s.torch_reserved)


def _torch_reserved_reader(device: int) -> Callable[[], int] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return lambda: int(torch.cuda.memory_reserved(device))


def nvml_available() -> tuple[bool, str]:
    """(True, "") when NVML initializes here, else (False, one-line reason). Cheap; leaves NVML shut down."""
    try:
        pynvml = _import_pynvml()
        pynvml.nvmlInit()
    except NvmlUnavailable as e:
        return False, str(e)
    except Exception as e:
        return False, f"NVML unavailable ({_nvml_error_text(e)})"
    pynvml.nvmlShutdown()
    return True, ""
