"""Each eviction policy on hand-made request sequences whose outcome is worked out by hand, plus the properties the
lab's contract promises (hits are a cached prefix, victims are never the current request's, causes sum to misses)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvscope.lab.accesses import from_chains
from kvscope.lab.oracle import context
from kvscope.lab.replay import replay
from kvscope.lab.sweep import run_one
from kvscope.policies import registry
from kvscope.policies.base import PolicyContext
from kvscope.policies.lru import LRU


def hits(chains, policy, capacity, arrivals=None, **kw) -> list[int]:
    acc = from_chains(chains, arrivals)
    return run_one(acc, policy, capacity, **kw)[1].hits.tolist()


def singles(*names):
    return [[n] for n in names]


def test_lru_and_the_optimum_differ_on_a_cyclic_scan():
    # 1 2 3 repeated with room for 2: LRU always evicts the block needed next (no hit); Belady keeps one of the
    # two (hits at requests 3, 5, 7, worked out in the comments of kvscope.policies.belady's rule).
    seq = singles(1, 2, 3, 1, 2, 3, 1, 2, 3)
    assert hits(seq, "lru", 2) == [0] * 9
    assert hits(seq, "belady", 2) == [0, 0, 0, 1, 0, 1, 0, 1, 0]


def test_lru_evicts_a_chain_tail_first_and_naive_lru_its_head():
    # A-B-C cached, then D needs room for one block: vLLM's order drops C, so A-B still hits;
    # prompt-order LRU drops the head A, and B, C stay cached behind a missing block (gaps).
    seq = [[1, 2, 3], [4], [1, 2, 3]]
    acc = from_chains(seq)
    lru = replay(acc, registry.get("lru").build(PolicyContext(3)), 3)
    assert lru.hits.tolist() == [0, 0, 2] and lru.gap.tolist() == [0, 0, 0]
    naive = replay(acc, registry.get("lru-naive").build(PolicyContext(3)), 3)
    assert naive.hits.tolist() == [0, 0, 0] and naive.gap.tolist() == [0, 0, 2]


def test_fifo_does_not_refresh_on_a_hit_but_lru_does():
    seq = singles(1, 2, 1, 3, 1)  # room for 2: FIFO evicts 1 (oldest) for 3; LRU evicts 2
    assert hits(seq, "fifo", 2) == [0, 0, 1, 0, 0]
    assert hits(seq, "lru", 2) == [0, 0, 1, 0, 1]


def test_lfu_keeps_the_block_used_most():
    seq = singles(1, 1, 2, 3, 1)  # 1 used twice: LFU evicts 2 for 3; LRU evicts 1 (older than 2)
    assert hits(seq, "lfu", 2) == [0, 1, 0, 0, 1]
    assert hits(seq, "lru", 2) == [0, 1, 0, 0, 0]


def test_arc_survives_a_scan_that_flushes_lru():
    # 1 and 2 used twice (ARC's T2), then a one-time scan of 10 blocks through a cache of 4: ARC keeps 1 and 2
    # (the scan only cycles through T1), LRU has lost them.
    seq = singles(1, 2, 1, 2, *range(10, 20), 1, 2)
    assert hits(seq, "arc", 4)[-2:] == [1, 1]
    assert hits(seq, "lru", 4)[-2:] == [0, 0]


def test_s3fifo_moves_reused_blocks_to_main_and_drops_one_hit_wonders():
    # 1 and 2 hit twice while in the small queue, so they move to the main queue; the scan of 20 one-time blocks
    # passes through the small queue (1 block) only. FIFO keeps no block that old.
    seq = singles(1, 2, 1, 2, 1, 2, *range(10, 30), 1, 2)
    assert hits(seq, "s3fifo", 10)[-2:] == [1, 1]
    assert hits(seq, "fifo", 10)[-2:] == [0, 0]


def test_trtllm_priority_retains_a_prompts_first_block_and_expires():
    # Chains head-first; each prompt's first block is retained at priority 80. [1, 2] is pushed out of a 3-block
    # LRU cache by three prompts sharing head 3; with retention, block 2 (priority 35) goes first and 1 stays.
    seq = [[1, 2], [3, 4], [3, 5], [3, 6], [1, 2]]
    assert hits(seq, "lru", 3)[-1] == 0
    assert hits(seq, "trtllm", 3)[-1] == 1
    # A retention of 1.5 s (requests 1 s apart): block 1's priority has expired when room is needed.
    assert hits(seq, "trtllm", 3, options={"duration_s": 1.5})[-1] == 0


def _random_tree_chains(seed: int, requests: int = 300) -> list[list[int]]:
    """Requests that extend random earlier chains (a prefix tree with reuse), like multi-turn traffic."""
    rng = random.Random(seed)
    chains: list[list[int]] = []
    fresh = 0
    for _ in range(requests):
        if chains and rng.random() < 0.7:
            base = rng.choice(chains)
            chain = base[: rng.randint(1, len(base))]
        else:
            chain = []
        for _ in range(rng.randint(1, 6)):
            fresh += 1
            chain = [*chain, fresh]
        chains.append(chain)
    return chains


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sglang_leaf_lru_evicts_exactly_what_vllm_lru_does(seed):
    acc = from_chains(_random_tree_chains(seed))
    for capacity in (8, 20, 60):
        lru = replay(acc, registry.get("lru").build(context(acc, capacity)), capacity, explain=True)
        radix = replay(acc, registry.get("sglang").build(context(acc, capacity)), capacity, explain=True)
        assert lru.hits.tolist() == radix.hits.tolist()
        assert lru.evicted_by is not None and radix.evicted_by is not None
        assert lru.evicted_by.tolist() == radix.evicted_by.tolist()


@pytest.mark.parametrize("seed", [4, 5])
def test_the_optimum_beats_every_policy_and_the_contract_holds(seed):
    acc = from_chains(_random_tree_chains(seed))
    for capacity in (10, 40):
        rows = {name: run_one(acc, name, capacity)[0] for name in registry.names()}
        best = rows["belady"].hit_blocks
        for name, row in rows.items():
            assert row.hit_blocks <= best, f"{name} beats the optimum at capacity {capacity}"
            assert (
                row.miss_cold + row.miss_evicted + row.miss_gap + row.miss_capacity == row.total_blocks - row.hit_blocks
            )
            assert row.miss_evicted >= 0 and row.miss_cold == acc.num_keys


def test_hits_are_a_cached_prefix_and_victims_never_the_current_request():
    acc = from_chains(_random_tree_chains(6))
    capacity = 12
    chains = acc.chains

    class Watched(LRU):
        """LRU that checks every victim against the request being replayed (begin: RequestAware)."""

        __slots__ = ("current",)

        def begin(self, request):
            self.current = set(chains[request])

        def evict(self, n):
            out = super().evict(n)
            assert not set(out) & self.current
            return out

    rep = replay(acc, Watched(), capacity)
    # The same LRU as a plain list model: hits must be the cached prefix at each request.
    order: list[int] = []
    for r, chain in enumerate(chains):
        cached = set(order)
        h = 0
        while h < len(chain) and chain[h] in cached:
            h += 1
        assert rep.hits[r] == h
        for k in chain[:capacity][::-1]:
            if k in order:
                order.remove(k)
            order.append(k)
        del order[: max(0, len(order) - capacity)]


def test_blocks_deeper_than_the_cache_are_never_kept():
    seq = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]
    acc = from_chains(seq)
    row, rep = run_one(acc, "lru", 3)
    assert rep.hits.tolist() == [0, 3]
    assert row.miss_capacity == 2 and row.miss_cold == 5 and row.miss_evicted == 0


def test_explain_names_the_request_whose_eviction_lost_a_block():
    seq = [[1, 2], [3, 4], [1, 2]]  # capacity 2: request 1 evicts 1 and 2; request 2 misses them
    acc = from_chains(seq)
    rep = replay(acc, LRU(), 2, explain=True)
    assert rep.evicted_by is not None
    assert rep.evicted_by.tolist() == [-1, -1, -1, -1, 1, 1]
    assert np.array_equal(rep.hits, [0, 0, 0])


def test_unknown_policy_and_bad_capacity_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown eviction policy 'nope'"):
        registry.get("nope")
    with pytest.raises(ValueError, match="--policies: unknown policy 'x'"):
        registry.parse_names("lru,x")
    with pytest.raises(ValueError, match="capacity: must be at least one block"):
        replay(from_chains([[1]]), LRU(), 0)
