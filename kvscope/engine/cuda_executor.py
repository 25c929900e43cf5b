"""The GPU executor: a Llama-shaped model with random bf16 weights running real prefill and decode under the
engine's continuous batching, attention through kvscope's Triton kernels in each allocator's own memory.

    blocks          K/V pool [layers, 2, num_blocks, block_size, kv_heads, head_dim]; kernels read through block tables
    arena of rows   flat arena [layers, 2, rows, kv_heads, head_dim]; kernels read rows token_base .. token_base + len
    virtual buffers the allocator's own buffers over CUDA VMM pages, wrapped in place as tensors through DLPack
                    (kvscope.backends.cuda_vmm.tensor_view); the same contiguous kernels, at token_base
(the layouts, and where a batch's tokens go in each, are kvscope.engine.layout's, shared with the torch executor)

`attention="sdpa"` (row-addressed allocators) runs torch's scaled_dot_product_attention instead, one call per
sequence on views of the same memory: torch has no variable-length batched SDPA over rows at arbitrary bases, so this
path shows that unchanged kernels run on VMM memory, not how fast a batched kernel is.

Per step: drain the allocator's pending copies (fork rows, copy-on-write blocks, swaps); build the batch (decodes
first, then prefill chunks); start mapping the next step's memory ahead (kvscope.engine.map_ahead, allocators that
map); run the forward pass between two CUDA events (its time is STEP_KERNEL's dur_ns, the K/V bytes attention read
its bytes); wait for the mapper; move NVML samples into the trace.

Before the first step (issue 14) the executor measures the copy ceiling, compiles every kernel variant the run can
select (kvscope.engine.warmup) and captures the decode graphs (kvscope.engine.cuda_graphs); `warmup_info` is what
record_run writes as meta["warmup"], and `compiles_since_warmup()` counts what compiled afterwards (0 expected).
Decode-only steps replay a graph where the layout allows; other steps run eagerly. Either way each layer's
attention is timed alone with CUDA events (STEP_ATTENTION).

This module is longer than 400 lines: the step (host batch, eager and graph paths, timing, checks) is one unit
that shares the executor's state; the warm-up and the graphs live in their own modules.

Options are kvscope.engine.cuda_options.CudaOptions (ExecutorOptions.cuda). On a machine without a GPU the same
executor runs on CPU tensors (`device="cpu"`): with Triton's interpreter (TRITON_INTERPRET=1 set before
kvscope.kernels is imported), or with kvscope.kernels.reference (`kernels="reference"`, the same signatures in plain
torch), which is how its tests and the benchmarks' plumbing checks run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch

from kvscope.alloc.base import KVAllocator, RowAddressed
from kvscope.cudainfo import require_cuda
from kvscope.engine import nvtx
from kvscope.engine.base import ExecResult, ExecutorOptions
from kvscope.engine.costmodel import ModelCosts
from kvscope.engine.cuda_graphs import DecodeGraphs, bucket_for
from kvscope.engine.layout import KVLayout, make_layout, tensor_bytes
from kvscope.engine.map_ahead import MapAhead, MappingStats, StepMapping
from kvscope.engine.model import Attend, LlamaModel, attention
from kvscope.engine.nvtx import nvtx_range
from kvscope.engine.step import StepPlan, Work
from kvscope.engine.warmup import copy_ceiling, warm_kernels
from kvscope.errors import UserError
from kvscope.nvml import NvmlSampler
from kvscope.runmeta import cpu_name
from kvscope.spec import KVSpec


class AttentionMismatch(AssertionError):
    """With `check` on: kernel attention differs from the reference computed on the same K/V."""


@dataclass
class _Batch:
    """One step's tensors: rows in order [decodes..., prefill chunks...]."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    new_slots: torch.Tensor  # where each new token's K/V goes: a row (contiguous layouts) or a slot (paged)
    logits_rows: torch.Tensor
    n_decode: int
    d_lens: torch.Tensor  # [n_decode] tokens attended, the new one included
    d_where: torch.Tensor  # [n_decode] base rows, or [n_decode, max_blocks] block tables
    d_max_len: int
    p_cu: torch.Tensor  # [n_prefill + 1]
    p_ctx: torch.Tensor  # [n_prefill] tokens cached before the chunk
    p_where: torch.Tensor
    p_max_q: int
    segments: list[tuple[int, int, int, int]] = field(default_factory=list)  # (base, row offset, start, n): sdpa
    row0: int = 0  # contiguous layouts: row of the cache views' first element (bases and slots are relative to it)
    order: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, start, n) per row group, for checks


