"""Tensor and decode context parallelism (kvscope.parallel): per-rank KV heads and capacities computed by hand, the
token split, the tightest rank deciding admission, and one complete trace per rank."""

from __future__ import annotations

import numpy as np
import pytest

from kvscope.alloc.base import KVOutOfMemory
from kvscope.alloc.paged import PagedAllocator
from kvscope.analysis.ranks import check_group, group_summary, rank_table
from kvscope.analysis.summary import summarize
from kvscope.engine import RunConfig
from kvscope.errors import UserError
from kvscope.parallel import ParallelConfig, parallel_config, plan_layout, record_group
from kvscope.parallel.group import GroupAllocator
from kvscope.parallel.layout import capacity_tokens_total, share, share_of_range
from kvscope.recorder import Recorder
from kvscope.spec import get_spec
from kvscope.trace import trace_from_recorder
from kvscope.workload import Request

GiB = 1 << 30
LLAMA = get_spec("llama-3-8b")  # 32 layers, 8 KV heads of 128, bf16: 131,072 bytes a token
MQA = get_spec("starcoder-15b")  # 40 layers, 1 KV head of 128, bf16: 20,480 bytes a token


def small(n: int = 4, prompt: int = 20, output: int = 5) -> list[Request]:
    return [Request(f"r{i}", 0.0, prompt, output) for i in range(n)]


# ---- the layout, by hand --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, tp, per_rank, replicas, bytes_per_token, heads_of",
    [
        # 8 heads over 2 ranks: 4 each, 2 x 32 layers x 4 heads x 128 x 2 bytes = 65,536 B a token.
        (LLAMA, 2, 4, 1, 65_536, {0: (0, 1, 2, 3), 1: (4, 5, 6, 7)}),
        # over 8 ranks: 1 each, 16,384 B.
        (LLAMA, 8, 1, 1, 16_384, {0: (0,), 7: (7,)}),
        # over 16 ranks: 1 each, every head on 2 consecutive ranks.
        (LLAMA, 16, 1, 2, 16_384, {0: (0,), 1: (0,), 2: (1,), 15: (7,)}),
        # one KV head at TP 8: every rank holds all of it, 2 x 40 x 1 x 128 x 2 = 20,480 B.
        (MQA, 8, 1, 8, 20_480, {0: (0,), 7: (0,)}),
    ],
)
def test_kv_heads_per_rank(spec, tp, per_rank, replicas, bytes_per_token, heads_of):
    lay = plan_layout(spec, ParallelConfig(tp=tp))
    assert (lay.kv_heads_per_rank, lay.replicas, lay.duplication) == (per_rank, replicas, replicas)
    rank = lay.rank_spec()
    assert rank.bytes_per_token == bytes_per_token
    assert rank.q_heads == spec.q_heads // tp and rank.hidden == spec.hidden
    for r, heads in heads_of.items():
        assert lay.heads(r) == heads


