"""Decode kernels (paged and contiguous, split-K) against the torch reference, on random shuffled caches.

On a machine without a GPU they run in Triton's interpreter (tests/conftest.py), so the shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch
from kvscope.kernels import (
    INTERPRETED,
    DecodeConfig,
    contiguous_decode_attention,
    kernels_available,
    paged_decode_attention,
    reference,
)
from kvscope.kernels.common import choose_num_splits
from kvscope.kernels.testing import TOLERANCES, random_contiguous_kv, random_paged_kv

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# (seq_lens, q_heads, kv_heads, head_dim, block_size, dtype, config)
PAGED_CASES = [
    # ragged, not multiples of the block, one exact multiple, one single token; default (heuristic) splits
    ([37, 1, 100, 16], 8, 2, 32, 16, BF16, None),
    ([5, 33, 20], 8, 1, 16, 1, F16, None),  # 1-token blocks, GQA 8
    ([300, 7], 2, 2, 16, 256, F32, None),  # 256-token blocks, a sequence crossing one, MHA
    ([64, 3, 50], 4, 1, 32, 64, BF16, DecodeConfig(block_n=16, num_splits=4)),  # GQA 4, splits incl. empty ones
    ([45, 9], 8, 1, 16, 4, F32, DecodeConfig(block_n=16, num_splits=1)),  # direct path, several tiles
    ([29, 70], 4, 4, 24, 16, F16, DecodeConfig(block_n=16, num_splits=3)),  # head_dim not a power of two
]


@pytest.mark.parametrize(("seq_lens", "q_heads", "kv_heads", "head_dim", "block_size", "dtype", "config"), PAGED_CASES)
def test_paged_decode_matches_reference(device, seq_lens, q_heads, kv_heads, head_dim, block_size, dtype, config):
    gen = torch.Generator().manual_seed(sum(seq_lens) + block_size)
    kv = random_paged_kv(seq_lens, kv_heads, head_dim, block_size, dtype, device, generator=gen)
    q = torch.randn(len(seq_lens), q_heads, head_dim, generator=gen).to(device=device, dtype=dtype)

    out = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, config=config)
    ref = reference.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)

    _assert_close(out, ref, dtype)


CONTIGUOUS_CASES = [
    ([37, 1, 100], 8, 2, 32, BF16, None),
    ([5, 60], 8, 1, 16, F32, DecodeConfig(block_n=16, num_splits=2)),
    ([17, 33, 2], 2, 2, 16, F16, DecodeConfig(block_n=16, num_splits=1)),
]


@pytest.mark.parametrize(("seq_lens", "q_heads", "kv_heads", "head_dim", "dtype", "config"), CONTIGUOUS_CASES)
def test_contiguous_decode_matches_reference(device, seq_lens, q_heads, kv_heads, head_dim, dtype, config):
    gen = torch.Generator().manual_seed(sum(seq_lens))
    kv = random_contiguous_kv(seq_lens, kv_heads, head_dim, dtype, device, generator=gen)
    assert kv.k_buf.stride(0) > kv_heads * head_dim  # rows interleave layers: a strided view
    q = torch.randn(len(seq_lens), q_heads, head_dim, generator=gen).to(device=device, dtype=dtype)

    out = contiguous_decode_attention(q, kv.k_buf, kv.v_buf, kv.token_base, kv.seq_lens, config=config)
    ref = reference.contiguous_decode_attention(q, kv.k_buf, kv.v_buf, kv.token_base, kv.seq_lens)

    _assert_close(out, ref, dtype)


def test_paged_and_contiguous_agree_on_the_same_tokens(device):
    """The same K/V laid out both ways give the same attention (the layouts differ, the math must not)."""
    gen = torch.Generator().manual_seed(7)
    seq_lens = [23, 40]
    kv = random_paged_kv(seq_lens, 2, 16, 8, F32, device, generator=gen)
    rows_k = torch.cat([reference.gather_paged(kv.k_cache, kv.block_tables[b], n) for b, n in enumerate(seq_lens)])
    rows_v = torch.cat([reference.gather_paged(kv.v_cache, kv.block_tables[b], n) for b, n in enumerate(seq_lens)])
    token_base = torch.tensor([0, seq_lens[0]], dtype=torch.int32, device=device)
    q = torch.randn(2, 4, 16, generator=gen).to(device)

    tables64, lens64 = kv.block_tables.long(), kv.seq_lens.long()  # int64 index tensors work as well as int32

    paged = paged_decode_attention(q, kv.k_cache, kv.v_cache, tables64, lens64, max_seq_len=40)
    flat = contiguous_decode_attention(q, rows_k, rows_v, token_base, kv.seq_lens, max_seq_len=40)

    torch.testing.assert_close(paged, flat, atol=1e-5, rtol=1e-5)


def test_decode_writes_into_out_and_gives_zeros_for_empty_sequences(device):
    gen = torch.Generator().manual_seed(3)
    kv = random_paged_kv([0, 12], 1, 16, 16, F32, device, generator=gen)
    q = torch.randn(2, 4, 16, generator=gen).to(device)
    out = torch.full_like(q, float("nan"))

    result = paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, out=out, config=DecodeConfig(num_splits=2)
    )

    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref = reference.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
    _assert_close(out, ref, F32)


@pytest.mark.parametrize("fused", [False, True])
def test_merge_over_several_loads_with_empty_splits(device, monkeypatch, fused):
    # 38 splits of 16 tokens, merged 16 per load: the short sequences' later loads hold only empty splits (written
    # as a log-sum-exp of -inf, no output), the empty sequence has nothing but empty splits.
    from kvscope.kernels import decode

    monkeypatch.setattr(decode, "REDUCE_SPLITS", 16)
    gen = torch.Generator().manual_seed(11)
    kv = random_paged_kv([600, 5, 0, 333], 2, 16, 16, F32, device, generator=gen)
    q = torch.randn(4, 4, 16, generator=gen).to(device)
    out = torch.full_like(q, float("nan"))
    config = DecodeConfig(block_n=16, num_splits=40, fused=fused)
    paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, out=out, config=config)
    ref = reference.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
    _assert_close(out, ref, F32)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_underestimated_max_seq_len_still_attends_to_every_token(device):
    gen = torch.Generator().manual_seed(9)
    kv = random_paged_kv([90, 30], 1, 16, 16, F32, device, generator=gen)
    q = torch.randn(2, 2, 16, generator=gen).to(device)
    config = DecodeConfig(block_n=16, num_splits=2)
    out = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, max_seq_len=40, config=config)
    ref = reference.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
    _assert_close(out, ref, F32)


def test_scale_is_applied(device):
    gen = torch.Generator().manual_seed(5)
    kv = random_paged_kv([19], 2, 16, 16, F32, device, generator=gen)
    q = torch.randn(1, 2, 16, generator=gen).to(device)
    out = paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale=0.9)
    ref = reference.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale=0.9)
    default = reference.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
    _assert_close(out, ref, F32)
    assert not torch.allclose(ref, default, atol=1e-3)  # the scale changes the answer, so the check means something


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"q_heads": 6, "kv_heads": 4}, "multiple of kv heads"),
        ({"q_dtype": F16}, "share a dtype"),
        ({"table_dtype": torch.float32}, "block_tables"),
    ],
)
def test_decode_rejects_bad_inputs_with_one_line_errors(device, kwargs, message):
    q_heads, kv_heads = kwargs.get("q_heads", 4), kwargs.get("kv_heads", 2)
    kv = random_paged_kv([5], kv_heads, 16, 4, F32, device)
    q = torch.randn(1, q_heads, 16).to(device=device, dtype=kwargs.get("q_dtype", F32))
    tables = kv.block_tables.to(kwargs.get("table_dtype", torch.int32))
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(q, kv.k_cache, kv.v_cache, tables, kv.seq_lens)


def test_kernels_available_matches_how_triton_was_loaded(device):
    assert kernels_available(device)
    assert kernels_available("cuda") != INTERPRETED


def test_num_splits_heuristic_fills_the_machine_only_when_needed():
    # Enough (sequence, kv head) programs: no split.
    assert choose_num_splits(programs=256 * 8, num_tiles=64, num_sms=132) == 1
    assert choose_num_splits(programs=64 * 8, num_tiles=64, num_sms=132) == 1
    # One sequence, long context: split into about one wave of 3 programs an SM, never more than there are tiles.
    splits = choose_num_splits(programs=8, num_tiles=512, num_sms=132)
    assert 132 * 3 * 0.9 <= 8 * splits <= 132 * 3 * 1.1
    assert choose_num_splits(programs=16 * 8, num_tiles=512, num_sms=132) == 3
    assert choose_num_splits(programs=32 * 8, num_tiles=512, num_sms=132) == 2  # 1.55 rounds up
    assert choose_num_splits(programs=8, num_tiles=3, num_sms=132) <= 3
    assert choose_num_splits(programs=1, num_tiles=1, num_sms=132) == 1
    assert choose_num_splits(programs=1, num_tiles=10_000, num_sms=132) <= 128


@pytest.fixture
def hopper(monkeypatch):
    """decode_plan's view of an H200: 132 SMs, 228 KiB of shared memory an SM, 227 KiB a block."""
    from kvscope.kernels import decode_tiles

    monkeypatch.setattr(decode_tiles, "INTERPRETED", False)
    monkeypatch.setattr(decode_tiles, "sm_count", lambda device: 132)
    monkeypatch.setattr(decode_tiles, "_shared_memory", lambda index: (233472, 232448))
    return torch.device("cuda", 0)


