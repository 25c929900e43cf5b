"""Real forward passes with torch: the Llama-shaped model, K/V written into and read from the allocator's layout.

Token ids are the workload's deterministic ones (prefix caching and traces stay deterministic); logits are computed
for every sequence that samples in the step, but the next token is the workload's, not the logits' argmax.

Shadow mode (tests, debugging): every sequence's K/V is also kept in a plain contiguous tensor, and each attention
call is recomputed on it; any difference beyond the tolerance raises ShadowMismatch naming the layer and sequence.
Prefix-cache hits, which this sequence never computed, are recomputed into the shadow from the token ids, so the
shadow never trusts the allocator's bookkeeping.
"""

from __future__ import annotations

import numpy as np
import torch

from kvscope.alloc.base import KVAllocator
from kvscope.engine.base import ExecResult, ExecutorOptions
from kvscope.engine.costmodel import ModelCosts
from kvscope.engine.layout import make_layout
from kvscope.engine.model import LlamaModel, attention
from kvscope.engine.step import StepPlan, Work
from kvscope.errors import UserError
from kvscope.runmeta import cpu_name
from kvscope.spec import KVSpec
from kvscope.units import format_bytes

MAX_WEIGHT_BYTES = {"cpu": 4 << 30, "cuda": 200 << 30}
SINGLE_THREAD_MAX_HIDDEN = 1024


class ShadowMismatch(AssertionError):
    """Attention through the allocator's layout differs from attention on the contiguous shadow copy."""


