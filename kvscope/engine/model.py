"""A Llama-shaped decoder with random weights: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

The numbers it computes are meaningless (random weights), but the shapes, the K/V it writes and the reads attention
does are those of the real architecture, which is what memory profiling needs. Attention is not done here: the
model hands each layer's q, k, v (one row per token of the step, all sequences concatenated) to an `attend`
callback, which writes k and v wherever the allocator's layout says and reads them back from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kvscope.spec import KVSpec

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# attend(layer, q [T, q_heads, hd], k [T, kv_heads, hd], v [T, kv_heads, hd]) -> attention output [T, q_heads, hd]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight


class LlamaModel:
    """Weights as plain tensors (no nn.Module: nothing here is trained). The torch and cuda executors both build this
    one model: the same seed on the same device gives the same weights, drawn there in the model's dtype."""

    def __init__(
        self, spec: KVSpec, *, seed: int = 0, device: str | torch.device = "cpu", rope_theta: float = 10000.0
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = TORCH_DTYPES[spec.dtype]
        h, hd, qh, kvh, f = spec.hidden, spec.head_dim, spec.q_heads, spec.num_kv_heads, spec.ffn
        # Drawn on the device in the model's dtype: an 8B model never takes float32 host memory.
        g = torch.Generator(device=self.device).manual_seed(seed)

        def w(rows: int, cols: int) -> torch.Tensor:
            t = torch.randn(rows, cols, generator=g, device=self.device, dtype=self.dtype)
            return t.mul_(1.0 / math.sqrt(rows))  # 1/sqrt(fan_in) keeps activations O(1) through every layer

        self.embed = torch.randn(spec.vocab_size, h, generator=g, device=self.device, dtype=self.dtype)
        self.layers = []
        for _ in range(spec.num_layers):
            self.layers.append(
                {
                    "attn_norm": torch.ones(h, device=self.device, dtype=self.dtype),
                    "wq": w(h, qh * hd),
                    "wk": w(h, kvh * hd),
                    "wv": w(h, kvh * hd),
                    "wo": w(qh * hd, h),
                    "mlp_norm": torch.ones(h, device=self.device, dtype=self.dtype),
                    "w_gate": w(h, f),
                    "w_up": w(h, f),
                    "w_down": w(f, h),
                }
            )
        self.final_norm = torch.ones(h, device=self.device, dtype=self.dtype)
        self.lm_head = w(h, spec.vocab_size)
        self.inv_freq = 1.0 / (rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=self.device) / hd))

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding (rotate-half form) of x [T, heads, head_dim] at the given absolute positions."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1)[:, None, :]
        sin = torch.cat([freqs.sin(), freqs.sin()], dim=-1)[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, attend: Attend, logits_rows: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Run all layers over the step's tokens; returns logits for `logits_rows` (rows of the step whose next
        token is sampled), or None."""
        spec = self.spec
        t = token_ids.shape[0]
        x = self.embed[token_ids % spec.vocab_size]
        for i, p in enumerate(self.layers):
            a = rms_norm(x, p["attn_norm"])
            q = (a @ p["wq"]).view(t, spec.q_heads, spec.head_dim)
            k = (a @ p["wk"]).view(t, spec.num_kv_heads, spec.head_dim)
            v = (a @ p["wv"]).view(t, spec.num_kv_heads, spec.head_dim)
            q = self.rope(q, positions)
            k = self.rope(k, positions)
            o = attend(i, q, k, v)
            x = x + o.reshape(t, spec.q_heads * spec.head_dim) @ p["wo"]
            m = rms_norm(x, p["mlp_norm"])
            x = x + (torch.nn.functional.silu(m @ p["w_gate"]) * (m @ p["w_up"])) @ p["w_down"]
        if logits_rows is None or logits_rows.numel() == 0:
            return None
        return rms_norm(x[logits_rows], self.final_norm) @ self.lm_head


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal GQA attention of n queries at positions start..start+n-1 over keys/values at positions 0..ctx-1.
    q [n, q_heads, d]; k, v [ctx, kv_heads, d] -> [n, q_heads, d]. Query head h reads kv head h // group."""
    n, qh, d = q.shape
    ctx, kvh, _ = k.shape
    group = qh // kvh
    # The group's query heads share one kv head: fold them into the query axis instead of copying K/V per head.
    qf = q.reshape(n, kvh, group, d).permute(1, 2, 0, 3).reshape(1, kvh, group * n, d)
    q_pos = torch.arange(start, start + n, device=q.device)[:, None]
    mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos  # [n, ctx]
    out = torch.nn.functional.scaled_dot_product_attention(
        qf, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), attn_mask=mask.repeat(group, 1)
    )  # [1, kvh, group * n, d]
    return out.view(kvh, group, n, d).permute(2, 0, 1, 3).reshape(n, qh, d)
