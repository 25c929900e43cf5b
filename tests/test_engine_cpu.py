"""The cpu executor: a real Llama-shaped model whose attention reads K/V through each allocator's own layout.

Shadow mode recomputes every attention call on a contiguous copy of each sequence's K/V; these tests run forks,
prefix hits, swaps and recompute through it on all three allocators, and corrupt a block table / a base row to prove
that a wrong layout is caught.
"""

from __future__ import annotations

import pytest
import torch

from kvscope.engine import Engine, RunConfig, make_allocator, make_backend, make_executor, record_run
from kvscope.engine.executor import ExecutorOptions
from kvscope.engine.model import attention
from kvscope.engine.torch_executor import ShadowMismatch
from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.spec import get_spec
from kvscope.trace import trace_from_recorder
from kvscope.workload import Request, SharedPrefix

SPEC = get_spec("tiny")
BPT = SPEC.bytes_per_token

SHARED = SharedPrefix("sys", 20)
# Forks (n=2), a shared 20-token system prompt, prompts over several 8-token blocks.
WORKLOAD = [Request(f"r{i}", 0.0, 24 + 3 * i, 5, n=1 + i % 2, shared_prefix=SHARED) for i in range(4)]

LAYOUTS = [
    ("paged", {"block_size": 8, "prefix_caching": True}),
    ("paged", {"block_size": 8}),
    ("static", {}),
    ("static", {"static_variant": "oracle"}),
    ("vmm", {"page_size": 4096}),
    ("vmm", {"page_size": 4096, "megacache": True}),
]
LAYOUT_IDS = ["paged-prefix", "paged", "static", "static-oracle", "vmm", "vmm-megacache"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: one thread is faster than many on a shared machine, and keeps float sums in a stable order.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cpu_config(allocator: str, **options) -> RunConfig:
    options.setdefault("kv_memory", 1 << 20)
    return RunConfig(allocator=allocator, device="cpu", max_len=64, shadow=True, check_invariants=True, **options)


class Built:
    """An engine on the cpu executor that the test steps by hand."""

    def __init__(self, requests, cfg: RunConfig) -> None:
        self.recorder = Recorder(None)
        self.backend = make_backend("cpu") if cfg.allocator == "vmm" else None
        self.alloc = make_allocator(cfg, SPEC, self.recorder, self.backend)
        self.executor = make_executor("cpu", SPEC, self.alloc, ExecutorOptions(shadow=True))
        self.engine = Engine(requests, self.alloc, self.executor, self.recorder, SPEC, cfg.scheduler_config())

    def close(self) -> None:
        self.executor.close()
        if self.backend is not None:
            self.alloc.close()
            self.backend.close()


@pytest.fixture
def build():
    made: list[Built] = []

    def make(requests, cfg):
        b = Built(requests, cfg)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.mark.parametrize(("allocator", "options"), LAYOUTS, ids=LAYOUT_IDS)
def test_attention_through_the_layout_matches_the_contiguous_reference(allocator, options):
    seen = {}
    result = record_run(WORKLOAD, cpu_config(allocator, **options), setup=lambda e: seen.setdefault("engine", e))
    executor = seen["engine"].executor
    assert result.stats.finished_requests == len(WORKLOAD)
    assert result.stats.finished_sequences == 6  # two requests fork one child each
    ev = result.trace().events
    steps = ev[ev["kind"] == "step"]
    # Every sequence's attention in every step and layer was compared with the reference (none skipped), and agreed.
    assert executor.shadow_checks == SPEC.num_layers * steps["n"].sum() > 0
    assert executor.max_shadow_error <= 1e-4
    assert result.meta["device"] == "cpu"
    assert (steps["aux"] == -1).all()  # measured clock: no simulated time


def test_prefix_hits_are_really_served_from_shared_blocks():
    seen = {}
    result = record_run(
        WORKLOAD, cpu_config("paged", block_size=8, prefix_caching=True), setup=lambda e: seen.setdefault("e", e)
    )
    ev = result.trace().events
    hits = ev[ev["kind"] == "admit"]["aux"].tolist()
    assert hits == [0, 16, 16, 16]  # two full 8-token blocks of the 20-token system prompt
    assert seen["e"].executor.max_shadow_error <= 1e-4


def test_incremental_decode_keys_equal_a_full_forward_over_the_same_tokens(build):
    """K/V written step by step (prefill, then one token per decode, RoPE at each position) equal the K/V of a single
    forward pass over the whole token sequence: positions and layout rows line up."""
    req = Request("a", 0.0, 13, 7)
    b = build([req], cpu_config("paged", block_size=4))
    for _ in range(5):
        b.engine.step()
    seq = b.engine.scheduler.sequences[0]
    held = seq.held  # 13 prompt tokens + 4 decoded inputs
    assert held == 17
    ids = torch.cat([torch.from_numpy(req.prompt_tokens()), torch.from_numpy(req.output_tokens(0, 0, 4))]).long()
    full_k = {}

    def attend(layer, q, k, v):
        full_k[layer] = k.clone()
        return attention(q, k, v, 0)

    with torch.inference_mode():
        b.executor.model.forward(ids, torch.arange(held), attend, None)
    rows = b.executor.layout.rows(0, held)
    for layer in range(SPEC.num_layers):
        got = b.executor.layout.keys(layer).index_select(0, rows)
        torch.testing.assert_close(got, full_k[layer], rtol=1e-4, atol=1e-4)


def test_swap_moves_the_data_and_attention_still_matches():
    workload = [Request("a", 0.0, 8, 10), Request("b", 0.0, 8, 10)]
    seen = {}
    cfg = cpu_config("paged", block_size=4, kv_memory=6 * 4 * BPT, preemption="swap", swap_space=16 * 4 * BPT)
    result = record_run(workload, cfg, setup=lambda e: seen.setdefault("e", e))
    ev = result.trace().events
    assert (ev["kind"] == "swap_out").sum() == 1 and (ev["kind"] == "swap_in").sum() == 1
    assert result.stats.finished_requests == 2
    # After swap-in, b's attention read blocks restored from the CPU pool (into different GPU blocks) and matched.
    assert seen["e"].executor.max_shadow_error <= 1e-4


@pytest.mark.parametrize("allocator", ["paged", "static"])
def test_recompute_preemption_rebuilds_kv_that_matches(allocator):
    workload = [Request("a", 0.0, 8, 10), Request("b", 0.0, 8, 10)]
    opts = {"block_size": 4, "kv_memory": 6 * 4 * BPT} if allocator == "paged" else {"kv_memory": 64 * BPT}
    seen = {}
    result = record_run(workload, cpu_config(allocator, **opts), setup=lambda e: seen.setdefault("e", e))
    assert result.stats.finished_requests == 2
    if allocator == "paged":
        assert result.stats.preemptions == 1
    assert seen["e"].executor.max_shadow_error <= 1e-4


def test_corrupted_block_table_is_detected(build):
    b = build(WORKLOAD, cpu_config("paged", block_size=8))
    for _ in range(2):
        b.engine.step()
    real = b.alloc.block_table
    b.alloc.block_table = lambda seq: list(reversed(real(seq)))  # right blocks, wrong order
    with pytest.raises(ShadowMismatch, match="paged layout differs"):
        b.engine.step()


def test_block_table_of_another_sequence_is_detected(build):
    b = build(WORKLOAD, cpu_config("paged", block_size=8))
    b.engine.step()
    real = b.alloc.block_table
    b.alloc.block_table = lambda seq: real(1) if seq == 0 else real(seq)
    with pytest.raises(ShadowMismatch, match="layout differs"):
        b.engine.step()


@pytest.mark.parametrize("allocator", ["static", "vmm"])
def test_wrong_token_base_is_detected(build, allocator):
    opts = {"page_size": 4096} if allocator == "vmm" else {}
    b = build(WORKLOAD, cpu_config(allocator, **opts))
    b.engine.step()
    real = b.alloc.token_base
    b.alloc.token_base = lambda seq: real(seq) + 1
    with pytest.raises(ShadowMismatch, match="layout differs"):
        b.engine.step()


def test_vmm_kv_lives_in_the_mapped_pages(build):
    """The cpu executor writes K/V into the VMM allocator's own mmap'd memory: reading the memfd page at the slot's
    offset gives back the same bytes."""
    import os

    b = build([Request("a", 0.0, 10, 3)], cpu_config("vmm", page_size=4096))
    b.engine.step()
    keys0 = b.executor.layout.keys(0)
    base = b.alloc.token_base(0)
    assert Kind.PAGE_MAP.name.lower() in trace_from_recorder(b.recorder).events["kind"].tolist()
    handle = b.backend.mapped_handle(b.alloc.buffer_addresses()[0] + base * b.alloc.buffer_row_bytes)
    raw = os.pread(b.backend.fd, 10 * b.alloc.buffer_row_bytes, handle.offset)
    from_page = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(10, SPEC.num_kv_heads, SPEC.head_dim)
    torch.testing.assert_close(from_page, keys0[base : base + 10].clone())
    assert from_page.abs().sum() > 0


def test_gqa_attention_matches_a_naive_softmax():
    torch.manual_seed(0)
    n, q_heads, kv_heads, d, ctx, start = 5, 8, 2, 16, 12, 7
    q, k, v = torch.randn(n, q_heads, d), torch.randn(ctx, kv_heads, d), torch.randn(ctx, kv_heads, d)
    group = q_heads // kv_heads
    expected = torch.empty(n, q_heads, d)
    for i in range(n):
        for h in range(q_heads):
            keys, vals = k[: start + i + 1, h // group], v[: start + i + 1, h // group]  # causal: keys 0..start+i
            weights = torch.softmax(keys @ q[i, h] / d**0.5, dim=0)
            expected[i, h] = weights @ vals
    torch.testing.assert_close(attention(q, k, v, start), expected, rtol=1e-5, atol=1e-5)


def test_executor_restores_the_thread_count(build):
    before = torch.get_num_threads()
    b = build([Request("a", 0.0, 4, 2)], cpu_config("static"))
    b.close()
    assert torch.get_num_threads() == before


# ---- the engine asks allocators what they can do, never their name ----------------------------------------------


def test_an_allocator_the_engine_does_not_know_runs_by_its_capabilities(monkeypatch):
    """A user's allocator registered under its own name (64-token blocks, through the registry only) gets the block
    layout, shadow-checked attention and the sdpa refusal from what it is (block-addressed), not from a name."""
    from kvscope.alloc import registry
    from kvscope.alloc.paged import PagedAllocator

    class Chunky(PagedAllocator):
        name = "chunky"

    def build(context, options):
        return Chunky(context.spec, context.capacity_bytes, context.recorder, block_size=64)

    entry = registry.AllocatorEntry(name="chunky", description="64-token blocks", build=build, addressing="blocks")
    monkeypatch.setitem(registry._REGISTRY, "chunky", entry)
    seen = {}
    result = record_run(WORKLOAD, cpu_config("chunky"), setup=lambda e: seen.setdefault("engine", e))
    executor = seen["engine"].executor
    assert result.stats.finished_sequences == 6
    assert executor.shadow_checks > 0 and executor.max_shadow_error <= 1e-4
    assert result.meta["allocator"] == "chunky" and result.meta["allocator_config"]["block_size"] == 64
    with pytest.raises(ValueError, match="--attention sdpa applies to --allocator static or vmm .*, not chunky"):
        RunConfig(allocator="chunky", attention="sdpa").validate()
    with pytest.raises(ValueError, match="--block-size applies to --allocator paged, not chunky"):
        RunConfig(allocator="chunky", block_size=8).validate()


def test_an_allocator_with_no_known_layout_is_one_line():
    from types import SimpleNamespace

    from kvscope.engine.layout import make_layout

    with pytest.raises(ValueError, match="^no K/V layout for the bare allocator: it has neither"):
        make_layout(SPEC, SimpleNamespace(name="bare"), torch.device("cpu"))


def test_kv_tensors_that_cannot_be_allocated_name_the_kv_memory(monkeypatch):
    from kvscope.engine import torch_executor
    from kvscope.errors import UserError

    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1048576 bytes")

    monkeypatch.setattr(torch_executor, "make_layout", refuse)
    with pytest.raises(UserError, match=r"^--kv-memory 1 MiB: could not allocate the KV tensors on cpu \(Default"):
        record_run(WORKLOAD, cpu_config("paged"))


# ---- beam search and VMM page sharing (issue 11) ------------------------------------------------------------------
BEAMS = [Request("b0", 0.0, 20, 6, beam=3), Request("b1", 0.0, 9, 5, beam=2)]


@pytest.mark.parametrize(
    ("allocator", "options"), [LAYOUTS[1], LAYOUTS[4], LAYOUTS[5]], ids=["paged", "vmm", "vmm-megacache"]
)
def test_beam_search_on_cpu_attends_like_the_contiguous_reference(allocator, options):
    """Beams forked during decode share K/V (blocks, or pages mapped into several slots) and copy the shared
    partly filled block/page before writing; every attention call agrees with the shadow's contiguous copy."""
    seen = {}
    result = record_run(BEAMS, cpu_config(allocator, **options), setup=lambda e: seen.setdefault("engine", e))
    executor = seen["engine"].executor
    ev = result.trace().events
    kinds = ev["kind"].astype(str)
    forks, prunes = int((kinds == "fork").sum()), int((kinds == "prune").sum())
    assert forks == 2 + 1 + prunes  # the first K - 1 beams of each request, then one fork per pruned beam
    assert prunes > 0 and result.stats.finished_sequences == 5  # the width stays 3 + 2
    steps = ev[kinds == "step"]
    assert executor.shadow_checks == SPEC.num_layers * steps["n"].sum() > 0
    assert executor.max_shadow_error <= 1e-4
    cow = "page_cow" if allocator == "vmm" else "block_cow"
    assert (kinds == cow).any(), "no shared partly filled block or page was copied"


def _logits_of_a_vmm_run(requests, page_sharing: bool) -> tuple[list[torch.Tensor], int]:
    """Every step's logits of a cpu run on vmm built by hand (the engine has no flag for page sharing), and how many
    PAGE_COW events it recorded."""
    from kvscope.alloc.vmm import VMMAllocator

    recorder = Recorder(None)
    backend = make_backend("cpu")
    alloc = VMMAllocator(
        SPEC, 1 << 20, recorder, backend=backend, max_batch=16, max_len=64, page_size=4096, page_sharing=page_sharing
    )
    executor = make_executor("cpu", SPEC, alloc, ExecutorOptions(shadow=False))
    engine = Engine(requests, alloc, executor, recorder, SPEC, cpu_config("vmm").scheduler_config())
    logits = []
    try:
        while not engine.scheduler.done:
            engine.step()
            if executor.last_logits is not None:
                logits.append(executor.last_logits.clone())
    finally:
        executor.close()
        alloc.close()
        backend.close()
    kinds = trace_from_recorder(recorder).events["kind"].astype(str)
    return logits, int((kinds == "page_cow").sum())


def test_attention_over_aliased_pages_equals_attention_over_copied_rows():
    """The same forks and beams run twice on real mmap'd pages: children mapping their parent's memfd pages (aliased
    slots, copy-on-write) and children given a copy of the rows (no sharing). Every step's logits are equal."""
    requests = [Request("p", 0.0, 40, 4, n=3), *BEAMS]
    shared, cows = _logits_of_a_vmm_run(requests, page_sharing=True)
    copied, no_cows = _logits_of_a_vmm_run(requests, page_sharing=False)
    assert cows > 0 and no_cows == 0
    assert len(shared) == len(copied) > 0
    for a, b in zip(shared, copied, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
