"""Byte sizes for people: parse '8GiB' / '2MiB' / '4096', print 1.5 GiB; and how much memory this host has."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
from fractions import Fraction

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "p": 1000**5,
    "pb": 1000**5,
    "pib": 1024**5,
    "e": 1000**6,
    "eb": 1000**6,
    "eib": 1024**6,
}
# The number part is bounded here so that parsing never meets float overflow (400 digits used to become inf and then
# an OverflowError) nor Python's 4300-digit int limit; MAX_SIZE below rejects what is merely too big.
_SIZE = re.compile(r"^\s*(\d{1,30}(?:\.\d{1,30})?)\s*([a-zA-Z]*)\s*$")
_HINT = "use e.g. 8GiB, 2MiB, 512KiB or plain bytes"

# Traces store byte counts as int64, so nothing kvscope sizes can be larger (8 EiB, far beyond any real memory).
MAX_SIZE = 2**63 - 1


def parse_size(text: str | int) -> int:
    """'8GiB' -> 8589934592; '2MiB'; '1.5GB'; plain bytes (fractions of a byte round down).

    Raises ValueError with one line naming the bad text: not a size, negative, NaN/inf, or more than MAX_SIZE."""
    if isinstance(text, bool):  # bool is an int subclass; True bytes is a mistake, not 1
        raise ValueError(f"not a size: {text!r} ({_HINT})")
    if isinstance(text, int):
        return _check_range(text, text)
    raw = str(text)
    m = _SIZE.match(raw)
    if not m or m.group(2).lower() not in _UNITS:
        if raw.strip().startswith("-"):
            raise ValueError(f"not a size: {raw!r} (must not be negative)")
        if len(raw) > 60:  # a 400-digit paste: name it without echoing all of it
            raise ValueError(f"not a size: {raw[:20]!r}... ({len(raw)} characters; {_HINT})")
        raise ValueError(f"not a size: {raw!r} ({_HINT})")
    # Exact arithmetic: float would round '9007199254740993' and overflow on long inputs.
    value = Fraction(m.group(1)) * _UNITS[m.group(2).lower()]
    return _check_range(int(value), raw)


def _check_range(value: int, shown: str | int) -> int:
    if value < 0:
        raise ValueError(f"not a size: {shown!r} (must not be negative)")
    if value > MAX_SIZE:
        raise ValueError(f"size too large: {shown!r} (at most {format_bytes(MAX_SIZE)})")
    return value


_BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: float) -> str:
    """Binary units, three significant digits: 1536 -> '1.5 KiB', 12 -> '12 B'.

    A value that would show as 1000 or more of a unit (999.5 and up: three significant digits round it to 1000, which
    '.3g' writes as '1e+03') is shown in the next unit instead: 1000 MiB -> '0.977 GiB'. Negative values get a sign."""
    n = float(n)
    if not math.isfinite(n):
        return f"{n} B"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in _BINARY_UNITS[:-1]:
        if n < 999.5:
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.3g} {unit}"
        n /= 1024
    # EiB, the last unit, reached only by values far beyond int64: whole numbers (an exponent only past a million).
    return f"{sign}{n:.3g} EiB" if n < 999.5 or n >= 1e6 else f"{sign}{n:,.0f} EiB"


def host_memory_bytes() -> int | None:
    """Memory this process can hope to use: physical RAM, lowered by what is left of an address-space rlimit (ulimit -v)
    or by a cgroup memory limit. None where the platform cannot say (then callers skip their checks, not guess)."""
    limits: list[int] = []
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY and soft > 0:
            # What is left of it: the interpreter and its libraries (torch alone maps over a GiB) count against it.
            limits.append(max(0, soft - _address_space_used()))
    except (ImportError, ValueError, OSError):
        pass
    limits.extend(_cgroup_limits())
    return min(limits) if limits else None


def _address_space_used() -> int:
    """Bytes of address space this process maps now (Linux /proc/self/statm; 0 where unknown)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return 0


def _cgroup_limits() -> list[int]:
    # Containers: physical RAM is the host's, the cgroup is what this process really gets (v2 first, then v1).
    out = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < 2**62:  # "max" or v1's huge sentinel mean no limit
            out.append(int(text))
    return out


def check_host_memory(needed: int, what: str, hint: str) -> None:
    """Raise ValueError (one line) when `needed` bytes of host memory, for `what`, is more than half of what this
    process may use: better refused up front than a MemoryError (or the OOM killer) after gigabytes are taken. Half,
    because the interpreter, torch and the run itself need the rest."""
    limit = host_memory_bytes()
    if limit is None or needed <= limit // 2:
        return
    raise ValueError(
        f"{what} needs about {format_bytes(needed)} of host memory, more than half of the {format_bytes(limit)} "
        f"this process may use; {hint}"
    )


def check_int(what: str, value: object, minimum: int, maximum: int = MAX_SIZE) -> int:
    """`value` as an int in minimum..maximum, else ValueError naming `what` ('paged allocator: block_size'). Floats
    and bools are refused: 16.0 blocks or True bytes are mistakes that would fail later and less clearly."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        need = {0: "must not be negative", 1: "must be positive"}.get(minimum, f"must be >= {minimum:,}")
        raise ValueError(f"{what} {need}, got {value}")
    if value > maximum:
        raise ValueError(f"{what} must be at most {maximum:,}, got {value:,}")
    return int(value)
