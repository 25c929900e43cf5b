"""Split-K decode on a real GPU, with the merge kernel and fused (the last split merges, through an arrival
counter): many calls with many splits, so that a missing memory ordering between programs would show as a wrong or
changing result, eagerly and replayed from a CUDA graph with a changing split size. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from kvscope.kernels import DecodeConfig, contiguous_decode_attention, paged_decode_attention, reference
from kvscope.kernels.decode import split_length
from kvscope.kernels.testing import random_contiguous_kv, random_paged_kv

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


def _rel(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("splits", [None, 2, 16, 64])
def test_many_splits_merge_right_every_time(splits, fused):
    gen = torch.Generator().manual_seed(splits or 1)
    for trial in range(6):
        seq_lens = torch.randint(1, 6000, (1 + trial % 4,), generator=gen).tolist()
        kv = random_paged_kv(seq_lens, 8, 128, 16, BF16, "cuda", generator=gen)
        q = torch.randn(len(seq_lens), 32, 128, generator=gen).to("cuda", BF16)
        ref = reference.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
        cfg = DecodeConfig(num_splits=splits, fused=fused)
        first = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, config=cfg)
        assert _rel(first, ref) < 1e-2
        for _ in range(20):  # the same inputs, the same bits: no race between the splits and their merge
            again = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, config=cfg)
            assert torch.equal(again, first)


def test_graph_replay_with_a_changing_split_size():
    gen = torch.Generator().manual_seed(5)
    lens = [3000, 17, 900, 0]
    kv = random_contiguous_kv(lens, 8, 128, BF16, "cuda", generator=gen)
    q = torch.randn(len(lens), 32, 128, generator=gen).to("cuda", BF16)
    seq_lens = kv.seq_lens.clone()
    split_len = torch.zeros(1, dtype=torch.int64, device="cuda")
    out = torch.empty_like(q)
    cfg = DecodeConfig(num_splits=32)

    def call():
        contiguous_decode_attention(
            q, kv.k_buf, kv.v_buf, kv.token_base, seq_lens, max_seq_len=4096, out=out, config=cfg, split_len=split_len
        )

    split_len.fill_(split_length(4096, 32, 64))
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for shrink in (0, 1000, 2900):
        now = torch.clamp(kv.seq_lens - shrink, min=0)
        seq_lens.copy_(now)
        split_len.fill_(split_length(int(now.max()), 32, 64))
        graph.replay()
        ref = reference.contiguous_decode_attention(q, kv.k_buf, kv.v_buf, kv.token_base, now)
        torch.cuda.synchronize()
        assert _rel(out, ref) < 1e-2
