"""The lab's option values as text (the CLI's --capacity and --prediction-error, the dashboard's fields) -> values,
with one-line errors naming the option."""

from __future__ import annotations

import math


def parse_capacities(text: str) -> list[int]:
    text = text.strip()
    if text.count(":") == 2:
        lo_s, hi_s, n_s = text.split(":")
        try:
            lo, hi, n = int(lo_s), int(hi_s), int(n_s)
        except ValueError:
            raise ValueError(f"--capacity {text}: LO:HI:COUNT takes three integers") from None
        if not (1 <= lo <= hi and 1 <= n <= 10_000):
            raise ValueError(f"--capacity {text}: need 1 <= LO <= HI and 1 <= COUNT <= 10000")
        if n == 1:
            return [lo]
        values = [round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]
        return sorted(set(values))
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"--capacity: {part!r} is not a whole number of blocks") from None
        if value < 1:
            raise ValueError(f"--capacity: must be at least one block, got {value}")
        out.append(value)
    if not out:
        raise ValueError("--capacity: give at least one capacity")
    return sorted(set(out))


def parse_errors(text: str) -> list[float]:
    out: list[float] = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--prediction-error: {part.strip()!r} is not a number") from None
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"--prediction-error: must be a probability in 0..1, got {part.strip()}")
        out.append(value)
    return sorted(set(out))
