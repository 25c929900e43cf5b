"""The pieces of graph-captured decoding that run without a GPU: batch buckets, the device-side split size and
the fused merge of the decode kernel (Triton's interpreter on CPU), and why a CPU executor decodes eagerly."""

from __future__ import annotations

import pytest
import torch
from kvscope.kernels import DecodeConfig, kernels_available, paged_decode_attention, reference
from kvscope.kernels.decode import plan_splits, split_length
from kvscope.kernels.testing import TOLERANCES, random_paged_kv

from kvscope.engine.cuda_graphs import batch_buckets, bucket_for


def test_buckets_follow_nano_vllm():
    assert batch_buckets(256)[:6] == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(256)[-1] == 256 and all(b % 16 == 0 for b in batch_buckets(256)[4:])
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(3) == [1, 2, 3]
    assert bucket_for(5, batch_buckets(64)) == 8
    assert bucket_for(17, batch_buckets(64)) == 32
    assert bucket_for(65, batch_buckets(64)) is None


def test_split_length_covers_the_longest_sequence():
    for longest in (1, 63, 64, 65, 1000, 4096):
        for splits in (1, 3, 16):
            n = split_length(longest, splits, 64)
            assert n % 64 == 0 and n * splits >= longest
            assert (splits - 1) * n < longest + 64 * splits  # no split is wasted by more than a tile's rounding


@pytest.mark.skipif(not kernels_available("cpu") and not torch.cuda.is_available(), reason="no Triton backend")
@pytest.mark.parametrize(("fused", "splits"), [(True, 8), (False, 8), (False, 1)])
def test_decode_with_padding_rows_and_a_device_split(device, fused, splits):
    """A captured decode sees padded rows (length 0: zeros) and a split size that changes between replays; with one
    split (no merge) the program reads to each sequence's end whatever the split size says."""
    gen = torch.Generator().manual_seed(3)
    seq_lens = [37, 0, 100, 5, 0]
    kv = random_paged_kv(seq_lens, 2, 32, 16, torch.float32, device, generator=gen)
    q = torch.randn(len(seq_lens), 8, 32, generator=gen).to(device)
    cfg = DecodeConfig(block_n=16, num_splits=splits, fused=fused)
    ref = reference.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
    atol, rtol = TOLERANCES[torch.float32]
    for _ in range(2):  # the fused path's arrival counters must be reset by each call
        split_len = torch.tensor([split_length(100, splits, 16)], device=device)
        out = paged_decode_attention(
            q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, config=cfg, max_seq_len=512, split_len=split_len
        )
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
        assert out[1].abs().max() == 0 and out[4].abs().max() == 0


@pytest.mark.skipif(not kernels_available("cpu") and not torch.cuda.is_available(), reason="no Triton backend")
@pytest.mark.parametrize("stored", [20, 33, 1])
def test_a_device_split_of_part_tiles_is_rounded_to_whole_ones(device, stored):
    """16-token blocks read as one-block tiles (block_n 16) need splits that start on a tile: a stored split size
    that is not a multiple of block_n must still give the right answer, not tiles straddling two blocks."""
    gen = torch.Generator().manual_seed(5)
    seq_lens = [70, 33, 16]
    kv = random_paged_kv(seq_lens, 2, 32, 16, torch.float32, device, generator=gen)
    q = torch.randn(len(seq_lens), 4, 32, generator=gen).to(device)
    cfg = DecodeConfig(block_n=16, num_splits=6)
    ref = reference.paged_decode_attention(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens)
    atol, rtol = TOLERANCES[torch.float32]
    split_len = torch.tensor([stored], device=device)
    out = paged_decode_attention(
        q, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, config=cfg, max_seq_len=96, split_len=split_len
    )
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_split_plan_fills_the_machine_at_small_batch():
    cfg = DecodeConfig(block_n=64)
    cpu = torch.device("cpu")  # 4 pretend SMs in interpreter mode
    assert plan_splits(1, 8, 4096, cfg, cpu) > 1
    assert plan_splits(256, 8, 4096, cfg, cpu) == 1


def test_cpu_executor_says_why_it_decodes_eagerly():
    from kvscope.engine.api import RunConfig, record_run
    from kvscope.workload_gen import resolve_workload

    requests, _ = resolve_workload("alpaca", requests=3, seed=0, max_len=64)
    grabbed = {}
    record_run(
        requests,
        RunConfig(allocator="paged", device="cpu", model="tiny", kv_memory=1 << 20, max_len=64, max_batch=4),
        setup=lambda engine: grabbed.setdefault("ex", engine.executor),
    )
    ex = grabbed["ex"]
    assert getattr(ex, "graphs", None) is None


@pytest.mark.parametrize(("argv", "graphs"), [([], True), (["--eager"], False)])
def test_eager_flag_reaches_the_executor_and_the_metadata(tmp_path, monkeypatch, argv, graphs):
    """--eager travels RunConfig -> ExecutorOptions.cuda -> the cuda executor and into engine_config; the cuda
    device is stood in for by a sim executor that keeps its options."""
    from kvscope.backends.sim import SimMemory
    from kvscope.cli import main
    from kvscope.engine import api, executor
    from kvscope.trace import load_trace

    seen = {}

    def fake_cuda(spec, alloc, options):
        seen["cuda"] = options.cuda
        return executor.SimExecutor(spec, alloc, options)

    monkeypatch.setattr(executor, "check_device", lambda device: None)
    monkeypatch.setattr(api, "check_device", lambda device: None)
    monkeypatch.setitem(executor.EXECUTORS, "cuda", fake_cuda)
    monkeypatch.setattr(api, "make_backend", lambda device: SimMemory())
    monkeypatch.setattr("kvscope.runmeta.versions", lambda device: {"python": "3"})
    out = tmp_path / "g.kvtrace"
    args = ["run", "-w", "alpaca", "-n", "3", "-d", "cuda", "-a", "paged", "--kv-memory", "64MiB"]
    assert main([*args, "--max-len", "256", "--max-batch", "8", *argv, "-o", str(out), "-q"]) == 0
    assert seen["cuda"].cuda_graphs is graphs
    assert (seen["cuda"].max_len, seen["cuda"].max_batch) == (256, 8)  # the graphs' sizes follow the engine's limits
    assert load_trace(out).meta["engine_config"]["cuda_graphs"] is graphs


def test_eager_on_another_device_is_one_line():
    from kvscope.cli import main

    assert main(["run", "-w", "alpaca", "-n", "2", "-d", "sim", "--eager", "-q", "-o", "/dev/null"]) == 2
