"""Every allocator kvscope can run, described once.

An entry says everything the layers above need to know about one allocator, so that none of them compares its name:
its options (which `RunConfig` fields and CLI flags belong to it, and what "not given" means), how to build it, whether
it needs a physical-memory backend, how analysis replays its traces (`addressing`, also written into every trace's
`allocator_config` by the allocator's own `config()`), and the label of traces recorded before the config carried
one. What the engine and the kernels need from a built allocator is asked through the capability protocols in
`kvscope.alloc.base` (block-addressed, row-addressed, swappable, maps ahead), never through the entry's name.

Adding an allocator is one module that defines the allocator and calls `register(AllocatorEntry(...))` at import,
listed in `_BUILTIN_MODULES` (or imported by the user before the run), plus its tests.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvscope.alloc.base import KVAllocator
from kvscope.recorder import Recorder
from kvscope.spec import KVSpec

ADDRESSINGS = ("blocks", "pages", "rows")  # the replay families of kvscope.analysis.replay


@dataclass(frozen=True)
class Option:
    """One allocator-specific setting: the `RunConfig` field, its CLI flag, and the value that means "not given"
    (given for another allocator, it is an error)."""

    field: str
    flag: str
    unset: Any = None

    def given(self, value: Any) -> bool:
        return value != self.unset


@dataclass(frozen=True)
class BuildContext:
    """What every allocator may be built from: the KV geometry, the KV memory, the recorder, the engine's limits and,
    for allocators that map physical memory, the device's backend."""

    spec: KVSpec
    capacity_bytes: int
    recorder: Recorder
    max_len: int
    max_batch: int
    backend: Any = None


AllocatorBuilder = Callable[[BuildContext, Mapping[str, Any]], KVAllocator]


@dataclass(frozen=True)
class AllocatorEntry:
    name: str
    description: str  # one line, for --help and the docs
    build: AllocatorBuilder  # (context, {option field: value}) -> allocator
    addressing: str  # how analysis replays its traces: one of ADDRESSINGS
    options: tuple[Option, ...] = ()
    needs_backend: bool = False  # build it with a physical-memory backend (kvscope.backends) for the device
    legacy_label: Callable[[Mapping[str, Any]], str] | None = None  # label of a trace whose config has none
    extra: dict[str, Any] = field(default_factory=dict)

    def option_values(self, source: Any) -> dict[str, Any]:
        """{field: value} of this entry's options, read from `source` (a RunConfig or anything with the fields)."""
        return {o.field: getattr(source, o.field) for o in self.options}

    def make(self, context: BuildContext, source: Any) -> KVAllocator:
        return self.build(context, self.option_values(source))


_REGISTRY: dict[str, AllocatorEntry] = {}
_BUILTIN_MODULES = ("kvscope.alloc.static", "kvscope.alloc.paged", "kvscope.alloc.vmm")


def register(entry: AllocatorEntry) -> AllocatorEntry:
    if entry.addressing not in ADDRESSINGS:
        raise ValueError(f"allocator {entry.name!r}: addressing {entry.addressing!r} is not one of {ADDRESSINGS}")
    _REGISTRY[entry.name] = entry
    return entry


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def entries() -> dict[str, AllocatorEntry]:
    """Every registered allocator by name: the built-in ones first, in _BUILTIN_MODULES order (whatever order their
    modules happened to be imported in), then the others in registration order."""
    _load_builtins()
    builtin = [m.rsplit(".", 1)[1] for m in _BUILTIN_MODULES]
    rank = {name: i for i, name in enumerate(builtin)}
    ordered = sorted(_REGISTRY, key=lambda name: rank.get(name, len(rank)))  # stable: others keep their order
    return {name: _REGISTRY[name] for name in ordered}


def names() -> tuple[str, ...]:
    return tuple(entries())


def get(name: str) -> AllocatorEntry:
    """The entry of allocator `name`; a ValueError naming the choices for an unknown one."""
    known = entries()
    if name not in known:
        raise ValueError(f"--allocator {name}: unknown allocator (choose from {', '.join(known)})")
    return known[name]


def label_of(allocator: str, config: Mapping[str, Any]) -> str:
    """A run's short name: the label its config carries (written by the allocator), else the entry's legacy label
    for traces recorded before configs carried one, else the allocator's name."""
    label = config.get("label")
    if isinstance(label, str) and label:
        return label
    entry = entries().get(allocator)
    if entry is not None and entry.legacy_label is not None:
        try:
            return entry.legacy_label(config)
        except (KeyError, TypeError, ValueError):
            pass  # a config without the settings its label names: fall back to the name
    return allocator


def check_options(allocator: str, source: Any) -> None:
    """One-line ValueError when an option of another allocator is given for `allocator`."""
    own = entries().get(allocator)
    own_fields = {o.field for o in own.options} if own is not None else set()  # shared options (prefix caching)
    for entry in entries().values():
        if entry.name == allocator:
            continue
        for option in entry.options:
            if option.field not in own_fields and option.given(getattr(source, option.field)):
                takers = [e.name for e in entries().values() if any(o.field == option.field for o in e.options)]
                raise ValueError(f"{option.flag} applies to --allocator {' or '.join(takers)}, not {allocator}")
