"""Roofline cost model for `--device sim`: how long one engine step would take on a GPU.

A step reads every weight once (decode is memory-bound), reads the K/V of every sequence in the batch (attention),
writes the new tokens' K/V, and does 2 FLOPs per parameter per token plus the attention FLOPs. Its time is the larger
of (bytes / achievable bandwidth) and (FLOPs / achievable compute), plus a fixed per-step overhead (scheduling and
kernel launches). The constants are an H100 SXM's; efficiencies turn datasheet peaks into what good kernels reach
(~3.0 TB/s of the 3.35 TB/s datasheet figure, what copies and SDPA decode reach on an H100 SXM).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvscope.spec import KVSpec


@dataclass(frozen=True)
class GPUCostModel:
    name: str = "H100 SXM 80GB, roofline model"
    hbm_bandwidth: float = 3.35e12  # bytes/s, datasheet
    bandwidth_efficiency: float = 0.9  # ~3.0 TB/s achieved
    peak_flops: float = 989e12  # dense bf16 tensor-core FLOP/s, datasheet
    flops_efficiency: float = 0.6  # a good prefill reaches ~55-65% of peak
    step_overhead_ns: int = 100_000  # scheduling + kernel launches per step (with CUDA graphs for decode)
    # Host link, for copies between the GPU and CPU memory (the prefix cache's CPU tier: pcie_time_ns)
    pcie_bandwidth: float = 64e9  # bytes/s per direction, PCIe 5.0 x16 datasheet (an H100 SXM's host link)
    pcie_efficiency: float = 0.8  # ~51 GB/s: what large pinned-memory copies reach

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelCosts:
    """Per-model constants the step time needs, derived once from a KVSpec."""

    params: int  # all weights, embeddings and LM head included
    weight_bytes: int
    flops_per_token: int  # 2 x non-embedding params + LM head (a token's matmuls)
    attn_flops_per_pair: int  # FLOPs for one (query, key) pair over all layers: QK^T and PV
    kv_bytes_per_token: int

    @classmethod
    def from_spec(cls, spec: KVSpec) -> ModelCosts:
        h, hd = spec.hidden, spec.head_dim
        per_layer = (
            h * spec.q_heads * hd  # q
            + 2 * h * spec.num_kv_heads * hd  # k, v
            + spec.q_heads * hd * h  # o
            + 3 * h * spec.ffn  # gate, up, down
            + 2 * h  # two RMSNorms
        )
        body = spec.num_layers * per_layer
        embed = spec.vocab_size * h
        params = body + 2 * embed + h  # embedding, LM head, final norm
        return cls(
            params=params,
            weight_bytes=params * spec.dtype_bytes,
            flops_per_token=2 * (body + embed),
            attn_flops_per_pair=4 * spec.num_layers * spec.q_heads * hd,
            kv_bytes_per_token=spec.bytes_per_token,
        )


@dataclass
class StepCost:
    """What one step computes, summed over the batch (the scheduler fills it)."""

    tokens: int = 0  # new tokens (prefill + decode)
    kv_tokens_read: int = 0  # context tokens attention reads, summed over sequences
    attn_pairs: int = 0  # (query, key) pairs, causal


def step_time_ns(model: GPUCostModel, costs: ModelCosts, step: StepCost) -> int:
    if step.tokens == 0:
        return 0
    bytes_moved = costs.weight_bytes + (step.kv_tokens_read + step.tokens) * costs.kv_bytes_per_token
    flops = step.tokens * costs.flops_per_token + step.attn_pairs * costs.attn_flops_per_pair
    memory_s = bytes_moved / (model.hbm_bandwidth * model.bandwidth_efficiency)
    compute_s = flops / (model.peak_flops * model.flops_efficiency)
    return int(max(memory_s, compute_s) * 1e9) + model.step_overhead_ns


def pcie_time_ns(model: GPUCostModel, bytes_in: int, bytes_out: int) -> int:
    """Time of one step's copies over the host link: `bytes_in` host -> device (CPU-tier hits copied back),
    `bytes_out` device -> host (evicted blocks offloaded). PCIe is full duplex, so the two directions overlap each
    other; they are not overlapped with the step's compute (Pensieve pipelines them layer by layer: this is the
    conservative end)."""
    if not (bytes_in or bytes_out):
        return 0
    return int(max(bytes_in, bytes_out) / (model.pcie_bandwidth * model.pcie_efficiency) * 1e9)
