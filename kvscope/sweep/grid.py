"""A sweep's grid: the axes given on the command line (or in Python), expanded into independent simulated runs.

    grid = SweepGrid(allocators=("paged", "vmm"), kv_memory=(4 << 30, 8 << 30), seeds=(0, 1),
                     options={"block_size": (16, 32)})
    points = grid.points()          # one SweepPoint (a RunConfig and its workload) per run

Which allocator an option axis (block size, page size, static variant, eviction policy) applies to comes from the
allocator registry: an axis is crossed only with the allocators whose entry lists the option's `RunConfig` field,
so `--allocator paged,vmm --block-size 16,32` gives two paged runs and one vmm run, never a vmm run "with block size
16". An axis that no chosen allocator takes is a one-line error, as is every other bad value, before any run starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvscope.alloc import registry
from kvscope.engine.api import RunConfig
from kvscope.errors import UserError
from kvscope.units import parse_size
from kvscope.workload import MAX_REQUEST_TOKENS, MAX_REQUESTS

# A grid larger than this is almost always a typo (a seed range pasted twice); each run is a whole simulated engine.
MAX_RUNS = 10_000


@dataclass(frozen=True)
class OptionAxis:
    """An allocator option that a sweep may cross: its RunConfig field, its flag and how one value is read."""

    field: str
    flag: str
    parse: Callable[[str], Any]
    metavar: str
    help: str
    short: str  # what a label calls it: "paged block 16", "vmm page 2 MiB"


def _positive_int(text: str, limit: int = MAX_REQUEST_TOKENS) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None
    if not 1 <= value <= limit:
        raise ValueError(f"must be an integer in 1..{limit:,}, got {value}")
    return value


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise ValueError(f"must be positive, got {text!r}")
    return value


def _name(text: str) -> str:
    return text


def _on_off(text: str) -> bool:
    value = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}.get(text.lower())
    if value is None:
        raise ValueError("use on or off")
    return value


# The option axes kvscope knows how to read from a list. Their fields are RunConfig's; the registry says which
# allocator takes each. `eviction` is used only when RunConfig has that field (the engine's eviction policies).
OPTION_AXES: tuple[OptionAxis, ...] = (
    OptionAxis(
        "block_size", "--block-size", _positive_int, "N,..", "tokens per block (allocators with blocks)", "block"
    ),
    OptionAxis(
        "page_size", "--page-size", _positive_size, "SIZE,..", "physical page size (allocators with pages)", "page"
    ),
    OptionAxis("static_variant", "--static-variant", _name, "V,..", "reservation rule (max, pow2, oracle)", ""),
    OptionAxis("prefix_caching", "--prefix-caching", _on_off, "on,off", "share cached prompt blocks", "prefix caching"),
    OptionAxis("eviction", "--eviction", _name, "POLICY,..", "prefix-cache eviction policy", "eviction"),
)


def run_config_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(RunConfig)}


def available_axes() -> tuple[OptionAxis, ...]:
    """The option axes this engine has (eviction only once RunConfig has the field)."""
    fields = run_config_fields()
    return tuple(a for a in OPTION_AXES if a.field in fields)


def option_axis(field_name: str) -> OptionAxis:
    return next(a for a in OPTION_AXES if a.field == field_name)


def takes(allocator: str, field_name: str) -> bool:
    """Whether `allocator` takes the RunConfig field: its registry entry lists it, or no entry does (then it is an
    engine-wide setting every allocator runs with)."""
    owners = [e.name for e in registry.entries().values() if any(o.field == field_name for o in e.options)]
    return allocator in owners if owners else True


def parse_list(flag: str, text: str, parse: Callable[[str], Any]) -> tuple[Any, ...]:
    """'16,32' -> (16, 32), each item read by `parse`; one-line ValueError naming the flag for an empty item, a bad
    value or a value given twice (a duplicate would run the same configuration twice and weigh it double)."""
    items = [part.strip() for part in str(text).split(",")]
    if not any(items):
        raise ValueError(f"{flag}: empty; give one value or a comma-separated list")
    values: list[Any] = []
    for item in items:
        if not item:
            raise ValueError(f"{flag} {text}: an empty item; separate values with single commas")
        try:
            value = parse(item)
        except ValueError as e:
            raise ValueError(f"{flag} {item}: {e}") from None
        if value in values:
            raise ValueError(f"{flag} {text}: {item} is given twice")
        values.append(value)
    return tuple(values)


@dataclass(frozen=True)
class SweepPoint:
    """One run of the sweep: its index in the grid, the workload it runs and the full RunConfig."""

    index: int
    workload: str
    config: RunConfig
    options: dict[str, Any]  # the option axes' values for this run (None: the axis does not apply)

    @property
    def seed(self) -> int:
        return self.config.seed

    def columns(self) -> dict[str, Any]:
        """The configuration columns of this run's row: what was asked, before the run says what happened."""
        cfg = self.config
        return {
            "run": self.index,
            "workload": self.workload,
            "seed": cfg.seed,
            "allocator": cfg.allocator,
            "kv_memory": cfg.kv_bytes,
            **self.options,
            "model": cfg.model_name,
            "max_len": cfg.max_len,
        }


