"""Decode-only steps as CUDA graphs, one per batch bucket (nano-vllm's scheme: 1, 2, 4, 8, then every 16 up to the
engine's max batch), captured before the first step, sharing one memory pool.

A graph replays the whole forward pass (embedding, every layer's projections, KV store, decode attention, MLP, the
logits of every row and their argmax) on static input tensors: the step's token ids, positions, KV slots, lengths
and block tables (or base rows) are copied into them from one pinned host buffer (one host-to-device copy), rows past
the real batch padded (slot -1: nothing stored; length 0: attention reads nothing). The decode kernel's split-K grid is
fixed at capture for the longest sequence the engine allows (max_len); the split size is a device scalar written
each step, so every split does work whatever the step's longest sequence.

Graphs need addresses that stay valid: the paged pool and the static arena are torch tensors, and VMM buffers keep
their virtual addresses for the whole run whatever pages are mapped under them. Triton refuses unmapped pointers at
launch, and no VMM page is mapped before the first request, so the vmm layout lends a scratch page at each buffer's
base while the graphs are captured (`VmmLayout.mapped_for_capture`). Attention is timed inside the graph by CUDA
events recorded as graph nodes (torch.cuda.Event(external=True)) around each layer's attention.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvscope.engine.layout import KVLayout
from kvscope.engine.model import LlamaModel
from kvscope.spec import KVSpec

if TYPE_CHECKING:
    from kvscope.kernels.common import DecodeConfig


def _graph_event() -> torch.cuda.Event:
    """A timing event that a graph capture records as a node (replays then record it)."""
    return torch.cuda.Event(enable_timing=True, external=True)


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, 16, 32, 48, ... up to max_batch (included)."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sorted(set(sizes))


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding n rows, or None past the largest."""
    for b in buckets:
        if b >= n:
            return b
    return None


