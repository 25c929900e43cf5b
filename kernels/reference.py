"""Plain torch reference implementations of every kernel in kvscope.kernels, with the same signatures.

They are the ground truth for the kernel tests and a slow but dependable fallback (any device, no Triton): math in
float32, one sequence at a time, the K/V of a sequence gathered explicitly through its block table or row range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .common import default_scale


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of queries at absolute positions `q_positions` to keys at positions 0..len(k)-1.

    q [n, q_heads, d]; k, v [len, kv_heads, d]; q head h reads kv head h // (q_heads / kv_heads). float32 result;
    a query that sees no key (empty context) gets zeros.
    """
    n, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    key_pos = torch.arange(k.shape[0], device=q.device)
    visible = key_pos[None, :] <= q_positions.to(q.device)[:, None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key: 0/0
    return torch.einsum("hqk,khd->qhd", probs, v)


def gather_paged(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens 0..length-1 of one sequence from a [num_blocks, block_size, kv_heads, d] cache."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = block_table_row[:num_blocks].long()
    return cache[blocks].reshape(num_blocks * block_size, *cache.shape[2:])[:length]


def gather_rows(buf: torch.Tensor, base: int, length: int) -> torch.Tensor:
    return buf[base : base + length]


#: Tokens 0..length-1 of sequence b from one cache: `gather(cache, b, length)`.
Gather = Callable[[torch.Tensor, int, int], torch.Tensor]


def _paged_gather(block_tables: torch.Tensor) -> Gather:
    return lambda cache, b, length: gather_paged(cache, block_tables[b], length)


def _contiguous_gather(token_base: torch.Tensor) -> Gather:
    bases = token_base.tolist()
    return lambda buf, b, length: gather_rows(buf, bases[b], length)


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gather: Gather,
    q_spans: Sequence[tuple[int, int]],
    context_lens: Sequence[int],
    scale: float | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Sequence b's queries q[start:end] (q_spans[b]) attend causally to its context_lens[b] cached tokens and to
    themselves, the K/V of all of them read through `gather`: the one routine behind every layout and phase."""
    scale = default_scale(scale, q.shape[-1])
    result = torch.empty_like(q) if out is None else out
    for b, ((start, end), ctx) in enumerate(zip(q_spans, context_lens, strict=True)):
        length = ctx + end - start
        keys, values = gather(k, b, length), gather(v, b, length)
        result[start:end] = attend(q[start:end], keys, values, torch.arange(ctx, length), scale).to(result.dtype)
    return result


Spans = tuple[list[tuple[int, int]], list[int]]  # (q rows start..end, cached tokens before them) per sequence


def _decode_spans(seq_lens: torch.Tensor) -> Spans:
    # One query per sequence, the last of its seq_lens[b] tokens (the new token's K/V are already stored).
    lens = seq_lens.tolist()
    return [(b, b + 1) for b in range(len(lens))], [n - 1 for n in lens]


def _prefill_spans(cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor) -> Spans:
    cu = cu_seqlens_q.tolist()
    return list(zip(cu[:-1], cu[1:], strict=True)), context_lens.tolist()


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    return _attention(q, k_cache, v_cache, _paged_gather(block_tables), *_decode_spans(seq_lens), scale, out)


def contiguous_decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    token_base: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    return _attention(q, k_buf, v_buf, _contiguous_gather(token_base), *_decode_spans(seq_lens), scale, out)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    spans = _prefill_spans(cu_seqlens_q, context_lens)
    return _attention(q, k_cache, v_cache, _paged_gather(block_tables), *spans, scale, out)


def contiguous_prefill_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    token_base: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    spans = _prefill_spans(cu_seqlens_q, context_lens)
    return _attention(q, k_buf, v_buf, _contiguous_gather(token_base), *spans, scale, out)


def store_kv_paged(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = key[t]
        v_cache[slot // block_size, slot % block_size] = value[t]


def store_kv_contiguous(
    key: torch.Tensor, value: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, rows: torch.Tensor
) -> None:
    for t, row in enumerate(rows.tolist()):
        if row < 0:
            continue
        k_buf[row] = key[t]
        v_buf[row] = value[t]


def copy_blocks(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor | None,
    src: Sequence[int] | torch.Tensor,
    dst: Sequence[int] | torch.Tensor,
    *,
    block_dim: int = 0,
) -> None:
    dst_pool = src_pool if dst_pool is None else dst_pool
    src_list = src.tolist() if isinstance(src, torch.Tensor) else list(src)
    dst_list = dst.tolist() if isinstance(dst, torch.Tensor) else list(dst)
    for s, d in zip(src_list, dst_list, strict=True):
        dst_pool.select(block_dim, d).copy_(src_pool.select(block_dim, s))