@dataclass(frozen=True)
class SweepGrid:
    """The axes of a sweep. Fixed settings (model, limits) go in `base` as RunConfig fields. `kv_memory` None means
    RunConfig's default; `options` maps an option axis's field to its values."""

    allocators: tuple[str, ...] = ("paged",)
    workloads: tuple[str, ...] = ("sharegpt",)
    kv_memory: tuple[int | None, ...] = (None,)
    seeds: tuple[int, ...] = (0,)
    options: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    requests: int | None = 200
    base: Mapping[str, Any] = field(default_factory=dict)

    def axes(self) -> dict[str, Any]:
        """The grid as JSON-able data (for the table's metadata and the figure page)."""
        return {
            "allocator": list(self.allocators),
            "workload": list(self.workloads),
            "kv_memory": list(self.kv_memory),
            "seed": list(self.seeds),
            **{k: list(v) for k, v in self.options.items()},
            "requests": self.requests,
            **{k: v for k, v in self.base.items()},
        }

    def check(self) -> None:
        """One-line errors for a grid that cannot run, before anything is generated or run."""
        for name, values in (
            ("--allocator", self.allocators),
            ("--workload", self.workloads),
            ("--kv-memory", self.kv_memory),
            ("--seed", self.seeds),
        ):
            if not values:
                raise UserError(f"{name}: no values")
        for name in self.allocators:
            registry.get(name)  # ValueError naming the choices
        for workload in self.workloads:
            _check_workload(workload)
        for size in self.kv_memory:
            if size is not None and size < 1:
                raise UserError(f"--kv-memory: must be positive, got {size}")
        for seed in self.seeds:
            if not 0 <= seed <= 2**63 - 1:
                raise UserError(f"--seed: must be a non-negative integer, got {seed}")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise UserError(f"--requests: must be an integer in 1..{MAX_REQUESTS:,}, got {self.requests}")
        fields = run_config_fields()
        unknown = [k for k in self.base if k not in fields]
        if unknown:
            raise UserError(f"unknown RunConfig field(s) {', '.join(unknown)}")
        for key, values in self.options.items():
            axis = next((a for a in OPTION_AXES if a.field == key), None)
            if axis is None:
                raise UserError(f"{key}: not an option kvscope sweeps (choose from {_axis_names()})")
            if key not in fields:
                raise UserError(
                    f"{axis.flag}: this kvscope's engine has no {key} setting (RunConfig has no {key!r} field); "
                    "leave it out"
                )
            if not values:
                raise UserError(f"{axis.flag}: no values")
            takers = [a for a in self.allocators if takes(a, key)]
            if not takers:
                owners = [e.name for e in registry.entries().values() if any(o.field == key for o in e.options)]
                raise UserError(
                    f"{axis.flag} applies to --allocator {' or '.join(owners)}, and none of "
                    f"{','.join(self.allocators)} is one"
                )
        runs = self.size()
        if runs > MAX_RUNS:
            raise UserError(f"the grid has {runs:,} runs, more than {MAX_RUNS:,}; sweep fewer values")

    def _option_combos(self, allocator: str) -> list[dict[str, Any]]:
        """Every combination of the option axes that apply to `allocator`; the others are None in its rows."""
        applied = [(k, v) for k, v in self.options.items() if takes(allocator, k)]
        combos = itertools.product(*[values for _, values in applied])
        # Every axis the engine has is a column, swept or not: runs report the value their allocator used.
        blank = dict.fromkeys(a.field for a in available_axes())
        return [blank | dict(zip([k for k, _ in applied], combo, strict=True)) for combo in combos]

    def size(self) -> int:
        per_memory = sum(len(self._option_combos(a)) for a in self.allocators)
        return len(self.workloads) * len(self.kv_memory) * per_memory * len(self.seeds)

    def points(self) -> list[SweepPoint]:
        """The runs, checked: workload, then KV memory, then allocator and its options, seeds innermost (so that a
        configuration's replicates are neighbours in the table)."""
        self.check()
        out: list[SweepPoint] = []
        for workload, kv, allocator in itertools.product(self.workloads, self.kv_memory, self.allocators):
            for options in self._option_combos(allocator):
                for seed in self.seeds:
                    given = {k: v for k, v in options.items() if v is not None}
                    cfg = RunConfig(allocator=allocator, device="sim", kv_memory=kv, seed=seed, **self.base, **given)
                    try:
                        cfg.validate()
                        cfg.spec()
                    except ValueError as e:
                        raise UserError(f"{_describe(allocator, options)}: {e}") from None
                    out.append(SweepPoint(len(out), workload, cfg, dict(options)))
        # Each distinct allocator configuration is built once here, so that what only the allocator can refuse
        # (an unknown variant, a page group larger than the KV memory) is one line before any run, not a failed run.
        built: set[str] = set()
        for p in out:
            key = repr(dataclasses.replace(p.config, seed=0))
            if key not in built:
                built.add(key)
                _try_build(p)
        return out


