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

Options are kvscope.engine.cuda_options.CudaOptions (ExecutorOptions.cuda). On a machine without a GPU the same
executor runs on CPU tensors (`device="cpu"`): with Triton's interpreter (TRITON_INTERPRET=1 set before
kvscope.kernels is imported), or with kvscope.kernels.reference (`kernels="reference"`, the same signatures in plain
torch), which is how its tests and the benchmarks' plumbing checks run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch

from kvscope.alloc.base import KVAllocator, RowAddressed
from kvscope.cudainfo import require_cuda
from kvscope.engine.base import ExecResult, ExecutorOptions
from kvscope.engine.costmodel import ModelCosts
from kvscope.engine.layout import KVLayout, make_layout, tensor_bytes
from kvscope.engine.map_ahead import MapAhead, MappingStats, StepMapping
from kvscope.engine.model import Attend, LlamaModel, attention
from kvscope.engine.step import StepPlan, Work
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
        self._model: LlamaModel | None = LlamaModel(spec, seed=options.seed, device=self.torch_device)
        self._layout: KVLayout | None = make_layout(spec, allocator, self.torch_device)
        if self.nvml is not None:
            self.memory["nvml_used_ready"] = self.nvml.used_bytes()
        # Last: driver calls made while building the model and the layout are setup, not steps.
        self.mapper = MapAhead(allocator, self.recorder, background=opts.background_map)
        self.background_map = self.mapper.background
        self.mapping: MappingStats = self.mapper.stats
        self.step_mapping: list[StepMapping] = self.mapper.steps  # per step, for steps that had any mapping work

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
        batch = self._prepare(plan.work)
        future = self.mapper.start(plan.work)
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
        self.mapper.finish(on_path, future)
        if self.nvml is not None:
            self.nvml.drain(self.recorder)
        return ExecResult(kernel_ns=kernel_ns, kv_bytes_read=plan.kv_tokens_read * self.bytes_per_token)

    def after_step(self, forked: list[tuple[int, int]], released: list[int]) -> None:
        pass  # nothing cached per sequence: batches are rebuilt from the allocator every step

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.torch_device) if self._cuda else cpu_name()

    def close(self) -> None:
        """Stop the mapper and the sampler, drop every tensor over allocator memory. Safe to call twice. The
        allocator (and its backend) are closed by their owner afterwards; `memory` records NVML used bytes."""
        self.mapper.close()
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
    def _prepare(self, work: list[Work]) -> _Batch:
        """The step's tensors: the layout says where each token goes (kvscope.engine.layout's `place`)."""
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
        dev = self.torch_device

        def t(a: Any) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev, non_blocking=True)

        prefill_q = [n for _, _, n in spans[n_decode:]]
        return _Batch(
            token_ids=t(ids),
            positions=t(positions),
            new_slots=t(placed.new_slots),
            logits_rows=t(logits_rows),
            n_decode=n_decode,
            d_lens=t(lens[:n_decode]),
            d_where=t(placed.where[:n_decode]),
            d_max_len=max(lens[:n_decode], default=0),
            p_cu=t(cu),
            p_ctx=t(ctx[n_decode:]),
            p_where=t(placed.where[n_decode:]),
            p_max_q=max(prefill_q, default=0),
            segments=placed.segments,
            row0=placed.row0,
            order=spans,
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

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = layout.caches(layer, b.row0)
            store(k, v, kc, vc, b.new_slots)
            out = torch.empty_like(q)
            if sdpa:
                self._sdpa(q, kc, vc, b, out)
            else:
                if nd:
                    decode(q[:nd], kc, vc, b.d_where, b.d_lens, scale, max_seq_len=b.d_max_len, out=out[:nd])
                if q.shape[0] > nd:
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
