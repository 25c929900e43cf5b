"""Is there a CUDA GPU here, and what is it? One probe that never raises, and one line when the answer is no.

Every GPU path (the cuda VMM backend, the NVML sampler, the cuda executor, the benchmarks) asks `probe()` first, so a
CPU-only machine gets the same single sentence everywhere instead of a driver-loader traceback. `versions()` fills
the trace metadata's `versions` field. `python -m kvscope.cudainfo` prints what was found.

Nothing here imports torch or cuda-python at module import time: `import kvscope.cudainfo` is free.
"""

from __future__ import annotations

import functools
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any


def import_driver() -> Any:
    """The cuda-python driver module: `cuda.bindings.driver` (cuda-python >= 12.6), else the older `cuda.cuda`.
    Raises ImportError when cuda-python is not installed."""
    try:
        from cuda.bindings import driver
    except ImportError:
        from cuda import cuda as driver  # layout of cuda-python < 12.6
    return driver


def result_name(err: Any) -> str:
    """'CUDA_ERROR_OUT_OF_MEMORY' for a CUresult (or a bare int, as some old bindings return)."""
    name = getattr(err, "name", None)
    if name:
        return str(name)
    try:
        return import_driver().CUresult(int(err)).name
    except Exception:
        return f"CUresult {err}"


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    total_bytes: int
    compute_capability: str
    pci_bus_id: str  # "0000:18:00.0", how NVML finds the same GPU whatever CUDA_VISIBLE_DEVICES says


@dataclass(frozen=True)
class CudaInfo:
    available: bool
    reason: str  # one line saying why not, when not available; "" otherwise
    driver_version: str | None = None  # "13.0" (cuDriverGetVersion)
    devices: tuple[DeviceInfo, ...] = field(default_factory=tuple)
    torch_cuda: str | None = None  # torch.version.cuda

    def device(self, index: int | None = None) -> DeviceInfo:
        if not self.devices:
            raise IndexError("no CUDA devices")
        return self.devices[index or 0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _driver_version_string(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


@functools.lru_cache(maxsize=1)
def probe() -> CudaInfo:
    """Look for a usable CUDA driver and devices through cuda-python (and torch, when it has CUDA). Never raises."""
    try:
        driver = import_driver()
    except ImportError:
        return CudaInfo(False, "CUDA unavailable: cuda-python is not installed (pip install cuda-python)")
    try:
        (err,) = driver.cuInit(0)
    except RuntimeError:
        # cuda.pathfinder raises DynamicLibNotFoundError (a RuntimeError) when libcuda.so is nowhere to be found.
        return CudaInfo(False, "CUDA unavailable: no NVIDIA driver on this machine (libcuda not found)")
    if int(err) != 0:
        return CudaInfo(False, f"CUDA unavailable: cuInit failed with {result_name(err)}")
    err, version = driver.cuDriverGetVersion()
    driver_version = _driver_version_string(int(version)) if int(err) == 0 else None
    err, count = driver.cuDeviceGetCount()
    if int(err) != 0 or int(count) == 0:
        return CudaInfo(False, "CUDA unavailable: the driver sees no CUDA device", driver_version)
    devices = []
    for i in range(int(count)):
        _, dev = driver.cuDeviceGet(i)
        _, raw_name = driver.cuDeviceGetName(256, dev)
        _, total = driver.cuDeviceTotalMem(dev)
        attr = driver.CUdevice_attribute
        _, major = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
        _, minor = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
        _, raw_bus = driver.cuDeviceGetPCIBusId(32, dev)
        devices.append(
            DeviceInfo(
                index=i,
                name=_c_string(raw_name),
                total_bytes=int(total),
                compute_capability=f"{major}.{minor}",
                pci_bus_id=_c_string(raw_bus),
            )
        )
    torch_cuda = None
    try:
        import torch

        torch_cuda = torch.version.cuda
        if not torch.cuda.is_available():
            reason = f"CUDA unavailable to torch {torch.__version__} (a CPU build?) although the driver sees a GPU"
            return CudaInfo(False, reason, driver_version, tuple(devices), torch_cuda)
    except ImportError:
        pass
    return CudaInfo(True, "", driver_version, tuple(devices), torch_cuda)


def _c_string(raw: Any) -> str:
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw).split(b"\x00", 1)[0].decode(errors="replace")
    return str(raw).strip()


def require_cuda() -> CudaInfo:
    """The probe's answer, or BackendUnavailable carrying its one-line reason."""
    info = probe()
    if not info.available:
        from kvscope.backends.base import BackendUnavailable

        raise BackendUnavailable(info.reason)
    return info


def _module_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def versions() -> dict[str, str | None]:
    """Library and driver versions for a trace's `versions` metadata (cheap after the first call)."""
    info = probe()
    out: dict[str, str | None] = {
        "python": platform.python_version(),
        "torch": _module_version("torch"),
        "triton": _module_version("triton"),
        "cuda_bindings": _module_version("cuda-bindings") or _module_version("cuda-python"),
        "nvml": _module_version("nvidia-ml-py"),
        "cuda_driver": info.driver_version,
        "torch_cuda": info.torch_cuda,
    }
    return out


def device_name(index: int | None = None) -> str:
    """'NVIDIA H100 80GB HBM3'; the host's processor name when there is no GPU."""
    info = probe()
    return info.device(index).name if info.devices else platform.processor() or platform.machine()


def main() -> int:
    info = probe()
    print(json.dumps({"cuda": info.to_dict(), "versions": versions()}, indent=2))
    if not info.available:
        print(info.reason, file=sys.stderr)
    return 0 if info.available else 1


if __name__ == "__main__":
    sys.exit(main())
