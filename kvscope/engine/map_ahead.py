"""Mapping memory off the critical path (vAttention), and where the mapping time went.

While the forward pass of step k runs, a background thread calls `allocator.ensure_room(seq, tokens)` for every
sequence that will append in step k+1 (a decode: one more token; a chunked prefill: its next chunk), so step k+1's
appends find their memory mapped. Driver time spent on the engine thread (admissions, appends the mapper did not
foresee) is on the critical path; time on the mapper thread is off it, except for what the engine waits for after
the forward pass ("exposed"). Per step, when there is any: MAP_AHEAD (n=page-groups mapped ahead, bytes, dur_ns=driver
time on the mapper, aux=exposed wait ns) and MAP_SYNC (dur_ns=driver time on the engine thread since the previous
step). Totals are in `MapAhead.stats`, per-step shares in `MapAhead.steps`.

Driver time per thread comes from the allocator's backend when it keeps that book (`take_thread_driver_ns`, the CUDA
VMM backend); elsewhere it reads 0 and only the mapper's wall time and page-groups are counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

from kvscope.alloc.base import KVAllocator, KVOutOfMemory, MapsAhead, VirtualBuffers
from kvscope.engine.nvtx import nvtx_range
from kvscope.engine.step import Work
from kvscope.events import Kind
from kvscope.recorder import Recorder

# What one mapper run returns: (page-groups mapped, wall ns, driver ns on the mapper thread, sequences skipped)
_Done = tuple[int, int, int, int]


@dataclass
class MappingStats:
    """Mapping time over the run, split by where it was spent (nanoseconds)."""

    steps: int = 0
    ahead_groups: int = 0  # page-groups the mapper mapped ahead
    ahead_wall_ns: int = 0  # the mapper thread's busy time (ensure_room calls)
    ahead_driver_ns: int = 0  # driver time on the mapper thread: off the critical path...
    exposed_ns: int = 0  # ...except this: the engine waited for the mapper after the forward pass
    on_path_driver_ns: int = 0  # driver time on the engine thread (admit, append, free): on the critical path
    ahead_skipped: int = 0  # sequences the mapper left alone (no room now; the scheduler will decide)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class StepMapping:
    """One step's share of MappingStats (nanoseconds), so a benchmark can look at decode steps alone."""

    step: int  # the recorder's step number
    on_path_driver_ns: int
    ahead_driver_ns: int
    exposed_ns: int
    ahead_groups: int


def next_step_targets(work: list[Work]) -> list[tuple[int, int]]:
    """(sequence, tokens it will hold after its next step) for every sequence of this step that goes on."""
    targets = []
    for w in work:
        s = w.seq
        end = w.start + len(w.tokens)
        if w.samples:
            if s.generated + 1 >= s.request.output_len:
                continue  # finishes in this step
            targets.append((s.id, end + 1))
        else:
            targets.append((s.id, min(len(s.prompt), end + len(w.tokens))))
    return targets


class MapAhead:
    """The mapper thread and the books of mapping time. `background` is off for allocators that cannot map ahead
    (then only the engine thread's driver time is counted). Per step: `begin()` before the step's work, `start(work)`
    when the forward pass starts, `finish(...)` after it."""

    def __init__(self, allocator: KVAllocator, recorder: Recorder, *, background: bool) -> None:
        self.alloc = allocator
        self.recorder = recorder
        self.stats = MappingStats()
        self.steps: list[StepMapping] = []  # per step, for steps that had any mapping work
        self._target: MapsAhead | None = allocator if background and isinstance(allocator, MapsAhead) else None
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvscope-mapper") if self._target is not None else None
        )
        backend = allocator.backend if isinstance(allocator, VirtualBuffers) else None
        # Optional books, beyond the protocols: per-thread driver time (the CUDA VMM backend), and the bytes one
        # page-group maps across the allocator's buffers (for MAP_AHEAD's bytes).
        self._thread_ns: Callable[[], int] | None = getattr(backend, "take_thread_driver_ns", None)
        self._group_bytes = int(getattr(allocator, "group_bytes", 0))
        if self._thread_ns is not None:
            self._thread_ns()  # start counting from here: construction-time driver calls are setup, not steps

    @property
    def background(self) -> bool:
        return self._pool is not None

    def begin(self) -> int:
        """Driver ns the engine thread spent since the previous step (on the critical path)."""
        return self._thread_ns() if self._thread_ns is not None else 0

    def start(self, work: list[Work]) -> Future[_Done] | None:
        """Map room for the sequences' next step on the mapper thread; None when not mapping ahead."""
        if self._pool is None:
            return None
        return self._pool.submit(self._map, next_step_targets(work))

    def finish(self, on_path: int, future: Future[_Done] | None) -> None:
        """Wait for the mapper (the wait is the exposed time), then book the step and record its events."""
        exposed = 0
        if future is not None:
            t0 = time.perf_counter_ns()
            future.result()
            exposed = time.perf_counter_ns() - t0
        m = self.stats
        m.steps += 1
        m.on_path_driver_ns += on_path
        rec = self.recorder
        if on_path:
            rec.emit(Kind.MAP_SYNC, dur_ns=on_path)
        if future is None:
            if on_path:
                self.steps.append(StepMapping(rec.step, on_path, 0, 0, 0))
            return
        groups, wall, driver, skipped = future.result()
        if on_path or driver or groups:
            self.steps.append(StepMapping(rec.step, on_path, driver, exposed, groups))
        m.ahead_groups += groups
        m.ahead_wall_ns += wall
        m.ahead_driver_ns += driver
        m.exposed_ns += exposed
        m.ahead_skipped += skipped
        if groups or exposed:
            rec.emit(Kind.MAP_AHEAD, n=groups, bytes=groups * self._group_bytes, dur_ns=driver, aux=exposed)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _map(self, targets: list[tuple[int, int]]) -> _Done:
        """On the mapper thread: room for the next step. Best effort: a sequence that cannot get room now is left to
        the scheduler (preemption), so no OOM event is ever recorded for a guess."""
        alloc, target = self.alloc, self._target
        assert target is not None
        t0 = time.perf_counter_ns()
        groups = skipped = 0
        with nvtx_range("vmm map ahead"):
            for seq, tokens in targets:
                try:
                    have = alloc.num_tokens(seq)
                    if tokens <= have:
                        continue
                    if not alloc.can_append(seq, tokens - have):
                        skipped += 1
                        continue
                    groups += target.ensure_room(seq, tokens)
                except (KVOutOfMemory, KeyError):
                    skipped += 1
        wall = time.perf_counter_ns() - t0
        driver = self._thread_ns() if self._thread_ns is not None else 0
        return groups, wall, driver, skipped
