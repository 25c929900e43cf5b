"""Eviction policies inside the paged allocator (kvscope.policies.engine): the default stays vLLM's LRU block for
block, an explicit policy only changes which cached-idle block an allocation evicts, and the books stay right."""

from __future__ import annotations

import numpy as np
import pytest

from kvscope.alloc.paged import PagedAllocator
from kvscope.policies.engine import engine_policies
from kvscope.recorder import Recorder
from kvscope.spec import get_spec
from kvscope.trace import trace_from_recorder
from kvscope.workload import stream_tokens

SPEC = get_spec("tiny")
BS = 4


def run(eviction: str | None, prompts: list[np.ndarray], blocks: int = 10) -> tuple[list[int], list[int]]:
    """Prompts one at a time (admit, prefill, free): (hit tokens per prompt, evicted hashes in order)."""
    rec = Recorder(None)
    alloc = PagedAllocator(
        SPEC, blocks * BS * SPEC.bytes_per_token, rec, block_size=BS, enable_prefix_caching=True, eviction=eviction
    )
    hits = []
    for i, p in enumerate(prompts):
        h = alloc.admit(i, p, len(p) + 1)
        alloc.append(i, p[h:])
        alloc.check_invariants()
        hits.append(h)
        alloc.free(i)
        alloc.check_invariants()
    ev = trace_from_recorder(rec).events
    return hits, ev[ev["kind"] == "block_evict"]["aux"].tolist()


def prompts(seed: int = 0, n: int = 60) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    heads = [stream_tokens(f"head{i}", 0, 4 * BS) for i in range(3)]
    out = []
    for i in range(n):
        head = heads[int(rng.integers(0, 3))][: BS * int(rng.integers(1, 5))]
        tail = stream_tokens(f"tail{i % 7}", 0, int(rng.integers(1, 3 * BS)))
        out.append(np.concatenate([head, tail]).astype(np.int64))
    return out


def test_eviction_lru_is_the_default_block_for_block():
    ps = prompts()
    assert run("lru", ps) == run(None, ps)


@pytest.mark.parametrize("policy", ["fifo", "lfu", "arc", "s3fifo"])
def test_other_policies_run_with_the_invariants_and_change_only_the_victims(policy):
    ps = prompts(1)
    hits, evicted = run(policy, ps)
    default_hits, default_evicted = run(None, ps)
    assert len(hits) == len(ps) and evicted  # under pressure
    assert (hits, evicted) != (default_hits, default_evicted) or policy == "fifo"


def test_fifo_differs_from_lru_where_a_hit_refreshes_a_block():
    a = stream_tokens("a", 0, 2 * BS + 1).astype(np.int64)
    b = stream_tokens("b", 0, 2 * BS + 1).astype(np.int64)
    c = stream_tokens("c", 0, 2 * BS + 1).astype(np.int64)
    seq = [a, b, a, c, a]  # room for 2 chains of 2 blocks (+ the partial blocks): LRU keeps a, FIFO drops it
    lru_hits, _ = run(None, seq, blocks=5)
    fifo_hits, _ = run("fifo", seq, blocks=5)
    assert lru_hits == [0, 0, 2 * BS, 0, 2 * BS]
    assert fifo_hits == [0, 0, 2 * BS, 0, 0]


def test_policies_that_need_the_lab_are_refused_in_one_line():
    assert set(engine_policies()) == {"lru", "fifo", "lfu", "arc", "s3fifo"}
    for name, need in (("belady", "future"), ("sglang", "tree"), ("discard", "predictions")):
        with pytest.raises(ValueError, match=rf"--eviction {name}: needs .*{need}"):
            PagedAllocator(
                SPEC, 64 * BS * SPEC.bytes_per_token, block_size=BS, enable_prefix_caching=True, eviction=name
            )
    with pytest.raises(ValueError, match="unknown eviction policy"):
        PagedAllocator(SPEC, 64 * BS * SPEC.bytes_per_token, block_size=BS, enable_prefix_caching=True, eviction="nope")
    with pytest.raises(ValueError, match="--eviction needs --prefix-caching"):
        PagedAllocator(SPEC, 64 * BS * SPEC.bytes_per_token, block_size=BS, eviction="fifo")
