"""Run metadata for a trace: library versions, device name, start time, the command line.

Cheap on CPU-only machines: versions come from installed package metadata (no torch import), and the CUDA probe
(kvscope.cudainfo) is only asked when the run uses a GPU.
"""

from __future__ import annotations

import functools
import platform
import shlex
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

from kvscope import __version__

_PACKAGES = ("torch", "triton", "numpy", "pyarrow", "pandas")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def versions(device: str) -> dict[str, str | None]:
    """kvscope, python and library versions; with device 'cuda' also the driver, cuda-bindings and NVML."""
    out: dict[str, str | None] = {"kvscope": __version__, "python": platform.python_version()}
    out.update({name: _package_version(name) for name in _PACKAGES})
    if device == "cuda":
        from kvscope.cudainfo import versions as cuda_versions

        out.update(cuda_versions())
    return out


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The processor's marketing name ('AMD EPYC 7R13 Processor'), or the architecture when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str, simulated: str = "GPU, roofline model") -> str:
    """The GPU's name on cuda, the processor's on cpu, 'simulated <cost model>' on sim."""
    if device == "sim":
        return f"simulated {simulated}"
    if device == "cuda":
        from kvscope.cudainfo import device_name as cuda_device_name

        return cuda_device_name()
    return cpu_name()


def start_time() -> str:
    """Now, ISO 8601 in UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command_line(argv: list[str] | None = None) -> str:
    args = sys.argv if argv is None else argv
    prog = "kvscope" if args and args[0].endswith(("kvscope", "cli.py", "__main__.py")) else (args[0] if args else "")
    return shlex.join([prog, *args[1:]]) if args else ""
