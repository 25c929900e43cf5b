"""The engine loop: clock, arrivals, schedule -> execute -> complete, step events and memory samples.

Clock. On `sim` the roofline cost model (costmodel.py) says how long each step would take on the GPU and a simulated
clock advances by it; on real devices the clock advances by the measured step time. Either way arrivals gate
admission by that clock (ARRIVE is emitted in the step during which the clock reaches the arrival), and an idle
engine jumps the clock to the next arrival.

Per step k: recorder.step = k; arrivals; scheduler.schedule(); executor.execute(); scheduler.complete() (forks,
FINISH + free); then STEP (n = sequences in the batch, dur_ns = wall time of the step, aux = simulated clock in ns
at the END of the step on sim, -1 on real devices), STEP_PREFILL, STEP_DECODE, STEP_KERNEL (when the executor
timed the forward pass on a device), STEP_ATTENTION (when it timed the attention kernels alone), device memory
samples taken since the last step (MEM_NVML / MEM_TORCH, on cuda), the allocator's ACCT_* samples,
recorder.end_step(). The executor's work runs inside an NVTX range "step k" (kvscope.engine.nvtx).

A KeyboardInterrupt or a crash aborts the recorder: every event emitted before it is written, those of the
interrupted step included (the step is kept as far as it got, not dropped), and the trace loads as truncated (no
RUN_END): every step before the interrupted one is complete.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as SequenceABC
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvscope.alloc.base import KVAllocator, emit_peaks, emit_usage, peak_rows, step_peaks, usage_rows
from kvscope.engine.base import Executor
from kvscope.engine.costmodel import GPUCostModel, ModelCosts, StepCost, step_time_ns
from kvscope.engine.nvtx import enabled as nvtx_enabled
from kvscope.engine.nvtx import nvtx_range
from kvscope.engine.scheduler import Scheduler, SchedulerConfig
from kvscope.engine.step import StepPlan
from kvscope.events import Kind
from kvscope.recorder import Recorder, defer_sigint
from kvscope.spec import KVSpec
from kvscope.workload import Request


@dataclass
class RunStats:
    steps: int = 0
    requests: int = 0
    finished_requests: int = 0
    rejected_requests: int = 0
    finished_sequences: int = 0
    preemptions: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    peak_reserved_bytes: int = 0
    peak_used_bytes: int = 0
    events: int = 0
    wall_s: float = 0.0
    events_per_s: float = 0.0
    clock_s: float = 0.0  # simulated time on sim, summed measured step time (+ idle gaps) on real devices
    interrupted: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class StallError(RuntimeError):
    """The scheduler can make no progress (a bug: every stuck state should end in a REJECT)."""


class Engine:
    def __init__(
        self,
        requests: SequenceABC[Request],
        allocator: KVAllocator,
        executor: Executor,
        recorder: Recorder,
        spec: KVSpec,
        config: SchedulerConfig | None = None,
        *,
        cost_model: GPUCostModel | None = None,
        check_invariants: bool = False,
        memory_sampler: Any = None,
    ) -> None:
        self.requests = list(requests)
        self.allocator = allocator
        self.executor = executor
        self.recorder = recorder
        self.spec = spec
        self.config = config or SchedulerConfig()
        self.scheduler = Scheduler(self.requests, allocator, recorder, self.config)
        self.cost_model = cost_model or GPUCostModel()
        self.costs = ModelCosts.from_spec(spec)
        self.check_invariants = check_invariants
        self.memory_sampler = memory_sampler  # e.g. kvscope.nvml.NvmlSampler: drained into the trace every step
        self.clock_ns = 0
        self.steps = 0
        self.stats = RunStats(requests=len(self.requests))

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self, progress: bool = False) -> RunStats:
        t0 = time.perf_counter()
        bar = _ProgressBar(len(self.requests)) if progress else None
        try:
            while not self.scheduler.done:
                self.step()
                if bar is not None:
                    bar.update(self)
        except BaseException:
            # Ctrl-C or a crash: abort() writes every event emitted so far, the interrupted step's own included
            # (it is not dropped), so the trace ends mid-step, the way a cut-off file does, and loads as cut off.
            # A second Ctrl-C meanwhile waits until the file is complete.
            with defer_sigint():
                self.stats.interrupted = True
                self.recorder.abort()
                self._finish_stats(t0)
            raise
        finally:
            if bar is not None:
                bar.stop()
        self.recorder.close(steps=self.steps)
        return self._finish_stats(t0)

    def step(self) -> None:
        sched = self.scheduler
        rec = self.recorder
        if not sched.busy:
            nxt = sched.next_arrival_ns()
            if nxt is not None and nxt > self.clock_ns:
                self.clock_ns = nxt  # idle: jump to the next arrival
        k = self.steps
        rec.step = k
        t_start = time.perf_counter_ns()
        before = (sched.requests_done, sched.preemptions, len(sched.waiting), sched.next_arrival_ns())
        sched.arrive(self.clock_ns)
        plan = sched.schedule()
        if nvtx_enabled():
            with nvtx_range(f"step {k}"):
                result = self.executor.execute(plan)
        else:  # no range to open: not even the context manager
            result = self.executor.execute(plan)
        forked = sched.complete(plan)
        self.executor.after_step(forked, sched.released)
        sched.released.clear()
        wall = time.perf_counter_ns() - t_start

        if self.executor.measured:
            self.clock_ns += wall
            clock_aux = -1
        else:
            cost = StepCost(plan.tokens, plan.kv_tokens_read, plan.attn_pairs)
            self.clock_ns += step_time_ns(self.cost_model, self.costs, cost)
            clock_aux = self.clock_ns
        batched = type(rec).emit is Recorder.emit  # a recorder overriding emit sees every event through it
        if batched and not (result.kernel_ns or result.attention_ns or self.memory_sampler is not None):
            # nothing comes between the step's rows and its samples (sim, cpu): all of them in one call
            usage = self.allocator.usage()
            peaks = step_peaks(self.allocator, usage)
            rec.emit_rows(self._step_rows(plan, wall, clock_aux) + usage_rows(usage) + peak_rows(peaks))
        else:
            if batched:
                rec.emit_rows(self._step_rows(plan, wall, clock_aux))
            else:
                rec.emit(Kind.STEP, n=plan.batch_size, dur_ns=wall, aux=clock_aux)
                rec.emit(Kind.STEP_PREFILL, n=plan.prefill_tokens)
                rec.emit(Kind.STEP_DECODE, n=plan.decode_tokens)
            if result.kernel_ns:
                rec.emit(Kind.STEP_KERNEL, dur_ns=result.kernel_ns, bytes=result.kv_bytes_read)
            if result.attention_ns:
                rec.emit(
                    Kind.STEP_ATTENTION,
                    n=result.attention_layers,
                    dur_ns=result.attention_ns,
                    bytes=result.kv_bytes_read,
                    aux=int(result.graph),
                )
            if self.memory_sampler is not None:
                self.memory_sampler.drain(rec)
            usage = self.allocator.usage()
            emit_usage(rec, usage)
            peaks = step_peaks(self.allocator, usage)
            emit_peaks(rec, peaks)
        if self.check_invariants:
            self.allocator.check_invariants()
            usage.check()
        rec.end_step()

        st = self.stats
        st.prefill_tokens += plan.prefill_tokens
        st.decode_tokens += plan.decode_tokens
        st.peak_reserved_bytes = max(st.peak_reserved_bytes, peaks.reserved)
        st.peak_used_bytes = max(st.peak_used_bytes, peaks.used)
        self.steps = k + 1
        if not plan.batch_size and not plan.preempted:
            after = (sched.requests_done, sched.preemptions, len(sched.waiting), sched.next_arrival_ns())
            if after == before and sched.busy:
                raise StallError(
                    f"step {k}: nothing scheduled and nothing changed ({len(sched.waiting)} waiting, "
                    f"{len(sched.running)} running, {len(sched.swapped)} swapped)"
                )

    @staticmethod
    def _step_rows(plan: StepPlan, wall: int, clock_aux: int) -> list[int]:
        """STEP, STEP_PREFILL and STEP_DECODE as emit_rows takes them."""
        # t_ns, step (the recorder's), kind, seq, block, n, bytes, addr, aux, dur_ns
        return [
            *(0, 0, Kind.STEP, -1, -1, plan.batch_size, 0, -1, clock_aux, wall),
            *(0, 0, Kind.STEP_PREFILL, -1, -1, plan.prefill_tokens, 0, -1, -1, 0),
            *(0, 0, Kind.STEP_DECODE, -1, -1, plan.decode_tokens, 0, -1, -1, 0),
        ]

    def _finish_stats(self, t0: float) -> RunStats:
        st = self.stats
        sched = self.scheduler
        st.steps = self.steps
        st.finished_requests = sched.finished_requests
        st.rejected_requests = sched.rejected
        st.finished_sequences = sched.finished_seqs
        st.preemptions = sched.preemptions
        st.generated_tokens = sched.generated_tokens
        st.events = self.recorder.events_written
        st.wall_s = time.perf_counter() - t0
        st.events_per_s = st.events / st.wall_s if st.wall_s > 0 else 0.0
        st.clock_s = self.clock_ns / 1e9
        return st


class _ProgressBar:
    """rich progress on stderr: requests done / total, steps, events per second; refreshed a few times a second."""

    def __init__(self, total: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]requests"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._progress.add_task("run", total=total, status="")
        self._progress.start()
        self._t0 = time.perf_counter()
        self._last = 0.0

    def update(self, engine: Engine) -> None:
        now = time.perf_counter()
        if now - self._last < 0.2:
            return
        self._last = now
        events = engine.recorder.events_written
        rate = events / (now - self._t0) if now > self._t0 else 0.0
        status = f"step {engine.steps:,}  {rate / 1e3:,.0f}k events/s"
        self._progress.update(self._task, completed=engine.scheduler.requests_done, status=status)

    def stop(self) -> None:
        self._progress.stop()