class TorchExecutor:
    measured = True

    def __init__(
        self, spec: KVSpec, allocator: KVAllocator, options: ExecutorOptions | None = None, *, device: str = "cpu"
    ) -> None:
        options = options or ExecutorOptions()
        weights = ModelCosts.from_spec(spec).weight_bytes
        if weights > MAX_WEIGHT_BYTES.get(device, 0):
            raise UserError(
                f"--model {spec.name}: {weights / 2**30:.1f} GiB of weights is too much for --device {device}; "
                "use --model tiny, fewer --layers, or --device sim"
            )
        self.device = device
        self.torch_device = torch.device(device)
        self.spec = spec
        self.alloc = allocator
        self.model = LlamaModel(spec, seed=options.seed, device=self.torch_device)
        try:
            self.layout = make_layout(spec, allocator, self.torch_device)
        except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator refusing
            if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e):
                raise
            raise UserError(
                f"--kv-memory {format_bytes(allocator.usage().capacity)}: could not allocate the KV tensors on "
                f"{device} ({str(e).splitlines()[0]}); use a smaller --kv-memory"
            ) from None
        self.bytes_per_token = spec.bytes_per_token
        self.tolerance = options.shadow_tolerance
        # seq -> per layer [k, v], contiguous [tokens, kv_heads, head_dim] (None until the layer's first tokens)
        self.shadow: dict[int, list[list[torch.Tensor | None]]] | None = {} if options.shadow else None
        self.max_shadow_error = 0.0
        self.shadow_checks = 0  # attention outputs compared with the shadow
        self.last_logits: torch.Tensor | None = None
        self._cuda = self.torch_device.type == "cuda"
        # Small models: intra-op threads only add synchronization (20x slower on a busy 2-core machine). The setting
        # is process-wide, so it is restored by close().
        self._threads_before = torch.get_num_threads()
        if not self._cuda and spec.hidden <= SINGLE_THREAD_MAX_HIDDEN:
            torch.set_num_threads(1)

    # ---- executor protocol ----------------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> ExecResult:
        copies = self.alloc.pending_copies
        if copies:
            self.layout.apply(copies)
            copies.clear()
        if not plan.work:
            return ExecResult()
        if self.shadow is not None:
            for w in plan.work:
                if w.fresh:
                    self._shadow_prefix(w)
        if self._cuda:
            start_ev = torch.cuda.Event(enable_timing=True)
            end_ev = torch.cuda.Event(enable_timing=True)
            start_ev.record()
        self.last_logits = self._forward(plan.work)
        kernel_ns = 0
        if self._cuda:
            end_ev.record()
            end_ev.synchronize()
            kernel_ns = int(start_ev.elapsed_time(end_ev) * 1e6)
        return ExecResult(kernel_ns=kernel_ns, kv_bytes_read=plan.kv_tokens_read * self.bytes_per_token)

    def after_step(self, forked: list[tuple[int, int]], released: list[int]) -> None:
        if self.shadow is None:
            return
        for parent, child in forked:
            self.shadow[child] = [[_clone(k), _clone(v)] for k, v in self.shadow[parent]]
        for seq in released:
            self.shadow.pop(seq, None)

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.torch_device) if self._cuda else cpu_name()

    def close(self) -> None:
        self.layout.close()
        torch.set_num_threads(self._threads_before)

    # ---- forward ----------------------------------------------------------------------------------------------
    def _forward(self, work: list[Work]) -> torch.Tensor | None:
        """One forward pass over the step. Per layer: every new token's K/V is written through the layout first
        (a prefix block computed in this step may be read by another sequence), then attention reads it back:
        decodes as one padded batch, prefills one sequence at a time."""
        dev = self.torch_device
        tokens = torch.from_numpy(np.concatenate([w.tokens for w in work]).astype(np.int64)).to(dev)
        positions = torch.cat([torch.arange(w.start, w.start + len(w.tokens)) for w in work]).to(dev)
        prefills = []  # (work, offset in the step's rows, new tokens, rows of tokens 0..end-1)
        decode_at: list[int] = []  # offsets of the decode tokens
        decode_rows: list[torch.Tensor] = []
        new_rows: list[torch.Tensor] = []
        logits_rows = []
        off = 0
        for w in work:
            n = len(w.tokens)
            rows = self.layout.rows(w.seq.id, w.start + n)
            new_rows.append(rows[w.start :])
            if w.prefill:
                prefills.append((w, off, n, rows))
            else:
                decode_at.append(off)
                decode_rows.append(rows)
            off += n
            if w.samples:
                logits_rows.append(off - 1)
        write_rows = torch.cat(new_rows)
        batch = _DecodeBatch(decode_at, decode_rows, dev) if decode_at else None
        layout = self.layout
        shadow = self.shadow
        decode_work = [w for w in work if not w.prefill]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = layout.keys(layer), layout.values(layer)
            keys.index_copy_(0, write_rows, k)
            values.index_copy_(0, write_rows, v)
            out = torch.empty_like(q)
            for w, o, n, rows in prefills:
                out[o : o + n] = attention(
                    q[o : o + n], keys.index_select(0, rows), values.index_select(0, rows), w.start
                )
            if batch is not None:
                out[batch.at] = batch.attend(q[batch.at], keys, values)
            if shadow is not None:
                self._check_shadow(layer, prefills, decode_work, batch, q, k, v, out)
            return out

        rows_t = torch.tensor(logits_rows, dtype=torch.int64, device=dev)
        with torch.inference_mode():
            return self.model.forward(tokens, positions, attend, rows_t)

    def _check_shadow(self, layer, prefills, decode_work, batch, q, k, v, out) -> None:
        for w, o, n, _ in prefills:
            sk, sv = self._shadow_append(w.seq.id, layer, w.start, k[o : o + n], v[o : o + n])
            self._compare(out[o : o + n], attention(q[o : o + n], sk, sv, w.start), layer, w.seq.id)
        if batch is not None:
            for w, o in zip(decode_work, batch.at.tolist(), strict=True):
                sk, sv = self._shadow_append(w.seq.id, layer, w.start, k[o : o + 1], v[o : o + 1])
                self._compare(out[o : o + 1], attention(q[o : o + 1], sk, sv, w.start), layer, w.seq.id)

    # ---- shadow copy --------------------------------------------------------------------------------------------
    def _shadow_prefix(self, w: Work) -> None:
        """A (re)admitted sequence starts a new shadow; prefix-cache hits are recomputed into it from token ids."""
        seq = w.seq.id
        assert self.shadow is not None
        self.shadow[seq] = [[None, None] for _ in range(self.spec.num_layers)]
        if w.hit == 0:
            return
        ids = torch.from_numpy(w.seq.prompt[: w.hit].astype(np.int64)).to(self.torch_device)
        pos = torch.arange(w.hit, device=self.torch_device)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            sk, sv = self._shadow_append(seq, layer, 0, k, v)
            return attention(q, sk, sv, 0)

        with torch.inference_mode():
            self.model.forward(ids, pos, attend, None)

    def _shadow_append(
        self, seq: int, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.shadow is not None
        entry = self.shadow[seq][layer]
        sk, sv = entry
        have = 0 if sk is None else sk.shape[0]
        if have != start:
            raise ShadowMismatch(f"seq {seq} layer {layer}: shadow holds {have} tokens, the step writes at {start}")
        sk = k.clone() if sk is None else torch.cat([sk, k])
        sv = v.clone() if sv is None else torch.cat([sv, v])
        entry[0], entry[1] = sk, sv
        return sk, sv

    def _compare(self, got: torch.Tensor, ref: torch.Tensor, layer: int, seq: int) -> None:
        err = float((got.float() - ref.float()).abs().max())
        self.shadow_checks += 1
        self.max_shadow_error = max(self.max_shadow_error, err)
        if not err <= self.tolerance:
            raise ShadowMismatch(
                f"seq {seq} layer {layer}: attention through the {self.alloc.name} layout differs from the "
                f"contiguous reference by {err:.3g} (tolerance {self.tolerance:g})"
            )


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


class _DecodeBatch:
    """Decode tokens of a step as one padded attention call: row ids [B, C] (padding repeats each sequence's first
    row, real data, so no garbage from never-written memory reaches the softmax) and a mask [B, C]."""

    def __init__(self, at: list[int], rows: list[torch.Tensor], device: torch.device) -> None:
        self.at = torch.tensor(at, dtype=torch.int64, device=device)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        width = int(lengths.max())
        self.index = torch.stack([torch.cat([r, r[:1].expand(width - len(r))]) for r in rows])  # [B, C]
        self.mask = torch.arange(width, device=device)[None, :] < lengths[:, None]  # [B, C]

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """q [B, q_heads, d] (one token per sequence) -> [B, q_heads, d]."""
        b, width = self.index.shape
        flat = self.index.reshape(-1)
        kvh, d = keys.shape[1], keys.shape[2]
        k = keys.index_select(0, flat).view(b, width, kvh, d).transpose(1, 2)  # [B, kvh, C, d]
        v = values.index_select(0, flat).view(b, width, kvh, d).transpose(1, 2)
        group = q.shape[1] // kvh
        # A kv head's `group` query heads become its query rows (they share K/V and, for one token, the mask).
        out = torch.nn.functional.scaled_dot_product_attention(
            q.view(b, kvh, group, d), k, v, attn_mask=self.mask[:, None, None, :]
        )  # [B, kvh, group, d]
        return out.reshape(b, kvh * group, d)
