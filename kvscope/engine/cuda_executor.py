"""The GPU executor: a Llama-shaped model with random bf16 weights running real prefill and decode under the
engine's continuous batching, attention through kvscope's Triton kernels in each allocator's own memory.

    paged   K/V pool [layers, 2, num_blocks, block_size, kv_heads, head_dim]; kernels read through block tables
    static  flat arena [layers, 2, rows, kv_heads, head_dim]; kernels read rows token_base .. token_base + len - 1
    vmm     the VMM allocator's virtual buffers over CUDA VMM pages, wrapped in place as tensors through DLPack
            (kvscope.backends.cuda_vmm.tensor_view); the same contiguous kernels as static, at token_base
(the layouts are kvscope.engine.layout's, shared with the torch executor)

`attention="sdpa"` (static, vmm) runs torch's scaled_dot_product_attention instead, one call per sequence on views
of the same memory: torch has no variable-length batched SDPA over rows at arbitrary bases, so this path shows that
unchanged kernels run on VMM memory, not how fast a batched kernel is.

Per step: drain the allocator's pending copies (fork rows, copy-on-write blocks, swaps); build the batch (decodes
first, then prefill chunks); start the VMM mapper; run the forward pass between two CUDA events (its time is
STEP_KERNEL's dur_ns, the K/V bytes attention read its bytes); wait for the mapper; move NVML samples into the trace.

VMM mapping off the critical path (vAttention). While the forward pass of step k runs, a background thread calls
`allocator.ensure_room(seq, tokens)` for every sequence that will append in step k+1 (a decode: one more token; a
chunked prefill: its next chunk), so step k+1's appends find their pages mapped. Driver time spent on the engine
thread (admissions, appends the mapper did not foresee) is on the critical path; time on the mapper thread is off
it, except for what the engine waits for after the forward pass ("exposed"). Per step, when the event kinds exist:
MAP_AHEAD (n=page-groups mapped ahead, bytes, dur_ns=driver time on the mapper, aux=exposed wait ns) and MAP_SYNC
(dur_ns=driver time on the engine thread since the previous step). Totals are in `executor.mapping`.

On a machine without a GPU the same executor runs on CPU tensors (`device="cpu"`): with Triton's interpreter
(TRITON_INTERPRET=1 set before kvscope.kernels is imported), or with kvscope.kernels.reference (`kernels="reference"`,
the same signatures in plain torch), which is how its tests and the benchmarks' plumbing checks run.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from kvscope.alloc.base import KVAllocator, KVOutOfMemory
from kvscope.engine.api import ATTENTION_MODES
from kvscope.engine.executor import ExecResult, ExecutorOptions
from kvscope.engine.layout import make_layout
from kvscope.engine.model import TORCH_DTYPES, LlamaModel, attention
from kvscope.engine.scheduler import StepPlan, Work
from kvscope.events import Kind
from kvscope.spec import KVSpec


class AttentionMismatch(AssertionError):
    """With `check` on: kernel attention differs from the reference computed on the same K/V."""


@dataclass
class MappingStats:
    """VMM mapping time over the run, split by where it was spent (nanoseconds)."""

    steps: int = 0
    ahead_groups: int = 0  # page-groups the mapper mapped ahead
    ahead_wall_ns: int = 0  # the mapper thread's busy time (ensure_room calls)
    ahead_driver_ns: int = 0  # VMM driver time on the mapper thread: off the critical path...
    exposed_ns: int = 0  # ...except this: the engine waited for the mapper after the forward pass
    on_path_driver_ns: int = 0  # VMM driver time on the engine thread (admit, append, free): on the critical path
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


@dataclass
class _Batch:
    """One step's tensors: rows in order [decodes..., prefill chunks...]."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    new_slots: torch.Tensor  # where each new token's K/V goes: flat row (contiguous) or slot (paged)
    logits_rows: torch.Tensor
    n_decode: int
    d_lens: torch.Tensor  # [n_decode] tokens attended, the new one included
    d_where: torch.Tensor  # [n_decode] token_base, or [n_decode, max_blocks] block tables
    d_max_len: int
    p_cu: torch.Tensor  # [n_prefill + 1]
    p_ctx: torch.Tensor  # [n_prefill] tokens cached before the chunk
    p_where: torch.Tensor
    p_max_q: int
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)  # (base, row offset, start, n): sdpa
    row0: int = 0  # contiguous layouts: row of the cache views' first element (bases and slots are relative to it)
    order: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, start, n) per row group, for checks