class DecodeGraphs:
    """Captured decode steps over `layout`'s caches. `run(...)` fills the inputs, replays the bucket's graph and
    returns the argmax of each real row plus the attention time (ns, 0 when not timed)."""

    def __init__(
        self,
        spec: KVSpec,
        model: LlamaModel,
        layout: KVLayout,
        kernels: Any,
        *,
        max_len: int,
        max_batch: int,
        scale: float,
        time_attention: bool,
    ) -> None:
        from kvscope.kernels.decode import plan_splits
        from kvscope.kernels.decode_tiles import decode_plan

        self.spec, self.model, self.layout, self.kernels = spec, model, layout, kernels
        self.device = model.device
        self.max_len = max_len
        self.scale = scale
        self.buckets = batch_buckets(max_batch)
        self.paged = not layout.contiguous
        self.width = -(-max_len // layout.bs) if self.paged else 1  # type: ignore[attr-defined]
        big = self.buckets[-1]
        w = self.width
        # the tiles and split-K grid of each bucket, fixed at capture for the longest sequence the engine allows
        self.configs: dict[int, DecodeConfig] = {}
        for b in self.buckets:
            plan = decode_plan(b, spec.num_kv_heads, max_len, spec.head_dim, model.dtype, self.device, paged=self.paged)
            first = plan_splits(b, spec.num_kv_heads, max_len, plan, self.device)
            fixed = replace(plan, num_splits=first)
            self.configs[b] = replace(plan, num_splits=plan_splits(b, spec.num_kv_heads, max_len, fixed, self.device))
        # one packed int64 buffer: ids | positions | slots | lens | where (big x width) | split_len
        self._offs = np.cumsum([0, big, big, big, big, big * w, 1])
        size = int(self._offs[-1])
        self.host = torch.empty(size, dtype=torch.int64, pin_memory=True)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(size, dtype=torch.int64, device=self.device)
        o = self._offs
        self.ids, self.pos, self.slots, self.lens = (self.dev[o[i] : o[i + 1]] for i in range(4))
        self.where = self.dev[o[4] : o[5]].view(big, w) if self.paged else self.dev[o[4] : o[5]]
        self.split_len = self.dev[o[5] : o[6]]
        self.rows = torch.arange(big, dtype=torch.int64, device=self.device)
        self.caches = [layout.caches(layer, 0) for layer in range(spec.num_layers)]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.time_attention = time_attention
        self.events: dict[int, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {}
        self.capture_s = 0.0

    # ---- capture ------------------------------------------------------------------------------------------------
    def capture(self) -> None:
        t0 = time.perf_counter()
        self._fill_padding(self.buckets[-1])
        pool = None
        # layouts over memory mapped on demand (vmm) lend pages for the capture: Triton checks pointers at launch
        lend = getattr(self.layout, "mapped_for_capture", nullcontext)
        with lend():
            for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory
                pool = self._capture(b, pool)
            torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0

    def _attend(self, b: int) -> Any:
        k_ops = self.kernels
        store = k_ops.store_kv_paged if self.paged else k_ops.store_kv_contiguous
        decode = k_ops.paged_decode_attention if self.paged else k_ops.contiguous_decode_attention
        cfg = self.configs[b]
        events = self.events.get(b, [])
        slots, lens, where, split_len = self.slots[:b], self.lens[:b], self.where[:b], self.split_len

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kc, vc = self.caches[layer]
            store(k, v, kc, vc, slots)
            out = torch.empty_like(q)
            if events:
                events[layer][0].record()
            decode(q, kc, vc, where, lens, self.scale, max_seq_len=self.max_len, out=out, config=cfg,
                   split_len=split_len)  # fmt: skip
            if events:
                events[layer][1].record()
            return out

        return attend

    def _forward(self, b: int) -> torch.Tensor:
        logits = self.model.forward(self.ids[:b], self.pos[:b], self._attend(b), self.rows[:b])
        assert logits is not None
        return logits.argmax(-1)

    def _capture(self, b: int, pool: Any) -> Any:
        if self.time_attention:
            try:
                self.events[b] = [(_graph_event(), _graph_event()) for _ in range(self.spec.num_layers)]
            except (TypeError, RuntimeError):  # a torch without graph-node events: the graphs go untimed
                self.time_attention = False
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            with torch.cuda.stream(side):
                self._forward(b)  # outside the capture: lazy initialisation, allocator warm-up
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs[b] = self._forward(b)
        self.graphs[b] = graph
        return graph.pool()

    def _fill_padding(self, n_from: int) -> None:
        o, h = self._offs, self.host_np
        h[o[0] : o[2]] = 0  # ids, positions
        h[o[2] : o[3]] = -1  # slots: store nothing
        h[o[3] : o[4]] = 0  # lens: read nothing
        h[o[4] : o[5]] = 0
        h[o[5]] = 16  # the kernels round a split up to whole tiles of their own
        self.dev.copy_(self.host)

    # ---- replay -------------------------------------------------------------------------------------------------
    def run(
        self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, lens: np.ndarray, where: np.ndarray
    ) -> tuple[torch.Tensor, int, int]:
        """One decode step of n = len(ids) rows: (argmax [n], attention ns, bucket). `where`: block tables [n, w]
        (paged) or absolute base rows [n]."""
        from kvscope.kernels.decode import split_length

        n = len(ids)
        b = bucket_for(n, self.buckets)
        assert b is not None
        o, h = self._offs, self.host_np
        big, w = self.buckets[-1], self.width
        h[o[0] : o[0] + n] = ids
        h[o[1] : o[1] + n] = positions
        h[o[2] : o[2] + n] = slots
        h[o[2] + n : o[2] + b] = -1
        h[o[3] : o[3] + n] = lens
        h[o[3] + n : o[3] + b] = 0
        if self.paged:
            tables = h[o[4] : o[5]].reshape(big, w)
            tables[:n, : where.shape[1]] = where
        else:
            h[o[4] : o[4] + n] = where
        h[o[5]] = split_length(int(lens.max()), self.configs[b].num_splits, self.configs[b].block_n)
        self.dev.copy_(self.host, non_blocking=True)
        self.graphs[b].replay()
        return self.outputs[b][:n], 0, b

    def attention_ns(self, b: int) -> int:
        """Attention time of the last replay of bucket b (after the step's end was synchronized)."""
        pairs = self.events.get(b)
        if not pairs:
            return 0
        try:
            return int(sum(s.elapsed_time(e) for s, e in pairs) * 1e6)
        except RuntimeError:  # the driver would not time graph-recorded events: stop trying
            self.events.clear()
            return 0

    def close(self) -> None:
        self.graphs.clear()
        self.outputs.clear()
        self.events.clear()
        self.caches = []
