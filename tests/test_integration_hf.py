"""kvscope.integrations.hf_transformers: HF transformers' own continuous batching (`generate_batch`, paged|sdpa, on
the CPU) recorded without changing transformers. A tiny random Llama in kvscope's "tiny" preset geometry runs
small workloads built to push HF's block manager through its paths (prefix-cache hits, evictions, recompute and
swap preemptions, forked samples); each trace is checked against HF's own books and kvscope's replay of it, and
renders in the report next to kvscope's paged run of the same workload.

Needs transformers (pip install 'kvscope[hf]'); without it these tests skip, except the one-line error when it is
missing. A generate_batch here takes about a second (explicit num_blocks and max_batch_tokens: HF's own sizing
from free memory is what made REFERENCE.md's CPU run take 33 s)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from kvscope.analysis import fragmentation
from kvscope.analysis.memory import memory_timeline
from kvscope.analysis.summary import summarize
from kvscope.errors import UserError
from kvscope.integrations import hf_transformers
from kvscope.present.views import split
from kvscope.spec import get_spec
from kvscope.trace import load_trace

BLOCK = 8
NEW_TOKENS = 12
TINY = get_spec("tiny")  # 2 layers, 2 KV heads of 16, float32: 512 bytes a token, like the model below


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers", reason="HF transformers is not installed (pip install 'kvscope[hf]')")
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=TINY.vocab_size, hidden_size=TINY.hidden, intermediate_size=TINY.ffn,
        num_hidden_layers=TINY.num_layers, num_attention_heads=TINY.q_heads, num_key_value_heads=TINY.num_kv_heads,
        max_position_embeddings=512,
    )  # fmt: skip
    config._attn_implementation = "paged|sdpa"
    model = LlamaForCausalLM(config).eval()
    return types.SimpleNamespace(
        torch=torch, model=model, GenerationConfig=GenerationConfig, ContinuousBatchingConfig=ContinuousBatchingConfig
    )


def prompts() -> list[list[int]]:
    """Eight prompts; three start with the same 24 tokens (3 blocks), the later two after the first is computed."""
    rng = np.random.default_rng(1)

    def tokens(n: int) -> list[int]:
        return rng.integers(1, TINY.vocab_size, n).tolist()

    common = tokens(24)
    return [common + tokens(3), tokens(40), tokens(30), common + tokens(5), tokens(20), common + tokens(2),
            tokens(33), tokens(12)]  # fmt: skip


def generate(hf, path, *, num_blocks: int, samples: int = 1, offload: float = 0.0):
    gen = hf.GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=samples > 1, num_return_sequences=samples, eos_token_id=-1, pad_token_id=0
    )
    cb = hf.ContinuousBatchingConfig(
        block_size=BLOCK, num_blocks=num_blocks, max_batch_tokens=48, cpu_offload_space=offload
    )
    threads = hf.torch.get_num_threads()
    hf.torch.set_num_threads(1)  # two cores shared by everyone: one is plenty for this model
    try:
        with hf_transformers.record(path, model=hf.model, meta={"workload": {"name": "test prompts"}}) as hook:
            out = hf.model.generate_batch(prompts(), generation_config=gen, continuous_batching_config=cb, warmup=False)
    finally:
        hf.torch.set_num_threads(threads)
    assert all(o.error is None and len(o.generated_tokens) == NEW_TOKENS for o in out.values())
    assert len(out) == len(prompts())  # generate_batch returns the requests it was given (forked samples aside)
    return hook


@pytest.fixture(scope="module")
def pressure(hf, tmp_path_factory):
    """14 blocks of 8 tokens for eight requests of 12 new tokens: hits, evictions and recompute preemptions."""
    path = tmp_path_factory.mktemp("hf") / "hf-pressure.kvtrace"
    hook = generate(hf, path, num_blocks=14)
    return hook, load_trace(path)


def test_the_trace_is_hfs_run(pressure):
    hook, trace = pressure
    assert hook.mismatches == [] and hook.ignored_caches == 0
    assert not trace.truncated and trace.meta["source"] == "hf-transformers" and trace.meta["cannot_see"]
    assert trace.label == f"hf paged b{BLOCK}" and trace.meta["versions"]["transformers"]
    assert trace.meta["spec"]["bytes_per_token"] == TINY.bytes_per_token
    assert trace.meta["engine_config"]["attn_implementation"] == "paged|sdpa"
    s = summarize(trace)
    lengths = [len(p) for p in prompts()]
    assert s["requests"] == s["finished"] == len(lengths)
    assert s["generated_tokens"] == len(lengths) * NEW_TOKENS
    assert s["prompt_tokens"] == sum(lengths)
    assert s["capacity_bytes"] == 14 * BLOCK * TINY.bytes_per_token
    # HF's req_i is seq i (generate_batch reorders its inputs for prefix sharing: they do not arrive in order),
    # wanting NEW_TOKENS; each finished holding P + O - 1 tokens.
    ev = trace.events
    arrive = ev[ev["kind"] == "arrive"].sort_values("seq")
    assert arrive["seq"].tolist() == list(range(len(lengths))) and arrive["n"].tolist() == lengths
    assert set(arrive["aux"]) == {NEW_TOKENS}
    finish = ev[ev["kind"] == "finish"].set_index("seq")["n"].to_dict()
    assert finish == {i: p + NEW_TOKENS - 1 for i, p in enumerate(lengths)}
    # The paths this workload was built for happened, as HF's block manager took them.
    assert s["prefix_hit_tokens"] > 0 and s["evictions"] > 0 and s["preemptions_recompute"] > 0


def test_kvscopes_replay_agrees_with_hfs_books_at_every_step(pressure):
    _, trace = pressure
    timeline = memory_timeline(trace).set_index("step")
    bb = BLOCK * TINY.bytes_per_token
    for step, row in timeline.iterrows():
        states = fragmentation.block_states(trace, int(step))
        counts = states["state"].value_counts()
        active = int(counts.get("active", 0) + counts.get("shared", 0))
        assert active * bb == row["reserved"], step
        assert int(counts.get("cached_idle", 0)) * bb == row["cached_idle"], step
        assert int(states.loc[states["ref_count"] > 0, "fill"].sum()) * TINY.bytes_per_token == row["used"], step
    assert timeline["reserved"].iloc[-1] == 0  # everything released at the end, cached blocks kept apart
    assert timeline["cached_idle"].iloc[-1] > 0


def test_every_view_renders_and_the_report_shows_kvscopes_paged_run_beside_it(pressure):
    from kvscope.engine.api import RunConfig, record_run
    from kvscope.report import build_report
    from kvscope.workload import Request

    _, trace = pressure
    shown, _ = split(trace)
    assert {"memory", "fragmentation", "blocks", "throughput", "requests", "prefix"} <= {v.key for v in shown}
    for view in shown:
        assert view.figure(trace).data, view.key
    same = [Request(f"req_{i}", 0.0, len(p), NEW_TOKENS, prompt=tuple(p)) for i, p in enumerate(prompts())]
    cfg = RunConfig(allocator="paged", device="sim", model="tiny", kv_memory=14 * BLOCK * TINY.bytes_per_token,
                    block_size=BLOCK, prefix_caching=True, max_batch=256, max_tokens_per_step=48)  # fmt: skip
    ours = record_run(same, cfg).trace()
    assert summarize(ours)["generated_tokens"] == summarize(trace)["generated_tokens"]
    page = build_report([trace, ours])
    assert f"hf paged b{BLOCK}" in page and f"paged b{BLOCK}" in page and "Runs compared" in page


def test_forked_samples_share_and_copy_blocks(hf, tmp_path):
    hook = generate(hf, tmp_path / "forks.kvtrace", num_blocks=40, samples=2)
    assert hook.mismatches == []
    trace = load_trace(tmp_path / "forks.kvtrace")
    s = summarize(trace)
    assert s["forks"] == len(prompts()) and s["generated_tokens"] == 2 * len(prompts()) * NEW_TOKENS
    assert s["sharing_saved_bytes_peak"] > 0
    assert "sharing" in {v.key for v in split(trace)[0]}


def test_swap_preemptions(hf, tmp_path, monkeypatch):
    """HF swaps to pinned CPU memory, which a CPU-only torch cannot allocate: the test hands HF's offloading
    manager a torch whose `empty` ignores pin_memory (transformers' code itself is unchanged)."""
    from transformers.generation.continuous_batching import offloading_manager

    class Unpinned(types.ModuleType):
        def __getattr__(self, name):
            return getattr(hf.torch, name)

        @staticmethod
        def empty(*args, pin_memory=False, **kwargs):
            return hf.torch.empty(*args, **kwargs)

    monkeypatch.setattr(offloading_manager, "torch", Unpinned("torch"))
    hook = generate(hf, tmp_path / "swap.kvtrace", num_blocks=14, offload=0.001)
    assert hook.mismatches == []
    s = summarize(load_trace(tmp_path / "swap.kvtrace"))
    assert s["preemptions_swap"] > 0 and s["finished"] == len(prompts())
    ev = load_trace(tmp_path / "swap.kvtrace").events
    assert (ev["kind"] == "swap_in").sum() == (ev["kind"] == "swap_out").sum() == s["preemptions_swap"]


def test_the_hook_leaves_transformers_as_it_was(hf):
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.scheduler import FIFOScheduler, Scheduler

    before = dict(PagedAttentionCache.__dict__), dict(Scheduler.__dict__), dict(FIFOScheduler.__dict__)
    with pytest.raises(UserError, match="no paged cache was built"), hf_transformers.record(None):
        assert PagedAttentionCache.__dict__["allocate_blocks"] is not before[0]["allocate_blocks"]
    assert (dict(PagedAttentionCache.__dict__), dict(Scheduler.__dict__), dict(FIFOScheduler.__dict__)) == before


def test_refusals_are_one_line(hf, monkeypatch):
    hybrid = types.SimpleNamespace(config=types.SimpleNamespace(layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(UserError, match="sliding_attention layers") as info, hf_transformers.record(model=hybrid):
        pass
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="no paged cache"), hf_transformers.record(None):  # noqa: SIM117
        with pytest.raises(UserError, match="already active"), hf_transformers.record(None):
            pass
    from transformers.generation.continuous_batching.cache_manager import BlockManager

    monkeypatch.delattr(BlockManager, "has_enough_free_blocks")
    with pytest.raises(UserError, match=r"BlockManager lacks has_enough_free_blocks.*5\.17"):
        hf_transformers._classes()


def test_missing_transformers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r"not importable .*pip install 'kvscope\[hf\]'"):
        hf_transformers._classes()