def test_dcp_removes_the_copies_it_splits():
    lay = plan_layout(LLAMA, ParallelConfig(tp=16, dcp=2))
    assert (lay.replicas, lay.duplication) == (2, 1)
    assert [lay.dcp_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert [lay.dcp_group(r) for r in range(4)] == [0, 0, 1, 1]
    # A DCP group holds one head: ranks 0 and 1 both hold head 0 and split its tokens.
    assert lay.heads(0) == lay.heads(1) == (0,)
    assert plan_layout(MQA, ParallelConfig(tp=8, dcp=4)).duplication == 2


@pytest.mark.parametrize(
    "spec, tp, dcp, needle",
    [
        (LLAMA, 3, 1, "8 KV heads neither split evenly over 3 ranks"),
        (LLAMA, 64, 1, "32 query heads do not split over 64 ranks"),
        (LLAMA, 2, 2, "needs --tp a multiple of kv heads x dcp = 16"),
        (LLAMA, 16, 4, "needs --tp a multiple of kv heads x dcp = 32"),
    ],
)
def test_impossible_layouts_are_one_line(spec, tp, dcp, needle):
    with pytest.raises(UserError, match=needle):
        plan_layout(spec, ParallelConfig(tp=tp, dcp=dcp))


def test_parallel_config_from_flags():
    assert parallel_config(None, None) == ParallelConfig(1, 1)
    assert parallel_config(None, 8) == ParallelConfig(8, 8)  # --dcp alone: that many TP ranks
    assert parallel_config(16, 2) == ParallelConfig(16, 2)
    for tp, dcp, needle in [(0, None, "--tp: must be"), (None, 0, "--dcp: must be"), (2000, None, "--tp: must be"),
                            (4, 3, "--dcp 3: must divide --tp 4")]:  # fmt: skip
        with pytest.raises(UserError, match=needle):
            parallel_config(tp, dcp)


def test_token_shares():
    # token i on DCP rank i mod 4: 10 tokens -> 3, 3, 2, 2
    assert [share(10, d, 4) for d in range(4)] == [3, 3, 2, 2]
    assert [share(0, d, 4) for d in range(4)] == [0, 0, 0, 0]
    # positions 5..11 (7 tokens): rank 0 gets 8; rank 1 gets 5, 9; rank 2 gets 6, 10; rank 3 gets 7, 11
    assert [share_of_range(5, 7, d, 4) for d in range(4)] == [1, 2, 2, 2]
    assert capacity_tokens_total([100, 100, 100, 100], 1) == 100
    assert capacity_tokens_total([100, 100, 90, 100], 2) == 190  # the smaller DCP group's sum
    assert capacity_tokens_total([100, 90], 1) == 90  # TP: the tightest rank


# ---- capacities of real runs, by hand --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, tp, dcp, slots, total, duplication",
    [
        # 16 GiB a rank, paged blocks of 16 tokens. TP 2: 65,536 B a token -> 262,144 slots.
        ("llama-3-8b", 2, 1, 262_144, 262_144, 1),
        # TP 8 and 16: 16,384 B a token -> 1,048,576 slots; TP 16 holds each head twice.
        ("llama-3-8b", 8, 1, 1_048_576, 1_048_576, 1),
        ("llama-3-8b", 16, 1, 1_048_576, 1_048_576, 2),
        # DCP 2 inside TP 16: the two copies hold different tokens, 2 x 1,048,576.
        ("llama-3-8b", 16, 2, 1_048_576, 2_097_152, 1),
        # One KV head at TP 8: 20,480 B a token, a block 327,680 B, 16 GiB // 327,680 = 52,428 blocks = 838,848
        # slots, the same tokens on all 8 ranks (8 copies) ...
        ("starcoder-15b", 8, 1, 838_848, 838_848, 8),
        # ... or, with DCP 8, 8 x 838,848 tokens and no copy.
        ("starcoder-15b", 8, 8, 838_848, 6_710_784, 1),
    ],
)
def test_capacity_per_rank_and_of_the_group(model, tp, dcp, slots, total, duplication):
    res = record_group(small(2), RunConfig(model=model, layers=None), ParallelConfig(tp, dcp))
    assert res.capacity_tokens == [slots] * tp
    assert res.capacity_tokens_total == total
    traces = res.traces()
    assert len(traces) == tp
    s = summarize(traces[-1])
    assert (s["world_size"], s["rank"], s["kv_duplication"]) == (tp, tp - 1, duplication)
    assert (s["capacity_tokens"], s["capacity_tokens_total"]) == (slots, total)
    g = group_summary(check_group(traces))
    assert (g["capacity_tokens_total"], g["kv_duplication"], g["world_size"]) == (total, duplication, tp)


def test_a_single_trace_is_a_group_of_one():
    from kvscope.engine import record_run

    s = summarize(record_run(small(2), RunConfig()).trace())
    # 16 GiB / 131,072 B a token = 131,072 slots
    assert (s["world_size"], s["rank"], s["kv_duplication"]) == (1, 0, 1)
    assert s["capacity_tokens"] == s["capacity_tokens_total"] == 131_072


# ---- the token split and the books of each rank ----------------------------------------------------------------------
def test_dcp_puts_token_i_on_rank_i_mod_dcp():
    # One request, prompt 5, output 3: it finishes holding 5 + 3 - 1 = 7 tokens, positions 0..6: rank 0 holds
    # 0, 2, 4, 6 and rank 1 holds 1, 3, 5 (one KV head, TP 2, DCP 2: 20,480 B a token on each rank).
    res = record_group([Request("a", 0.0, 5, 3)], RunConfig(model="starcoder-15b"), ParallelConfig(2, 2))
    assert res.peak_used == [4 * 20_480, 3 * 20_480]
    table = rank_table(res.traces())
    assert table["tokens_held_peak"].tolist() == [4, 3]
    assert table["peak_used"].tolist() == [4 * 20_480, 3 * 20_480]
    g = group_summary(res.traces())
    assert g["imbalance"] == pytest.approx(4 / 3.5 - 1)