def test_decode_plan_gives_pairs_that_fill_the_gpu_one_program_with_bigger_buffers(hopper):
    from kvscope.kernels.common import default_decode_config
    from kvscope.kernels.decode_tiles import decode_plan

    base = default_decode_config(128, BF16)
    plan = lambda batch, context: decode_plan(batch, 8, context, 128, BF16, hopper)  # noqa: E731
    assert plan(1, 4096) == plan(4, 4096) == plan(8, 1024) == base  # few pairs: split, default tiles
    assert plan(64, 4096) == plan(256, 1024) == base  # pairs beyond two an SM: no split anyway
    assert plan(20, 1024) == plan(24, 4096) == plan(28, 1024) == base  # an uneven wave of one program a pair: split
    double = plan(32, 4096)  # 256 pairs: two programs an SM, three 64-token buffers
    assert (double.block_n, double.num_warps, double.num_stages, double.num_splits) == (64, 4, 7, 1)
    wide = plan(16, 1024)  # 128 pairs, short context: one program an SM, two 128-token buffers
    assert (wide.block_n, wide.num_warps, wide.num_stages, wide.num_splits) == (128, 8, 5, 1)
    assert plan(16, 4096) == base  # longer contexts: three splits an SM and the merge
    assert decode_plan(32, 8, 4096, 128, torch.float32, hopper) == default_decode_config(128, torch.float32)
    contiguous = lambda batch, context: decode_plan(batch, 8, context, 128, BF16, hopper, paged=False)  # noqa: E731
    assert contiguous(16, 16384) == wide and contiguous(32, 4096) == double  # the wide tiles at any context
    assert contiguous(4, 4096) == contiguous(24, 1024) == contiguous(64, 1024) == base


def test_decode_plan_keeps_the_default_tiles_where_the_buffers_do_not_fit(hopper, monkeypatch):
    from kvscope.kernels import decode_tiles

    monkeypatch.setattr(decode_tiles, "_shared_memory", lambda index: (167936, 166912))  # an A100's 164 KiB an SM
    base = decode_tiles.default_decode_config(128, BF16)
    assert decode_tiles.decode_plan(32, 8, 4096, 128, BF16, hopper) == base  # two 104 KiB programs do not fit an SM
    assert decode_tiles.decode_plan(16, 8, 1024, 128, BF16, hopper).block_n == 128  # one 136 KiB program does


def test_decode_plans_lists_every_config_a_run_can_select(hopper):
    from kvscope.kernels.decode_tiles import decode_plan, decode_plans

    plans = decode_plans(256, 8, 4096, 128, BF16, hopper)
    expected = {decode_plan(b, 8, n, 128, BF16, hopper) for b in range(1, 257) for n in (16, 1000, 2048, 4096)}
    assert plans == expected and len(plans) == 3
