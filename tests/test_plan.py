"""`kvscope plan`: budgets and capacities against hand-computed arithmetic for two models, the TP shard equivalence,
the workload sweep, --json, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvscope import cli
from kvscope.alloc import registry
from kvscope.alloc.registry import BuildContext
from kvscope.backends.sim import SimMemory
from kvscope.engine.api import RunConfig
from kvscope.engine.costmodel import ModelCosts
from kvscope.plan import PlanInputs, budget, plan
from kvscope.recorder import NullRecorder
from kvscope.spec import PRESETS, get_spec
from kvscope.units import format_bytes

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _only_plan(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", {"plan": cli.COMMANDS["plan"]})


def test_llama_3_8b_on_80_gib():
    # Parameters (Llama-shaped: q, k, v, o, gated MLP, two norms per layer; embeddings, untied LM head, final norm):
    #   per layer: 4096*32*128 + 2*4096*8*128 + 32*128*4096 + 3*4096*14336 + 2*4096
    #            = 16,777,216 + 8,388,608 + 16,777,216 + 176,160,768 + 8,192 = 218,112,000
    #   body 32 * 218,112,000 = 6,979,584,000; embeddings 128,256 * 4096 = 525,336,576
    #   params = 6,979,584,000 + 2 * 525,336,576 + 4096 = 8,030,261,248; bf16 weights = 16,060,522,496 bytes
    # reserve 10% of 80 GiB = 8,589,934,592; KV budget = 85,899,345,920 - 16,060,522,496 - 8,589,934,592
    #                                                  = 61,248,888,832 bytes
    # KV per token = 2 * 32 layers * 8 heads * 128 * 2 bytes = 131,072; ideal = 61,248,888,832 // 131,072 = 467,291
    b = budget("llama-3-8b", 80 * GiB)
    assert b.params == 8_030_261_248
    assert b.weight_bytes == b.weight_bytes_per_gpu == 16_060_522_496
    assert b.reserve_bytes == 8_589_934_592
    assert b.kv_budget_bytes == 61_248_888_832
    assert b.kv_bytes_per_token_per_gpu == 131_072
    assert b.ideal_tokens == 467_291


def test_llama_3_70b_at_tp_4_on_80_gib():
    # per layer: 8192*64*128 + 2*8192*8*128 + 64*128*8192 + 3*8192*28672 + 2*8192
    #          = 67,108,864 + 16,777,216 + 67,108,864 + 704,643,072 + 16,384 = 855,654,400
    # body 80 * 855,654,400 = 68,452,352,000; embeddings 128,256 * 8192 = 1,050,673,152
    # params = 68,452,352,000 + 2 * 1,050,673,152 + 8192 = 70,553,706,496; bf16 = 141,107,412,992 bytes
    # per GPU: 141,107,412,992 / 4 = 35,276,853,248; KV budget = 85,899,345,920 - 35,276,853,248 - 8,589,934,592
    #                                                        = 42,032,558,080
    # 8 KV heads / 4 = 2 per GPU: 2 * 80 * 2 * 128 * 2 = 81,920 bytes per token; 42,032,558,080 // 81,920 = 513,092
    b = budget("llama-3-70b", 80 * GiB, tp=4)
    assert b.params == 70_553_706_496
    assert b.weight_bytes == 141_107_412_992 and b.weight_bytes_per_gpu == 35_276_853_248
    assert b.kv_budget_bytes == 42_032_558_080
    assert b.kv_heads_per_gpu == 2 and b.kv_bytes_per_token_per_gpu == 81_920
    assert b.ideal_tokens == 513_092


def rows(p) -> dict[str, int]:
    return {r.label: r.requests for r in p.rows}


def test_what_each_allocator_holds_llama_3_8b_at_100_tokens_a_request():
    # 61,248,888,832 bytes of KV (above), requests of 100 tokens, --max-len 2048:
    #   static max reserves 2048 rows a request: 467,291 // 2048 = 228 requests
    #   paged b16: 16 * 131,072 = 2 MiB blocks, 61,248,888,832 // 2 MiB = 29,205 blocks; ceil(100/16) = 7 a request:
    #              29,205 // 7 = 4,172
    #   paged b32: 4 MiB blocks: 14,602; ceil(100/32) = 4: 3,650
    #   vmm 2 MiB: per layer K (or V) is 8 * 128 * 2 = 2 KiB a token, so a page holds 1024 tokens; a request maps one
    #              page in each of 64 buffers; 29,205 pages // 64 = 456
    p = plan(PlanInputs(model="llama-3-8b", gpu_memory=80 * GiB, context=100))
    assert rows(p) == {"static": 228, "paged block 16": 4172, "paged block 32": 3650, "vmm page 2 MiB": 456}
    assert all(r.tokens == r.requests * 100 for r in p.rows)
    assert p.rows[1].share_of_ideal == pytest.approx(417_200 / 467_291)


def test_what_each_allocator_holds_llama_3_70b_tp_4_at_full_length():
    # 42,032,558,080 bytes per GPU, 2,048-token requests: static and paged hold 513,092 // 2048 = 250 (paged b16:
    # 42,032,558,080 // (16 * 81,920) = 32,067 blocks // 128 = 250); vmm: a GPU's per-layer row is 2 * 128 * 2 =
    # 512 bytes, a 2 MiB page 4096 tokens, so a 2048-token request still maps one page in each of 160 buffers (320
    # MiB): 42,032,558,080 // 2 MiB = 20,042 pages // 160 = 125 requests, half what paged holds.
    p = plan(PlanInputs(model="llama-3-70b", gpu_memory=80 * GiB, tp=4))
    assert rows(p) == {"static": 250, "paged block 16": 250, "paged block 32": 250, "vmm page 2 MiB": 125}


def test_a_tp_plan_holds_what_one_gpus_shard_holds():
    # The plan runs TP 4 as one GPU with 4x the budget and page size; build the shard itself (2 KV heads, 16 query
    # heads) with the per-GPU budget and check the allocators admit as many requests.
    b = budget("llama-3-70b", 80 * GiB, tp=4)
    full = get_spec("llama-3-70b")
    shard = type(full)(**{**full.__dict__, "name": "shard", "num_kv_heads": 2, "num_q_heads": 16})
    p = plan(PlanInputs(model="llama-3-70b", gpu_memory=80 * GiB, tp=4, context=300))
    for row in p.rows:
        cfg = RunConfig(allocator=row.allocator, **row.options)
        entry = registry.get(row.allocator)
        backend = SimMemory() if entry.needs_backend else None
        context = BuildContext(shard, b.kv_budget_bytes, NullRecorder(), 2048, 10_000, backend)
        alloc = entry.make(context, cfg)
        tokens, held = np.zeros(300, np.int32), 0
        while alloc.can_admit(300, 300):
            alloc.admit(held, tokens, 300)
            alloc.append(held, tokens)
            held += 1
        assert held == row.requests, row.label


def test_every_preset_has_its_weights():
    for name, spec in PRESETS.items():
        b = budget(name, 1 << 40)  # 1 TiB: every preset fits
        assert b.weight_bytes == ModelCosts.from_spec(spec).params * spec.dtype_bytes > 0, name


def test_a_workload_runs_through_each_configuration():
    p = plan(PlanInputs(model="llama-3-8b", gpu_memory=24 * GiB, workload="sharegpt", requests=30, context=512))
    for r in p.rows:
        w = r.workload
        assert w is not None and w["error"] is None, r.label
        assert w["finished"] == w["requests"] == 30
        assert 1 <= w["peak_batch"] <= 30 and w["peak_tokens"] > 0 and w["tokens_per_s"] > 0
    assert any("workload: sharegpt, 30 requests" in line for line in p.assumptions)
    tp = plan(
        PlanInputs(
            model="llama-3-70b", gpu_memory=80 * GiB, tp=4, workload="sharegpt", requests=10,
            allocators=("paged",), options={"block_size": (16,)},
        )
    )  # fmt: skip
    assert all(r.workload["tokens_per_s"] is None for r in tp.rows)  # a one-GPU clock is no TP clock


def test_json_for_scripts(capsys):
    assert cli.main(["plan", "--model", "llama-3-8b", "--gpu-memory", "80GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["budget"]["kv_budget_bytes"] == 61_248_888_832
    assert {r["label"] for r in out["allocators"]} == {"static", "paged block 16", "paged block 32", "vmm page 2 MiB"}
    assert out["assumptions"] and out["inputs"]["context"] == 2048


def test_text_output_names_the_budget_and_the_assumptions(capsys):
    assert cli.main(["plan", "--model", "llama-3-8b", "--gpu-memory", "80GiB", "--reserve", "4GiB"]) == 0
    out = capsys.readouterr().out
    # 85,899,345,920 - 16,060,522,496 (weights) - 4,294,967,296 (reserve) = 65,543,856,128 bytes = 61.04 GiB
    (line,) = [x for x in out.splitlines() if "= KV budget" in x]
    assert format_bytes(65_543_856_128) in line
    assert "assumptions" in out and "reserve: 4 GiB" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "llama-3-70b", "--gpu-memory", "80GiB"], "does not fit 80 GiB"),
        (["--model", "llama-3-70b", "--gpu-memory", "80GiB"], "--tp 2 leaves some"),
        (["--model", "llama-3-70b", "--gpu-memory", "80GiB", "--tp", "3"], "64 query heads do not split"),
        (["--model", "llama-3-8b", "--gpu-memory", "lots"], "--gpu-memory: not a size"),
        (["--model", "llama-3-8b", "--gpu-memory", "80GiB", "--reserve", "120%"], "--reserve 120%"),
        (["--model", "llama-3-8b", "--gpu-memory", "80GiB", "--context", "4096"], "--context: must be in 1..--max-len"),
        (["--model", "nope", "--gpu-memory", "80GiB"], "unknown model preset"),
        (["--model", "llama-3-8b", "--gpu-memory", "80GiB", "--allocator", "paged", "--block-size", "0"], "--block"),
        (["--model", "llama-3-8b", "--gpu-memory", "80GiB", "--workload", "nosuch"], "unknown workload"),
        (
            ["--model", "llama-3-8b", "--gpu-memory", "80GiB", "-a", "vmm", "--block-size", "16"],
            "applies to --allocator",
        ),
    ],
)
def test_bad_inputs_are_one_line(capsys, argv, message):
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvscope plan: error: ") and message in err, err
