"""Recording the kvscope allocators a block of code builds (what `%%kvscope` does with a notebook cell):

    with capture_allocators() as captured:
        alloc = PagedAllocator(get_spec("llama-3-8b"), 64 << 20, block_size=16)
        ...
    traces = traces_from_captured(captured)

An allocator built without a recorder gets an in-memory one (the whole block is step 0); one built with a recorder
(the engine's, or the user's) is remembered with it; explicit NullRecorders are respected. The hook wraps the
allocator classes' __init__ for the duration of the block (restored on exit, even on error), so allocators need no
notebook-specific code.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kvscope.alloc.base import KVAllocator, emit_usage
from kvscope.alloc.paged import PagedAllocator
from kvscope.alloc.static import StaticAllocator
from kvscope.alloc.vmm import VMMAllocator
from kvscope.analysis.summary import event_counts
from kvscope.events import KIND_NAMES, Kind
from kvscope.recorder import NullRecorder, Recorder
from kvscope.trace import Trace, TruncatedTraceWarning, load_trace, trace_from_recorder

CELL_COMMAND = "%%kvscope"  # meta['command'] of traces recorded from allocators built without a recorder
ALLOCATOR_CLASSES: tuple[type[KVAllocator], ...] = (StaticAllocator, PagedAllocator, VMMAllocator)


@dataclass
class Captured:
    allocator: Any
    recorder: Recorder
    owned: bool  # we gave it an in-memory recorder (it was built without one)


def _device_of(allocator: Any) -> str:
    backend = getattr(allocator, "backend", None)
    name = str(getattr(backend, "name", "sim"))
    return {"host": "cpu"}.get(name, name)  # the host backend is what `--device cpu` runs on


def _wrap(
    cls: type[KVAllocator], original: Callable[..., None], captured: list[Captured], constructing: set[int]
) -> Callable[..., None]:
    """`original` __init__ of `cls`, recording the allocator it builds into `captured`."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if id(self) in constructing:  # a wrapped class calling another's __init__ via super(): handled outside
            return original(self, *args, **kwargs)
        constructing.add(id(self))
        try:
            bound = signature.bind(self, *args, **kwargs)
            owned = bound.arguments.get("recorder") is None
            if owned:
                spec = bound.arguments.get("spec")
                meta: dict[str, Any] = {"allocator": cls.name, "command": CELL_COMMAND}
                if spec is not None:
                    meta |= {"model": spec.name, "spec": spec.to_dict()}
                recorder = Recorder(None, meta)
                recorder.step = 0
                bound.arguments["recorder"] = recorder
            original(*bound.args, **bound.kwargs)
        finally:
            constructing.discard(id(self))
        rec = self.recorder
        if owned:
            rec.update_meta({"allocator_config": self.config(), "device": _device_of(self)})
        if not isinstance(rec, NullRecorder):
            captured.append(Captured(self, rec, owned))

    return __init__


@contextlib.contextmanager
def capture_allocators() -> Iterator[list[Captured]]:
    """While active, every kvscope allocator constructed is recorded (see the module docstring)."""
    captured: list[Captured] = []
    constructing: set[int] = set()  # allocators inside a wrapped __init__ right now (ids are reused after GC)
    originals: dict[type, Any] = {}
    try:
        for cls in ALLOCATOR_CLASSES:
            originals[cls] = cls.__dict__["__init__"]
            cls.__init__ = _wrap(cls, originals[cls], captured, constructing)  # type: ignore[method-assign]
        yield captured
    finally:
        for cls, original in originals.items():
            cls.__init__ = original  # type: ignore[method-assign]


def _closed(trace: Trace) -> bool:
    return KIND_NAMES[Kind.RUN_END] in set(event_counts(trace)["kind"])


def traces_from_captured(captured: list[Captured]) -> list[Trace]:
    """One trace per distinct recorder. Recorders we own get the allocator's books as a final sample (there was no
    engine to emit them) and are closed, unless the code closed them itself; files are read back (a run still open
    is read up to here: it loads as cut off); in-memory recorders are converted as they are."""
    traces: list[Trace] = []
    done: set[int] = set()
    for c in captured:
        rec = c.recorder
        if id(rec) in done:
            continue
        done.add(id(rec))
        if rec.path is not None:
            rec.flush()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TruncatedTraceWarning)
                traces.append(load_trace(rec.path))
            continue
        trace = trace_from_recorder(rec)
        if c.owned and not _closed(trace):
            emit_usage(rec, c.allocator.usage())
            rec.close(steps=rec.step + 1)
            trace = trace_from_recorder(rec)
        traces.append(trace)
    return traces
