"""Random KV caches in the layouts the kernels read, for the tests and the benchmark's correctness check.

The caches are deliberately awkward: the paged cache is one layer's view of a [layers, 2, num_blocks, block_size,
kv_heads, head_dim] pool and every sequence gets shuffled, non-contiguous block ids (padding entries of the block
table point far out of range, so reading one faults); the contiguous buffer is one layer's view of a row buffer that
interleaves layers (row stride > kv_heads * head_dim), with sequences at scattered bases and gaps between them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedKV:
    k_cache: torch.Tensor  # [num_blocks, block_size, kv_heads, head_dim], a strided view
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [batch, max_blocks]
    seq_lens: torch.Tensor  # int32 [batch]
    pool: torch.Tensor  # the [layers, 2, num_blocks, block_size, kv_heads, head_dim] pool the caches view

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]


@dataclass
class ContiguousKV:
    k_buf: torch.Tensor  # [num_rows, kv_heads, head_dim], a strided view
    v_buf: torch.Tensor
    token_base: torch.Tensor  # int64 [batch]
    seq_lens: torch.Tensor  # int32 [batch]


def random_paged_kv(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str | torch.device,
    *,
    spare_blocks: int = 3,
    num_layers: int = 2,
    generator: torch.Generator | None = None,
) -> PagedKV:
    """A paged cache holding random K/V for sequences of `seq_lens` tokens (layer 1 of a `num_layers` pool)."""
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    pool = torch.randn(
        num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, generator=generator, dtype=torch.float32
    ).to(device=device, dtype=dtype)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    max_blocks = max(blocks_per_seq, default=0) + 1  # a spare column: tables are wider than any sequence needs
    tables = torch.full((len(seq_lens), max_blocks), num_blocks * 1000 + 7, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = torch.tensor(order[used : used + n], dtype=torch.int32)
        used += n
    layer = min(1, num_layers - 1)
    return PagedKV(
        k_cache=pool[layer, 0],
        v_cache=pool[layer, 1],
        block_tables=tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        pool=pool,
    )


def random_contiguous_kv(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str | torch.device,
    *,
    num_layers: int = 2,
    generator: torch.Generator | None = None,
) -> ContiguousKV:
    """A contiguous row buffer with each sequence at a scattered base row (layer 1 of a layer-interleaved buffer)."""
    # Sequences are placed in a shuffled order, with gaps, so bases do not grow with the sequence index.
    placement = torch.randperm(len(seq_lens), generator=generator).tolist()
    gaps = torch.randint(0, 5, (len(seq_lens),), generator=generator).tolist()
    bases, row = [0] * len(seq_lens), 0
    for b, gap in zip(placement, gaps, strict=True):
        row += gap
        bases[b] = row
        row += seq_lens[b]
    num_rows = row + 3
    # Rows interleave layers and K/V, like the VMM megacache: one row is [layers, 2, kv_heads, head_dim].
    buf = torch.randn(num_rows, num_layers, 2, num_kv_heads, head_dim, generator=generator, dtype=torch.float32)
    buf = buf.to(device=device, dtype=dtype)
    token_base = torch.tensor(bases, dtype=torch.int64)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    layer = min(1, num_layers - 1)
    return ContiguousKV(
        k_buf=buf[:, layer, 0],
        v_buf=buf[:, layer, 1],
        token_base=token_base.to(device),
        seq_lens=lens.to(device),
    )


def cu_seqlens(lengths: list[int], device: str | torch.device) -> torch.Tensor:
    """int32 [len + 1] prefix sums: where each sequence's rows start in a packed varlen tensor."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out.to(device)


#: (atol, rtol) for comparing a kernel's output to the float32 reference, by dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