@dataclass
class _HostBatch:
    """One step's inputs on the host (numpy), before they become a _Batch or fill a CUDA graph's inputs."""

    ids: np.ndarray
    positions: np.ndarray
    new_slots: np.ndarray
    logits_rows: np.ndarray
    n_decode: int
    lens: np.ndarray  # tokens attended per row, the new ones included
    ctx: np.ndarray  # tokens cached before the row's chunk
    cu: np.ndarray  # prefill chunk boundaries
    where: np.ndarray  # base rows [rows], or block tables [rows, max_blocks]
    prefill_q: list[int]
    segments: list[tuple[int, int, int, int]]
    row0: int
    order: list[tuple[int, int, int]]


def _kernel_ops(impl: str) -> ModuleType:
    """kvscope.kernels (Triton), or kvscope.kernels.reference: the same functions in plain torch."""
    if impl == "reference":
        from kvscope.kernels import reference

        return reference
    from kvscope import kernels  # triton

    return kernels


class CudaExecutor:
    """Executor protocol (kvscope.engine.base): execute(plan), after_step(forked, released), device_name(), close().
    `mapping` / `step_mapping` hold the run's mapping time (kvscope.engine.map_ahead), `memory` NVML used bytes at
    start, when ready and at close, `max_check_error` the largest difference `check` found."""

    measured = True

    def __init__(
        self, spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions | None = None, *, device: str = "cuda"
    ) -> None:
        options = options or ExecutorOptions()
        opts = options.cuda
        self.attention_mode = opts.attention
        if self.attention_mode == "sdpa" and not isinstance(allocator, RowAddressed):
            raise ValueError(
                f"--attention sdpa: needs contiguous K/V (a row-addressed allocator such as static or vmm); "
                f"{allocator.name} runs use triton"
            )
        self.kernels = _kernel_ops(opts.kernels)
        self.device = device
        self.torch_device = torch.device(device)
        if self.torch_device.type == "cuda":
            require_cuda()
            if self.torch_device.index is None:
                self.torch_device = torch.device("cuda", torch.cuda.current_device())
        self._cuda = self.torch_device.type == "cuda"
        self.spec = spec
        self.alloc = allocator
        self.recorder = allocator.recorder
        self.bytes_per_token = spec.bytes_per_token
        self.scale = 1.0 / math.sqrt(spec.head_dim)
        self.check = options.shadow if opts.check is None else opts.check
        self.check_tolerance = max(options.shadow_tolerance, 2e-2 if spec.dtype_bytes == 2 else 0.0)
        self.max_check_error = 0.0
        self.memory: dict[str, int] = {}
        self.last_logits: torch.Tensor | None = None

        self.nvml: NvmlSampler | None = None
        if self._cuda and opts.nvml:
            self.nvml = NvmlSampler.try_start(
                self.torch_device.index or 0, interval_s=opts.nvml_interval_s, clock=self.recorder.now_ns
            )
            if self.nvml is not None:
                self.memory["nvml_used_start"] = self.nvml.used_bytes()
        self._check_fits()
        self.opts = opts
        # Before the first step (issue 14): the copy ceiling, every kernel variant compiled, the decode graphs
        # captured. `warmup_info` goes into the trace's metadata (meta["warmup"]).
        self.warmup_info: dict[str, Any] = {}
        self.copy_ceiling_tbps: float | None = None
        if self._cuda and opts.warmup:
            t0 = time.perf_counter()
            self.warmup_info.update(copy_ceiling(self.torch_device))
            self.copy_ceiling_tbps = self.warmup_info["copy_ceiling_tbps"]
            self.warmup_info["copy_ceiling_s"] = time.perf_counter() - t0
        self._model: LlamaModel | None = LlamaModel(spec, seed=options.seed, device=self.torch_device)
        self._layout: KVLayout | None = make_layout(spec, allocator, self.torch_device)
        nvtx.enable(self._cuda and opts.nvtx)
        self.graphs: DecodeGraphs | None = None
        self.graph_reason = self._graph_reason()
        self._compiled_after_warmup = 0
        if self._cuda and opts.warmup:
            self._warm_up()
        if self.nvml is not None:
            self.memory["nvml_used_ready"] = self.nvml.used_bytes()
        self.graph_steps = 0
        self.eager_steps = 0
        self._timed_layers = 0
        self._attn_events: list[tuple[Any, Any]] = []  # (start, end) per layer, reused every eager step
        if self._cuda and opts.attention_timing:
            self._attn_events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                for _ in range(spec.num_layers)
            ]
        # Last: driver calls made while building the model and the layout are setup, not steps.
        self.mapper = MapAhead(allocator, self.recorder, background=opts.background_map)
        self.background_map = self.mapper.background
        self.mapping: MappingStats = self.mapper.stats
        self.step_mapping: list[StepMapping] = self.mapper.steps  # per step, for steps that had any mapping work

    def _graph_reason(self) -> str | None:
        """Why decode steps run eagerly in this run (None: they replay CUDA graphs)."""
        if not self._cuda:
            return "not on a GPU"
        if not self.opts.cuda_graphs:
            return "--eager"
        if not self.opts.warmup:
            return "no warm-up"
        if self.attention_mode != "triton" or self.opts.kernels != "triton":
            return f"attention {self.attention_mode} / kernels {self.opts.kernels}"
        if self.check:
            return "attention checks compare every layer"
        return None

    def _warm_up(self) -> None:
        from kvscope.kernels.compiles import compiled_variants, total_compiled

        info = self.warmup_info
        t0 = time.perf_counter()
        if self.attention_mode == "triton":
            warm_kernels(self.spec, self.model, self.layout, self.kernels, self.opts.max_len, self.opts.max_batch)
        info["compile_s"] = time.perf_counter() - t0
        info["compiled_variants"] = compiled_variants()
        info["graph_capture_s"] = 0.0
        if self.graph_reason is None:
            self.graphs = DecodeGraphs(
                self.spec,
                self.model,
                self.layout,
                self.kernels,
                max_len=self.opts.max_len,
                max_batch=self.opts.max_batch,
                scale=self.scale,
                time_attention=self.opts.attention_timing,
            )
            self.graphs.capture()
            info["graph_capture_s"] = self.graphs.capture_s
            info["graph_buckets"] = self.graphs.buckets
        info["cuda_graphs"] = self.graphs is not None
        info["graph_reason"] = self.graph_reason
        self._compiled_after_warmup = total_compiled()
        info["seconds"] = info.get("copy_ceiling_s", 0.0) + time.perf_counter() - t0

    def compiles_since_warmup(self) -> int:
        """Kernel variants compiled after the warm-up (0 in a run that compiled nothing while measured)."""
        from kvscope.kernels.compiles import total_compiled

        return total_compiled() - self._compiled_after_warmup

    @property
    def model(self) -> LlamaModel:
        if self._model is None:
            raise RuntimeError("cuda executor: closed")
        return self._model

    @property
    def layout(self) -> KVLayout:
        if self._layout is None:
            raise RuntimeError("cuda executor: closed")
        return self._layout

    def _check_fits(self) -> None:
        if not self._cuda:
            return
        weights = ModelCosts.from_spec(self.spec).weight_bytes
        free, _ = torch.cuda.mem_get_info(self.torch_device)
        kv = tensor_bytes(self.alloc)
        if weights + kv > 0.95 * free:
            raise UserError(
                f"--model {self.spec.name}: {weights / 2**30:.1f} GiB of weights + {kv / 2**30:.1f} GiB of KV do "
                f"not fit the {free / 2**30:.1f} GiB free on the GPU; use fewer --layers or less --kv-memory"
            )

    # ---- executor protocol ----------------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> ExecResult:
        on_path = self.mapper.begin()
        copies = self.alloc.pending_copies
        if copies:
            self.layout.apply(copies)
            copies.clear()
        if not plan.work:
            self.mapper.finish(on_path, None)
            return ExecResult()
        host = self._host_batch(plan.work)
        graphs = self.graphs
        use_graph = (
            graphs is not None
            and host.n_decode == len(plan.work)
            and bucket_for(host.n_decode, graphs.buckets) is not None
        )
        batch = None if use_graph else self._to_device(host)
        future = self.mapper.start(plan.work)
        if self._cuda:
            start_ev = torch.cuda.Event(enable_timing=True)
            end_ev = torch.cuda.Event(enable_timing=True)
            start_ev.record()
        timed_layers = 0
        bucket = 0
        if use_graph:
            assert graphs is not None
            with nvtx_range("decode (graph)"):
                where = host.where + host.row0 if self.layout.contiguous else host.where
                self.last_logits, _, bucket = graphs.run(
                    host.ids, host.positions, host.new_slots + host.row0, host.lens, where
                )
            self.graph_steps += 1
        else:
            assert batch is not None
            kind = "decode" if host.n_decode == len(plan.work) else ("prefill" if host.n_decode == 0 else "mixed")
            with nvtx_range(kind), torch.inference_mode():
                attend = self._attend_fn(batch)
                logits = self.model.forward(batch.token_ids, batch.positions, attend, batch.logits_rows)
                # The next tokens are the workload's (traces stay deterministic); the argmax is computed all the same.
                self.last_logits = logits.argmax(-1) if logits is not None else None
            timed_layers = self._timed_layers
            self.eager_steps += 1
        kernel_ns = attention_ns = 0
        if self._cuda:
            end_ev.record()
            end_ev.synchronize()
            kernel_ns = int(start_ev.elapsed_time(end_ev) * 1e6)
            if use_graph and graphs is not None:
                attention_ns = graphs.attention_ns(bucket)
                timed_layers = self.spec.num_layers if attention_ns else 0
            elif timed_layers:
                attention_ns = int(sum(s.elapsed_time(e) for s, e in self._attn_events[:timed_layers]) * 1e6)
        self.mapper.finish(on_path, future)
        if self.nvml is not None:
            self.nvml.drain(self.recorder)
        return ExecResult(
            kernel_ns=kernel_ns,
            kv_bytes_read=plan.kv_tokens_read * self.bytes_per_token,
            attention_ns=attention_ns,
            attention_layers=timed_layers,
            graph=use_graph,
        )

    def after_step(self, forked: list[tuple[int, int]], released: list[int]) -> None:
        pass  # nothing cached per sequence: batches are rebuilt from the allocator every step

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.torch_device) if self._cuda else cpu_name()

    def close(self) -> None:
        """Stop the mapper and the sampler, drop every tensor over allocator memory. Safe to call twice. The
        allocator (and its backend) are closed by their owner afterwards; `memory` records NVML used bytes."""
        self.mapper.close()
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
        if self._layout is not None:
            self._layout.close()
            self._layout = None
        self._model = None
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
    def _host_batch(self, work: list[Work]) -> _HostBatch:
        """The step's inputs as host arrays: the layout says where each token goes (kvscope.engine.layout's
        `place`); rows in order [decodes..., prefill chunks...]."""
        order = [w for w in work if len(w.tokens) == 1] + [w for w in work if len(w.tokens) != 1]
        n_decode = sum(1 for w in order if len(w.tokens) == 1)
        spans = [(w.seq.id, w.start, len(w.tokens)) for w in order]
        placed = self.layout.place(spans)
        ids = np.concatenate([w.tokens for w in order]).astype(np.int64)
        positions = np.concatenate([np.arange(start, start + n) for _, start, n in spans])
        logits_rows, lens, ctx, cu = [], [], [], [0]
        off = 0
        for w, (_, start, n) in zip(order, spans, strict=True):
            if w.samples:
                logits_rows.append(off + n - 1)
            lens.append(start + n)
            ctx.append(start)
            if n != 1:
                cu.append(cu[-1] + n)
            off += n
        return _HostBatch(
            ids=ids,
            positions=positions,
            new_slots=np.asarray(placed.new_slots, dtype=np.int64),
            logits_rows=np.asarray(logits_rows, dtype=np.int64),
            n_decode=n_decode,
            lens=np.asarray(lens, dtype=np.int64),
            ctx=np.asarray(ctx, dtype=np.int64),
            cu=np.asarray(cu, dtype=np.int64),
            where=np.asarray(placed.where, dtype=np.int64),
            prefill_q=[n for _, _, n in spans[n_decode:]],
            segments=placed.segments,
            row0=placed.row0,
            order=spans,
        )

    def _to_device(self, h: _HostBatch) -> _Batch:
        dev = self.torch_device

        def t(a: Any) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev, non_blocking=True)

        nd = h.n_decode
        return _Batch(
            token_ids=t(h.ids),
            positions=t(h.positions),
            new_slots=t(h.new_slots),
            logits_rows=t(h.logits_rows),
            n_decode=nd,
            d_lens=t(h.lens[:nd]),
            d_where=t(h.where[:nd]),
            d_max_len=int(h.lens[:nd].max()) if nd else 0,
            p_cu=t(h.cu),
            p_ctx=t(h.ctx[nd:]),
            p_where=t(h.where[nd:]),
            p_max_q=max(h.prefill_q, default=0),
            segments=h.segments,
            row0=h.row0,
            order=h.order,
        )

    # ---- attention ------------------------------------------------------------------------------------------------
    def _attend_fn(self, b: _Batch) -> Attend:
        k_ops = self.kernels
        layout = self.layout
        contiguous = layout.contiguous
        store = k_ops.store_kv_contiguous if contiguous else k_ops.store_kv_paged
        decode = k_ops.contiguous_decode_attention if contiguous else k_ops.paged_decode_attention
        prefill = k_ops.contiguous_prefill_attention if contiguous else k_ops.paged_prefill_attention
        sdpa = self.attention_mode == "sdpa"
        nd = b.n_decode
        scale = self.scale

        events = self._attn_events
        self._timed_layers = 0

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = layout.caches(layer, b.row0)
            store(k, v, kc, vc, b.new_slots)
            out = torch.empty_like(q)
            timed = layer < len(events)
            if timed:
                events[layer][0].record()
            with nvtx_range("attention"):
                if sdpa:
                    self._sdpa(q, kc, vc, b, out)
                else:
                    if nd:
                        decode(q[:nd], kc, vc, b.d_where, b.d_lens, scale, max_seq_len=b.d_max_len, out=out[:nd])
                    if q.shape[0] > nd:
                        prefill(
                            q[nd:], kc, vc, b.p_where, b.p_cu, b.p_ctx, scale, max_query_len=b.p_max_q, out=out[nd:]
                        )
            if timed:
                events[layer][1].record()
                self._timed_layers = layer + 1
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
