"""Every eviction policy kvscope knows, described once (kvscope.policies.base.PolicyEntry): the lab's sweep, the
`kvscope lab --policies` choices and the paged allocator's `eviction` option all read these entries, so nothing
else compares a policy's name. A policy module registers its entry at import; _BUILTIN_MODULES lists them in the
order the lab shows them."""

from __future__ import annotations

import importlib

from kvscope.policies.base import PolicyEntry

_REGISTRY: dict[str, PolicyEntry] = {}
_BUILTIN_MODULES = (
    "kvscope.policies.lru",
    "kvscope.policies.fifo",
    "kvscope.policies.lfu",
    "kvscope.policies.arc",
    "kvscope.policies.s3fifo",
    "kvscope.policies.radix",
    "kvscope.policies.priority",
    "kvscope.policies.belady",
    "kvscope.policies.discard",
    "kvscope.policies.phase",
    "kvscope.policies.learned",
)


def register(entry: PolicyEntry) -> PolicyEntry:
    _REGISTRY[entry.name] = entry
    return entry


def entries() -> dict[str, PolicyEntry]:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return dict(_REGISTRY)


def names() -> tuple[str, ...]:
    return tuple(entries())


def get(name: str) -> PolicyEntry:
    known = entries()
    if name not in known:
        raise ValueError(f"unknown eviction policy {name!r} (choose from {', '.join(known)})")
    return known[name]


def parse_names(text: str, flag: str = "--policies") -> list[str]:
    """'lru,fifo' -> ['lru', 'fifo'] ('all': every policy); a one-line error naming an unknown one."""
    known = entries()
    wanted = [p.strip() for p in text.split(",") if p.strip()]
    if not wanted:
        raise ValueError(f"{flag}: empty; give policy names ({', '.join(known)}) or all")
    if wanted == ["all"]:
        return list(known)
    for name in wanted:
        if name not in known:
            raise ValueError(f"{flag}: unknown policy {name!r} (choose from {', '.join(known)}, or all)")
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"{flag}: a policy is named twice in {text!r}")
    return wanted