def _try_build(point: SweepPoint) -> None:
    from kvscope.engine.api import make_allocator, make_backend
    from kvscope.recorder import NullRecorder

    cfg = point.config
    backend = make_backend(cfg.device) if registry.get(cfg.allocator).needs_backend else None
    try:
        allocator = make_allocator(cfg, cfg.spec(), NullRecorder(), backend)
        close = getattr(allocator, "close", None)
        if callable(close):
            close()
    except ValueError as e:
        raise UserError(f"{_describe(cfg.allocator, point.options)}: {e}") from None
    finally:
        if backend is not None:
            backend.close()


def _describe(allocator: str, options: Mapping[str, Any]) -> str:
    given = ", ".join(f"{option_axis(k).flag} {v}" for k, v in options.items() if v is not None)
    return f"--allocator {allocator}" + (f" with {given}" if given else "")


def _axis_names() -> str:
    return ", ".join(a.field for a in OPTION_AXES)


def _check_workload(name: str) -> None:
    from kvscope.workload_gen import NAMED_WORKLOADS

    if name in NAMED_WORKLOADS or os.path.isfile(name):
        return
    raise UserError(f"--workload {name}: unknown workload; use one of {', '.join(NAMED_WORKLOADS)} or a .jsonl file")


def parse_axes(values: Mapping[str, str | None]) -> dict[str, tuple[Any, ...]]:
    """{field: 'a,b'} from the command line (None: not given) -> {field: (a, b)} for the option axes given."""
    out: dict[str, tuple[Any, ...]] = {}
    for axis in OPTION_AXES:
        text = values.get(axis.field)
        if text is not None:
            out[axis.field] = parse_list(axis.flag, text, axis.parse)
    return out