def build_model(spec: KVSpec, *, seed: int, device: torch.device) -> LlamaModel:
    """LlamaModel's weights drawn directly on `device` (a CUDA generator fills gigabytes in milliseconds, where
    LlamaModel's CPU generator would take minutes for an 8B model). Same attributes and scaling as LlamaModel."""
    dtype = TORCH_DTYPES[spec.dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    h, hd, qh, kvh, f = spec.hidden, spec.head_dim, spec.q_heads, spec.num_kv_heads, spec.ffn

    def w(rows: int, cols: int) -> torch.Tensor:
        t = torch.randn(rows, cols, generator=g, device=device, dtype=torch.float32)
        return t.div_(math.sqrt(rows)).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    model = LlamaModel.__new__(LlamaModel)
    model.spec = spec
    model.device = device
    model.dtype = dtype
    model.embed = torch.randn(spec.vocab_size, h, generator=g, device=device, dtype=torch.float32).to(dtype)
    model.layers = [
        {
            "attn_norm": ones(h),
            "wq": w(h, qh * hd),
            "wk": w(h, kvh * hd),
            "wv": w(h, kvh * hd),
            "wo": w(qh * hd, h),
            "mlp_norm": ones(h),
            "w_gate": w(h, f),
            "w_up": w(h, f),
            "w_down": w(f, h),
        }
        for _ in range(spec.num_layers)
    ]
    model.final_norm = ones(h)
    model.lm_head = w(h, spec.vocab_size)
    model.inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    return model


class CudaExecutor:
    """Executor protocol (kvscope.engine.executor): execute(plan), after_step(forked, released), device_name(),
    close(). Options (ExecutorOptions.extra): attention 'triton' | 'sdpa'; background_map (vmm; default True);
    nvml (default True); nvml_interval_s (0.05); check (compare every attention call with a reference on the same
    K/V; also turned on by ExecutorOptions.shadow); kernels 'triton' | 'reference' (kvscope.kernels.reference: the
    same signatures in plain torch, for fast CPU tests of everything around the kernels)."""

    measured = True

    def __init__(
        self, spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions | None = None, *, device: str = "cuda"
    ) -> None:
        options = options or ExecutorOptions()
        extra = options.extra
        kernel_impl = str(extra.get("kernels", "triton"))
        if kernel_impl == "triton":
            from kvscope import kernels
        elif kernel_impl == "reference":
            from kvscope.kernels import reference as kernels
        else:
            raise ValueError(f"kernels {kernel_impl!r}: choose triton or reference")
        self.attention_mode = str(extra.get("attention", "triton"))
        if self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"--attention {self.attention_mode}: choose from {', '.join(ATTENTION_MODES)}")
        if self.attention_mode == "sdpa" and allocator.name == "paged":
            raise ValueError("--attention sdpa: needs contiguous K/V (static or vmm); paged runs use triton")
        self.device = device
        self.torch_device = torch.device(device)
        if self.torch_device.type == "cuda":
            from kvscope.cudainfo import require_cuda

            require_cuda()
            if self.torch_device.index is None:
                self.torch_device = torch.device("cuda", torch.cuda.current_device())
        self._cuda = self.torch_device.type == "cuda"
        self.spec = spec
        self.alloc = allocator
        self.recorder = allocator.recorder
        self.kernels = kernels
        self.paged = allocator.name == "paged"
        self.bytes_per_token = spec.bytes_per_token
        self.scale = 1.0 / math.sqrt(spec.head_dim)
        self.check = bool(extra.get("check", options.shadow))
        self.check_tolerance = max(options.shadow_tolerance, 2e-2 if spec.dtype_bytes == 2 else 0.0)
        self.max_check_error = 0.0
        self.mapping = MappingStats()
        self.step_mapping: list[StepMapping] = []  # per step, for steps that had any mapping work
        self.memory: dict[str, int] = {}
        self.last_logits: torch.Tensor | None = None

        self.nvml = None
        if self._cuda and extra.get("nvml", True):
            from kvscope.nvml import NvmlSampler

            interval = float(extra.get("nvml_interval_s", 0.05))
            self.nvml = NvmlSampler.try_start(
                self.torch_device.index or 0, interval_s=interval, clock=self.recorder.now_ns
            )
            if self.nvml is not None:
                self.memory["nvml_used_start"] = self.nvml.used_bytes()
        self._check_fits()
        self.model = build_model(spec, seed=options.seed, device=self.torch_device)
        self.layout = make_layout(spec, allocator, self.torch_device)
        if self.nvml is not None:
            self.memory["nvml_used_ready"] = self.nvml.used_bytes()

        self._backend = getattr(allocator, "backend", None)
        self._thread_ns = getattr(self._backend, "take_thread_driver_ns", None)
        self.background_map = bool(extra.get("background_map", True)) and hasattr(allocator, "ensure_room")
        self._mapper = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvscope-mapper") if self.background_map else None
        )
        if self._thread_ns is not None:
            self._thread_ns()  # start counting from here: construction-time driver calls are setup, not steps

    def _check_fits(self) -> None:
        if not self._cuda:
            return
        from kvscope.cli import UserError
        from kvscope.engine.costmodel import ModelCosts

        weights = ModelCosts.from_spec(self.spec).weight_bytes
        free, _ = torch.cuda.mem_get_info(self.torch_device)
        kv = 0 if self.alloc.name == "vmm" else getattr(self.alloc, "capacity_bytes", 0)
        if self.alloc.name == "paged":
            kv = self.alloc.num_blocks * self.alloc.block_bytes
        if weights + kv > 0.95 * free:
            raise UserError(
                f"--model {self.spec.name}: {weights / 2**30:.1f} GiB of weights + {kv / 2**30:.1f} GiB of KV do "
                f"not fit the {free / 2**30:.1f} GiB free on the GPU; use fewer --layers or less --kv-memory"
            )

    # ---- executor protocol ----------------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> ExecResult:
        on_path = self._thread_ns() if self._thread_ns is not None else 0
        copies = self.alloc.pending_copies
        if copies:
            self.layout.apply(copies)
            copies.clear()
        if not plan.work:
            self._account(on_path, None, 0)
            return ExecResult()
        batch = self._prepare(plan.work)
        future = self._start_mapper(plan.work) if self._mapper is not None else None
        if self._cuda:
            start_ev = torch.cuda.Event(enable_timing=True)
            end_ev = torch.cuda.Event(enable_timing=True)
            start_ev.record()
        with torch.inference_mode():
            logits = self.model.forward(batch.token_ids, batch.positions, self._attend_fn(batch), batch.logits_rows)
            # The next tokens are the workload's (traces stay deterministic); the argmax is computed all the same.
            self.last_logits = logits.argmax(-1) if logits is not None else None
        kernel_ns = 0
        if self._cuda:
            end_ev.record()
            end_ev.synchronize()
            kernel_ns = int(start_ev.elapsed_time(end_ev) * 1e6)
        exposed = 0
        if future is not None:
            t0 = time.perf_counter_ns()
            future.result()
            exposed = time.perf_counter_ns() - t0
        self._account(on_path, future, exposed)
        if self.nvml is not None:
            self.nvml.drain(self.recorder)
        return ExecResult(kernel_ns=kernel_ns, kv_bytes_read=plan.kv_tokens_read * self.bytes_per_token)

    def after_step(self, forked: list[tuple[int, int]], released: list[int]) -> None:
        pass  # nothing cached per sequence: batches are rebuilt from the allocator every step

    def device_name(self) -> str:
        if self._cuda:
            return torch.cuda.get_device_name(self.torch_device)
        from kvscope.runmeta import cpu_name

        return cpu_name()

    def close(self) -> None:
        """Stop the mapper and the sampler, drop every tensor over allocator memory. Safe to call twice. The
        allocator (and its backend) are closed by their owner afterwards; `memory` records NVML used bytes."""
        if self._mapper is not None:
            self._mapper.shutdown(wait=True)
            self._mapper = None
        layout = getattr(self, "layout", None)
        if layout is not None:
            layout.close()
            self.layout = None
        self.model = None
        self.last_logits = None
        if self._cuda:
            torch.cuda.synchronize(self.torch_device)
            torch.cuda.empty_cache()
        if self.nvml is not None:
            # No drain: the engine has closed the trace by now; samples after the last step are not part of the run.
            self.memory["nvml_used_closed"] = self.nvml.used_bytes()
            self.nvml.stop()
            self.nvml = None

    # ---- the batch --------------------------------------------------------------------------------------------
    def _prepare(self, work: list[Work]) -> _Batch:
        alloc = self.alloc
        order = [w for w in work if len(w.tokens) == 1] + [w for w in work if len(w.tokens) != 1]
        n_decode = sum(1 for w in order if len(w.tokens) == 1)
        ids = np.concatenate([w.tokens for w in order]).astype(np.int64)
        positions = np.concatenate([np.arange(w.start, w.start + len(w.tokens)) for w in order])
        logits_rows, slots, segments = [], [], []
        lens, ctx, cu = [], [], [0]
        where: list[Any] = []
        off = 0
        if self.paged:
            bs = alloc.block_size
        for w in order:
            n = len(w.tokens)
            end = w.start + n
            seq = w.seq.id
            pos = np.arange(w.start, end)
            if self.paged:
                table = np.asarray(alloc.block_table(seq), dtype=np.int64)
                slots.append(table[pos // bs] * bs + pos % bs)
                where.append(table)
            else:
                base = alloc.token_base(seq)
                slots.append(base + pos)
                where.append(base)
                segments.append((base, off, w.start, n))
            if w.samples:
                logits_rows.append(off + n - 1)
            lens.append(end)
            ctx.append(w.start)
            if n != 1:
                cu.append(cu[-1] + n)
            off += n
        dev = self.torch_device

        def t(a: Any) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev, non_blocking=True)

        if self.paged:
            width = max((len(tb) for tb in where), default=1) or 1
            tables = np.zeros((len(where), width), dtype=np.int64)
            for i, tb in enumerate(where):
                tables[i, : len(tb)] = tb
            d_where, p_where = t(tables[:n_decode]), t(tables[n_decode:])
        else:
            # Views handed to Triton start at the batch's lowest row: Triton refuses a pointer that is not mapped
            # device memory, and a VMM buffer's first page may be unmapped (its slot idle); the lowest sequence of
            # the batch holds tokens, so its rows are mapped. Row indices are shifted to match.
            row0 = min(where)
            bases = np.asarray(where, dtype=np.int64) - row0
            slots = [s - row0 for s in slots]
            segments = [(base - row0, o, st, n) for base, o, st, n in segments]
            d_where, p_where = t(bases[:n_decode]), t(bases[n_decode:])
        prefill_q = [len(w.tokens) for w in order[n_decode:]]
        return _Batch(
            token_ids=t(ids),
            positions=t(positions),
            new_slots=t(np.concatenate(slots)),
            logits_rows=t(logits_rows),
            n_decode=n_decode,
            d_lens=t(lens[:n_decode]),
            d_where=d_where,
            d_max_len=max(lens[:n_decode], default=0),
            p_cu=t(cu),
            p_ctx=t(ctx[n_decode:]),
            p_where=p_where,
            p_max_q=max(prefill_q, default=0),
            segments=segments,
            row0=0 if self.paged else row0,
            order=[(w.seq.id, w.start, len(w.tokens)) for w in order],
        )

    # ---- attention ------------------------------------------------------------------------------------------------
    def _attend_fn(self, b: _Batch):
        k_ops = self.kernels
        layout = self.layout
        paged = self.paged
        sdpa = self.attention_mode == "sdpa"
        nd = b.n_decode
        scale = self.scale

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if paged:
                kc, vc = layout.pool[layer, 0], layout.pool[layer, 1]
                k_ops.store_kv_paged(k, v, kc, vc, b.new_slots)
            else:
                kc, vc = layout.keys(layer)[b.row0 :], layout.values(layer)[b.row0 :]
                k_ops.store_kv_contiguous(k, v, kc, vc, b.new_slots)
            out = torch.empty_like(q)
            if sdpa:
                self._sdpa(q, kc, vc, b, out)
            else:
                if nd:
                    decode = k_ops.paged_decode_attention if paged else k_ops.contiguous_decode_attention
                    decode(q[:nd], kc, vc, b.d_where, b.d_lens, scale, max_seq_len=b.d_max_len, out=out[:nd])
                if q.shape[0] > nd:
                    prefill = k_ops.paged_prefill_attention if paged else k_ops.contiguous_prefill_attention
                    prefill(q[nd:], kc, vc, b.p_where, b.p_cu, b.p_ctx, scale, max_query_len=b.p_max_q, out=out[nd:])
            if self.check:
                self._check(layer, q, out, b)
            return out

        return attend

    def _sdpa(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, b: _Batch, out: torch.Tensor) -> None:
        """One scaled_dot_product_attention per sequence on row views of the cache (no copy of K/V)."""
        sdpa = torch.nn.functional.scaled_dot_product_attention
        group = self.spec.q_heads // self.spec.num_kv_heads
        for base, off, start, n in b.segments:
            end = start + n
            qs = q[off : off + n].transpose(0, 1).unsqueeze(0)  # [1, q_heads, n, d]
            ks = kc[base : base + end].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, end, d]
            vs = vc[base : base + end].transpose(0, 1).unsqueeze(0)
            if group > 1:
                ks = ks.repeat_interleave(group, dim=1)
                vs = vs.repeat_interleave(group, dim=1)
            if n == 1:  # a decode sees every cached token
                res = sdpa(qs, ks, vs, scale=self.scale)
            elif start == 0:
                res = sdpa(qs, ks, vs, is_causal=True, scale=self.scale)
            else:  # a later chunk: causal, aligned to the bottom right
                mask = torch.arange(end, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]
                res = sdpa(qs, ks, vs, attn_mask=mask, scale=self.scale)
            out[off : off + n] = res.squeeze(0).transpose(0, 1)

    def _check(self, layer: int, q: torch.Tensor, out: torch.Tensor, b: _Batch) -> None:
        """Reference attention (kvscope.engine.model.attention) on K/V gathered through the allocator's rows."""
        layout = self.layout
        keys, values = layout.keys(layer), layout.values(layer)
        off = 0
        for seq, start, n in b.order:
            rows = layout.rows(seq, start + n)
            ref = attention(q[off : off + n].float(), keys[rows].float(), values[rows].float(), start)
            got = out[off : off + n].float()
            err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
            self.max_check_error = max(self.max_check_error, err)
            if not err <= self.check_tolerance:
                raise AttentionMismatch(
                    f"seq {seq} layer {layer}: {self.attention_mode} attention in the {self.alloc.name} layout differs "
                    f"from the reference by {err:.3g} (relative; tolerance {self.check_tolerance:g})"
                )
            off += n

    # ---- VMM mapping ahead ----------------------------------------------------------------------------------------
    def _start_mapper(self, work: list[Work]) -> Future:
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
        return self._mapper.submit(self._map_ahead, targets)

    def _map_ahead(self, targets: list[tuple[int, int]]) -> tuple[int, int, int, int]:
        """On the mapper thread: room for the next step. Best effort: a sequence that cannot get room now is left to
        the scheduler (preemption), so no OOM event is ever recorded for a guess."""
        alloc = self.alloc
        t0 = time.perf_counter_ns()
        groups = skipped = 0
        for seq, tokens in targets:
            try:
                have = alloc.num_tokens(seq)
                if tokens <= have:
                    continue
                if not alloc.can_append(seq, tokens - have):
                    skipped += 1
                    continue
                groups += alloc.ensure_room(seq, tokens)
            except (KVOutOfMemory, KeyError):
                skipped += 1
        wall = time.perf_counter_ns() - t0
        driver = self._thread_ns() if self._thread_ns is not None else 0
        return groups, wall, driver, skipped

    def _account(self, on_path: int, future: Future | None, exposed: int) -> None:
        m = self.mapping
        m.steps += 1
        m.on_path_driver_ns += on_path
        rec = self.recorder
        if on_path:
            rec.emit(Kind.MAP_SYNC, dur_ns=on_path)
        if future is None:
            if on_path:
                self.step_mapping.append(StepMapping(rec.step, on_path, 0, 0, 0))
            return
        groups, wall, driver, skipped = future.result()
        if on_path or driver or groups:
            self.step_mapping.append(StepMapping(rec.step, on_path, driver, exposed, groups))
        m.ahead_groups += groups
        m.ahead_wall_ns += wall
        m.ahead_driver_ns += driver
        m.exposed_ns += exposed
        m.ahead_skipped += skipped
        if groups or exposed:
            group_bytes = getattr(self.alloc, "group_bytes", 0)
            rec.emit(Kind.MAP_AHEAD, n=groups, bytes=groups * group_bytes, dur_ns=driver, aux=exposed)


def make_cuda_executor(spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions) -> CudaExecutor:
    """Factory for the executor registry (kvscope.engine.executor.register_executor('cuda', ...))."""
    return CudaExecutor(spec, allocator, options, device="cuda")


def register() -> None:
    """Make `--device cuda` use this executor."""
    from kvscope.engine.executor import register_executor

    register_executor("cuda", make_cuda_executor)