def test_tp_ranks_hold_the_same_tokens_and_the_same_events():
    res = record_group(small(3), RunConfig(), ParallelConfig(2))
    a, b = res.traces()
    assert a.meta["rank"] == 0 and b.meta["rank"] == 1 and a.meta["world_size"] == b.meta["world_size"] == 2
    assert a.meta["parallel"]["kv_heads"] == [0, 1, 2, 3] and b.meta["parallel"]["kv_heads"] == [4, 5, 6, 7]
    cols = ["step", "kind", "seq", "block", "n", "bytes", "addr", "aux"]
    assert a.events[cols].equals(b.events[cols])
    # 3 requests of 20 + 5 - 1 = 24 tokens at 65,536 B (4 heads): the peak used of each rank
    assert res.peak_used == [3 * 24 * 65_536] * 2


@pytest.mark.parametrize("allocator", ["paged", "static", "vmm"])
def test_every_allocator_keeps_its_books_under_pressure(allocator):
    # 64 KiB of KV a rank, one head of 2 layers (1,024 B a token): 64 token slots a rank, 128 for a DCP group, so
    # 12 requests of 29-85 tokens at once preempt; the group's and every rank's invariants are checked after every
    # step, the token shares included. vmm: 4 KiB pages of 16 tokens (a page-group of 4 buffers is 16 KiB).
    reqs = [Request(f"r{i}", 0.0, 20 + 3 * i, 10 + 2 * i) for i in range(12)]
    extra = {"page_size": 4 << 10} if allocator == "vmm" else {}
    cfg = RunConfig(allocator=allocator, model="starcoder-15b", layers=2, kv_memory=64 << 10, max_len=128,
                    max_batch=8, check_invariants=True, **extra)  # fmt: skip
    res = record_group(reqs, cfg, ParallelConfig(4, 2))
    assert res.stats.finished_requests + res.stats.rejected_requests == 12
    assert res.stats.preemptions > 0 or allocator == "static"  # static reserves up front: it waits, never preempts
    for t in res.traces():
        s = summarize(t)
        assert s["finished"] == res.stats.finished_requests and not s["truncated"]


def test_swap_preemption_swaps_on_every_rank():
    reqs = [Request(f"r{i}", 0.0, 30, 40) for i in range(8)]
    cfg = RunConfig(model="starcoder-15b", layers=2, kv_memory=128 << 10, preemption="swap", check_invariants=True)
    res = record_group(reqs, cfg, ParallelConfig(2))
    assert res.stats.preemptions > 0
    outs = [int((t.events["kind"] == "swap_out").sum()) for t in res.traces()]
    assert outs[0] == outs[1] > 0


# ---- the tightest rank decides ---------------------------------------------------------------------------------------
def test_the_smallest_rank_decides_admission_and_a_refused_append_changes_nothing():
    spec = plan_layout(LLAMA, ParallelConfig(2)).rank_spec()  # 65,536 B a token, 1 MiB a block of 16
    recs = [Recorder(None), Recorder(None)]
    ranks = [PagedAllocator(spec, 4 << 20, recs[0]), PagedAllocator(spec, 2 << 20, recs[1])]  # 4 and 2 blocks
    group = GroupAllocator(ranks, plan_layout(LLAMA, ParallelConfig(2)), recorder=None)
    tokens = np.arange(64, dtype=np.int32)
    assert group.can_admit(32, 48) and not group.can_admit(48, 48)  # rank 1 holds 32 tokens, rank 0 64
    group.admit(0, tokens[:32], 48)
    group.append(0, tokens[:32])
    assert not group.can_append(0, 1)
    before = [r.usage() for r in ranks]
    with pytest.raises(KVOutOfMemory):
        group.append(0, tokens[32:33])
    assert [r.usage() for r in ranks] == before and group.num_tokens(0) == 32
    ooms = [int((trace_from_recorder(rec).events["kind"] == "oom").sum()) for rec in recs]
    assert ooms == [0, 1]  # only the rank that refused records an OOM
    group.check_invariants()
