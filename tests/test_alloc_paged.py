"""Unit tests for the paged (vLLM) allocator: block tables, events, copy-on-write, prefix caching, eviction order,
swapping, OOM atomicity, and accounting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kvscope.alloc.base import Copy, KVAllocator, KVOutOfMemory
from kvscope.alloc.paged import PagedAllocator, SwapRefused, block_hash, hash_prefix
from kvscope.recorder import Recorder
from kvscope.spec import get_spec
from kvscope.trace import trace_from_recorder

SPEC = get_spec("tiny")
BPT = SPEC.bytes_per_token  # 512 bytes
BS = 4
BB = BS * BPT


def make(num_blocks: int = 8, **kw) -> tuple[PagedAllocator, Recorder]:
    rec = Recorder(None)
    return PagedAllocator(SPEC, num_blocks * BB, rec, block_size=BS, **kw), rec


def toks(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.int64)


def events(rec: Recorder, *kinds: str) -> pd.DataFrame:
    df = trace_from_recorder(rec).events
    if kinds:
        df = df[df["kind"].isin(kinds)]
    return df.reset_index(drop=True)


def rows(df: pd.DataFrame, cols: str) -> list[tuple]:
    return [tuple(r) for r in df[cols.split()].itertuples(index=False)]


def start(a: PagedAllocator, seq: int, prompt: np.ndarray) -> int:
    """What the engine does at prefill: admit, then compute the tokens the cache did not serve."""
    hit = a.admit(seq, prompt, len(prompt) + 8)
    a.append(seq, prompt[hit:])
    return hit


def test_config_and_protocol():
    a, _ = make(8, cpu_swap_bytes=3 * BB + 5)
    assert isinstance(a, KVAllocator)
    assert a.config() == {
        "addressing": "blocks",
        "label": "paged b4",
        "block_size": 4,
        "num_blocks": 8,
        "prefix_caching": False,
        "cpu_blocks": 3,
        "block_bytes": BB,
    }
    odd = PagedAllocator(SPEC, 8 * BB + BB - 1, block_size=BS)  # leftover bytes below one block are not counted
    assert odd.num_blocks == 8 and odd.usage().capacity == 8 * BB
    with pytest.raises(ValueError, match="less than one block"):
        PagedAllocator(SPEC, BB - 1, block_size=BS)
    with pytest.raises(ValueError, match="block_size"):
        PagedAllocator(SPEC, BB, block_size=0)


def test_alloc_append_free_accounting_and_events():
    a, rec = make(8)
    assert a.admit(0, toks(1, 2, 3, 4, 5, 6), 10) == 0
    assert a.num_tokens(0) == 0 and a.block_table(0) == []
    a.append(0, toks(1, 2, 3, 4, 5, 6))
    assert a.block_table(0) == [0, 1] and a.num_tokens(0) == 6
    u = a.usage()
    assert (u.capacity, u.reserved, u.used, u.logical, u.internal) == (8 * BB, 2 * BB, 6 * BPT, 6 * BPT, 2 * BPT)
    assert (u.free, u.cached_idle, u.reservation, u.mapped_idle) == (6 * BB, 0, 0, 0)
    a.append(0, toks(7))  # fits in the last block: no new block
    a.append(0, toks(8, 9))  # fills block 1, opens block 2
    assert a.block_table(0) == [0, 1, 2]
    a.check_invariants()
    a.free(0)
    a.check_invariants()
    u = a.usage()
    assert (u.reserved, u.used, u.logical, u.free) == (0, 0, 0, 8 * BB)
    ev = events(rec)
    assert list(ev["kind"]) == [
        "block_alloc", "block_alloc", "append", "append", "block_alloc", "append",
        "block_free", "block_free", "block_free",
    ]  # fmt: skip
    assert rows(events(rec, "block_alloc"), "block seq addr bytes") == [(0, 0, 0, BB), (1, 0, 1, BB), (2, 0, 2, BB)]
    assert rows(events(rec, "append"), "seq n aux") == [(0, 6, 6), (0, 1, 7), (0, 2, 9)]
    # free lets go of the tail first
    assert rows(events(rec, "block_free"), "block seq aux") == [(2, 0, 0), (1, 0, 0), (0, 0, 0)]
    with pytest.raises(ValueError, match="unknown seq 0"):
        a.num_tokens(0)


def test_fork_shares_and_copy_on_write_queues_copy():
    a, rec = make(8)
    start(a, 0, toks(1, 2, 3, 4, 5, 6))
    a.fork(0, 1)
    assert a.block_table(1) == a.block_table(0) == [0, 1]
    assert a.ref_counts()[:2] == [2, 2]
    assert rows(events(rec, "block_share"), "block seq addr aux") == [(0, 1, 0, 2), (1, 1, 1, 2)]
    assert events(rec, "fork").empty  # the engine owns FORK
    u = a.usage()
    assert u.used == 6 * BPT and u.logical == 12 * BPT, "a shared block counts once in used, per holder in logical"
    n_before = len(events(rec))

    a.append(1, toks(9))  # the child writes into the shared partial block 1 -> copy it first
    assert a.block_table(1) == [0, 2] and a.block_table(0) == [0, 1]
    assert a.pending_copies == [Copy("block", 1, 2)]
    new = events(rec).iloc[n_before:]
    assert list(new["kind"]) == ["block_cow", "block_free", "append"]
    assert rows(new[new["kind"] == "block_cow"], "block aux seq addr bytes") == [(2, 1, 1, 1, BB)]
    assert rows(new[new["kind"] == "block_free"], "block seq aux") == [(1, 1, 1)]
    assert a.ref_counts()[:3] == [2, 1, 1]

    a.append(0, toks(7))  # the parent is now the only holder of block 1: writes in place
    assert a.block_table(0) == [0, 1] and len(a.pending_copies) == 1
    assert a.usage().used == (7 + 7 - 4) * BPT  # block 0 (4 tokens) counted once
    a.check_invariants()
    a.free(0)
    a.free(1)
    a.check_invariants()
    assert a.usage().reserved == 0


def test_fork_at_block_boundary_needs_no_copy():
    a, rec = make(8)
    start(a, 0, toks(1, 2, 3, 4))
    a.fork(0, 1)
    a.append(1, toks(5))
    a.append(0, toks(6))
    assert a.pending_copies == []
    assert a.block_table(0) == [0, 2] and a.block_table(1) == [0, 1]
    assert events(rec, "block_cow").empty


def test_readmission_after_recompute_shares_output_blocks_but_prefix_hit_counts_prompt_tokens_only():
    a, rec = make(16, enable_prefix_caching=True)
    prompt = toks(0, 1, 2, 3, 4, 5)  # P = 6
    assert start(a, 0, prompt) == 0
    a.append(0, toks(6, 7, 8))  # generated output fills block [4-7] and starts a third
    a.free(0)  # recompute preemption: the full blocks stay cached-idle
    # Re-admitted with prompt + generated (what the engine does): both full blocks are shared again ...
    assert a.admit(0, toks(*range(9)), 13) == 8
    assert a.num_tokens(0) == 8
    # ... but only the 6 prompt tokens are prefix hits; tokens 6 and 7 were output, recomputed from the cache.
    assert rows(events(rec, "prefix_hit"), "seq n") == [(0, 6)]
    a.check_invariants()


def test_prefix_hit_counts_and_p_minus_one_cap():
    a, rec = make(16, enable_prefix_caching=True)
    prompt = toks(*range(10))  # blocks [0-3] [4-7] full, [8 9] partial
    assert start(a, 0, prompt) == 0
    assert len(events(rec, "block_cache")) == 2
    assert start(a, 1, prompt) == 8
    assert a.block_table(1)[:2] == a.block_table(0)[:2] and a.block_table(1)[2] != a.block_table(0)[2]
    assert rows(events(rec, "prefix_hit"), "seq n") == [(1, 8)]
    # A prompt of exactly two full blocks: only the first may hit, the last token must be computed.
    assert start(a, 2, prompt[:8]) == 4
    # A prompt that agrees on the first block only.
    assert start(a, 3, toks(0, 1, 2, 3, 9, 9, 9, 9, 9)) == 4
    # Chaining: the same second block after a different first block is a different hash.
    assert start(a, 4, toks(9, 9, 9, 9, 4, 5, 6, 7, 8)) == 0
    shares = events(rec, "block_share")
    assert rows(shares[shares["seq"] == 1], "block addr aux") == [(0, 0, 2), (1, 1, 2)]
    # One token short of a full block never hits.
    assert start(a, 5, toks(0, 1, 2, 3)) == 0
    a.check_invariants()
    cache = events(rec, "block_cache")
    h0 = block_hash(b"", [0, 1, 2, 3])
    assert hash_prefix(h0) == int(cache["aux"].iloc[0]) and int(cache["block"].iloc[0]) == 0
    assert hash_prefix(block_hash(h0, [4, 5, 6, 7])) == int(cache["aux"].iloc[1])


def test_no_prefix_caching_means_no_hits_and_no_hashing():
    a, rec = make(8)
    start(a, 0, toks(*range(10)))
    assert start(a, 1, toks(*range(10))) == 0
    assert events(rec, "block_cache").empty and events(rec, "prefix_hit").empty
    a.free(0)
    assert a.usage().cached_idle == 0


def test_cached_idle_blocks_are_reused_and_accounted_apart():
    a, rec = make(8, enable_prefix_caching=True)
    prompt = toks(*range(10))
    start(a, 0, prompt)
    a.free(0)
    u = a.usage()
    assert (u.reserved, u.cached_idle, u.free) == (0, 2 * BB, 6 * BB), "hashed blocks idle, partial block free"
    assert [a.block_state(b) for b in range(3)] == ["cached_idle", "cached_idle", "free"]
    assert start(a, 1, prompt) == 8
    assert a.block_table(1)[:2] == [0, 1] and a.usage().cached_idle == 0
    assert rows(events(rec, "block_share"), "block aux") == [(0, 1), (1, 1)]
    a.check_invariants()


def test_eviction_is_lru_and_chain_tail_first():
    a, rec = make(6, enable_prefix_caching=True)
    start(a, 0, toks(1, 1, 1, 1, 2, 2, 2, 2))  # blocks 0, 1
    start(a, 1, toks(3, 3, 3, 3, 4, 4, 4, 4))  # blocks 2, 3
    a.free(0)  # idle order: 1, 0 (tail first)
    a.free(1)  # idle order: 1, 0, 3, 2
    # Touch seq 0's head block (a hit on its first block), then let go: it becomes most recently used.
    assert start(a, 2, toks(1, 1, 1, 1, 7)) == 4
    a.free(2)  # block 0 idle again, at the end; block 4 (partial, unhashed) is free
    assert a.usage().cached_idle == 4 * BB
    start(a, 3, toks(*range(100, 124)))  # 6 blocks: the 2 free ones, then evictions
    ev = events(rec)
    assert rows(ev[ev["kind"] == "block_evict"], "block") == [(1,), (3,), (2,), (0,)]
    evict_aux = dict(rows(ev[ev["kind"] == "block_evict"], "block aux"))
    cache_aux = dict(rows(ev[ev["kind"] == "block_cache"].drop_duplicates("block"), "block aux"))
    assert all(evict_aux[b] == cache_aux[b] for b in evict_aux), "BLOCK_EVICT carries the block's hash prefix"
    # every eviction is followed by the allocation of that block
    kinds = list(ev["kind"])
    for i in np.flatnonzero(ev["kind"] == "block_evict"):
        assert kinds[i + 1] == "block_alloc" and ev["block"].iloc[i + 1] == ev["block"].iloc[i]
    a.free(3)
    assert start(a, 4, toks(1, 1, 1, 1, 2, 2, 2, 2, 5)) == 0, "evicted blocks are no longer hits"
    a.check_invariants()


def test_free_blocks_are_taken_before_cached_idle_ones():
    a, rec = make(4, enable_prefix_caching=True)
    start(a, 0, toks(1, 1, 1, 1, 2))  # block 0 hashed, block 1 partial
    a.free(0)  # block 0 idle; blocks 2, 3, 1 free
    start(a, 1, toks(*range(50, 62)))  # 3 blocks: exactly the free ones
    assert events(rec, "block_evict").empty
    assert sorted(a.block_table(1)) == [1, 2, 3]
    a.append(1, toks(1))  # the 4th block must evict
    assert rows(events(rec, "block_evict"), "block") == [(0,)]


def test_lookup_returns_the_first_registered_block_and_revives_it():
    """vLLM's get_cached_block: of two blocks with one hash, the first registered, even idle beside an active copy."""
    prompt = toks(1, 1, 1, 1, 2)
    for prefers_active in (False, True):
        a, rec = make(8, enable_prefix_caching=True, hit_prefers_active=prefers_active)
        start(a, 0, prompt)  # block 0 cached; block 1 partial
        a.admit(1, toks(1, 1, 1, 1), 9)  # a prompt of one full block never hits it: seq 1 computes its own copy
        a.append(1, toks(1, 1, 1, 1))
        first, copy = a.block_table(0)[0], a.block_table(1)[0]
        assert first != copy and len(events(rec, "block_cache")["aux"].unique()) == 1, "two blocks, one hash"
        a.free(0)  # the first-registered copy goes idle, seq 1's stays active
        assert start(a, 2, prompt) == 4
        expected = (copy, 2) if prefers_active else (first, 1)  # ref after: revived from idle, or shared
        assert rows(events(rec, "block_share"), "block aux")[-1] == expected
        assert a.usage().cached_idle == (BB if prefers_active else 0)
        assert ("hit_prefers_active" in a.config()) == prefers_active
        a.check_invariants()


def test_evicting_one_of_two_blocks_with_a_hash_keeps_the_other_findable():
    a, rec = make(5, enable_prefix_caching=True)
    start(a, 0, toks(1, 1, 1, 1, 2))
    a.admit(1, toks(1, 1, 1, 1), 9)
    a.append(1, toks(1, 1, 1, 1))
    first, copy = a.block_table(0)[0], a.block_table(1)[0]
    a.free(0)
    a.free(1)  # cached-idle, least recently used first: first, copy; 3 blocks free
    start(a, 2, toks(*range(20, 32)))  # the 3 free blocks
    a.append(2, toks(32))  # a 4th block: evicts the least recently used, the first-registered copy
    assert rows(events(rec, "block_evict"), "block") == [(first,)]
    a.free(2)
    assert start(a, 3, toks(1, 1, 1, 1, 3)) == 4 and a.block_table(3)[0] == copy, "the other copy is still a hit"
    a.check_invariants()


def test_can_admit_with_tokens_counts_the_hit_as_vllm():
    """Hit blocks that are active cost nothing; cached-idle ones still take a block out of the free queue."""
    a, _ = make(4, enable_prefix_caching=True)
    prompt = toks(*range(9))  # blocks [0-3] [4-7] full, [8] partial
    start(a, 0, prompt)  # 3 blocks, 1 free
    assert not a.can_admit(9, 12) and a.can_admit(9, 12, prompt_tokens=prompt), "2 active hit blocks + 1 new"
    assert not a.can_admit(9, 12, prompt_tokens=toks(*range(100, 109)))
    a.free(0)  # 2 cached-idle + 2 free: 4 blocks an allocation can take
    start(a, 1, toks(50, 51, 52, 53, 54))  # takes the 2 free ones
    assert not a.can_admit(9, 12, prompt_tokens=prompt), "2 idle hit blocks + 1 new block > the 2 idle ones"
    assert a.can_admit(5, 8, prompt_tokens=toks(0, 1, 2, 3, 9)), "1 idle hit block + 1 new block"
    a.check_invariants()


def test_freed_never_hashed_blocks_are_reused_last_in_first_out_with_prefix_caching():
    """vLLM 0.33 puts them at the free queue's front; without prefix caching they go to the tail (FIFO)."""
    for caching, expected in ((True, [3, 0]), (False, [4, 5])):
        a, _ = make(6, enable_prefix_caching=caching)
        start(a, 0, toks(1, 2))  # block 0
        start(a, 1, toks(3, 4, 5, 6, 7))  # blocks 1 (full: hashed with caching), 2
        start(a, 2, toks(8))  # block 3
        a.free(0)
        a.free(2)  # with caching the free queue is now 3, 0, 4, 5
        start(a, 3, toks(9, 9, 9, 9, 9))
        assert a.block_table(3) == expected
        a.check_invariants()


def test_an_append_takes_all_its_blocks_before_caching_any():
    """vLLM's allocate_slots takes every new block (evicting as needed) before cache_full_blocks registers any."""
    a, rec = make(8, enable_prefix_caching=True)
    start(a, 0, toks(*range(10)))
    assert list(events(rec)["kind"]) == ["block_alloc"] * 3 + ["block_cache"] * 2 + ["append"]
    assert rows(events(rec, "block_alloc"), "block addr") == [(0, 0), (1, 1), (2, 2)]


def test_reset_prefix_cache_evicts_every_cached_idle_block():
    a, rec = make(6, enable_prefix_caching=True)
    start(a, 0, toks(1, 1, 1, 1, 2, 2, 2, 2, 3))  # blocks 0, 1 cached, 2 partial
    start(a, 1, toks(4, 4, 4, 4, 5))  # block 3 cached, 4 partial
    assert not a.reset_prefix_cache() and events(rec, "block_evict").empty, "refused while blocks are active"
    a.free(0)
    a.free(1)  # idle, least recently used first: 1, 0, 3
    assert a.reset_prefix_cache()
    assert rows(events(rec, "block_evict"), "block") == [(1,), (0,), (3,)]
    u = a.usage()
    assert (u.cached_idle, u.free) == (0, 6 * BB) and a.num_free_blocks == 6
    assert start(a, 2, toks(1, 1, 1, 1, 2, 2, 2, 2, 3)) == 0, "no prefix is findable after a reset"
    a.check_invariants()
    assert a.reset_prefix_cache() is False


def test_oom_is_atomic_and_emits_oom():
    a, rec = make(3)
    start(a, 0, toks(1, 2, 3, 4, 5, 6))
    a.fork(0, 1)
    a.admit(2, toks(0), 5)
    a.append(2, toks(1, 2))  # 3 blocks taken, none free
    before = (a.usage(), a.block_table(0), a.block_table(1), a.num_tokens(1), a.ref_counts(), len(events(rec)))
    assert not a.can_append(1, 1), "copy-on-write needs a block"
    with pytest.raises(KVOutOfMemory, match="seq 1 needs 1 blocks"):
        a.append(1, toks(9))
    assert a.can_append(2, 2) and not a.can_append(2, 3)
    with pytest.raises(KVOutOfMemory):
        a.append(2, toks(1, 2, 3))
    after = (a.usage(), a.block_table(0), a.block_table(1), a.num_tokens(1), a.ref_counts())
    assert after == before[:5] and a.pending_copies == []
    assert rows(events(rec).iloc[before[5] :], "kind seq n bytes") == [("oom", 1, 1, BB), ("oom", 2, 3, BB)]
    a.check_invariants()
    assert not a.can_admit(1, 10) and a.can_admit(0, 10)


def test_swap_round_trip():
    a, rec = make(5, cpu_swap_bytes=4 * BB)
    start(a, 0, toks(1, 2, 3, 4, 5, 6))
    gpu = a.block_table(0)
    assert a.can_swap_out(0)
    a.swap_out(0)
    assert a.is_swapped(0) and a.num_tokens(0) == 6
    assert a.pending_copies == [Copy("swap_out", gpu[0], 0), Copy("swap_out", gpu[1], 1)]
    u = a.usage()
    assert (u.reserved, u.logical, u.free) == (0, 0, 5 * BB)
    assert rows(events(rec, "swap_out"), "seq n bytes") == [(0, 2, 2 * BB)]
    with pytest.raises(ValueError, match="swapped out"):
        a.append(0, toks(7))
    a.check_invariants()
    a.pending_copies.clear()

    start(a, 1, toks(9, 9, 9, 9, 9))  # takes the GPU blocks seq 0 left
    assert a.can_swap_in(0)
    a.swap_in(0)
    table = a.block_table(0)
    assert not a.is_swapped(0) and len(table) == 2 and not set(table) & set(a.block_table(1))
    assert a.pending_copies == [Copy("swap_in", 0, table[0]), Copy("swap_in", 1, table[1])]
    assert rows(events(rec, "swap_in"), "seq n bytes") == [(0, 2, 2 * BB)]
    u = a.usage()
    assert (u.used, u.logical) == (11 * BPT, 11 * BPT)
    a.append(0, toks(7, 8, 9))  # continues in the swapped-in partial block, then a new one
    assert a.num_tokens(0) == 9 and len(a.block_table(0)) == 3
    a.check_invariants()


def test_swap_refusals_leave_state_unchanged():
    a, rec = make(8, cpu_swap_bytes=1 * BB)
    start(a, 0, toks(1, 2, 3, 4, 5))
    a.fork(0, 1)
    assert not a.can_swap_out(0)
    with pytest.raises(SwapRefused, match="shares blocks"):
        a.swap_out(0)
    start(a, 2, toks(1, 2, 3, 4, 5))
    with pytest.raises(KVOutOfMemory, match="needs 2 CPU blocks, 1 free"):  # SwapRefused is a KVOutOfMemory
        a.swap_out(2)
    assert not a.is_swapped(0) and not a.is_swapped(2) and a.pending_copies == []
    assert events(rec, "swap_out").empty
    a.check_invariants()


def test_swap_in_oom_and_free_while_swapped():
    a, rec = make(2, cpu_swap_bytes=2 * BB)
    start(a, 0, toks(1, 2, 3, 4, 5))
    a.swap_out(0)
    start(a, 1, toks(1, 2, 3, 4, 5))
    assert not a.can_swap_in(0)
    with pytest.raises(KVOutOfMemory):
        a.swap_in(0)
    assert a.is_swapped(0) and rows(events(rec, "oom"), "seq n bytes") == [(0, 5, 2 * BB)]
    a.free(0)  # an aborted swapped sequence gives its CPU blocks back
    a.check_invariants()
    a.free(1)
    start(a, 2, toks(1, 2, 3, 4, 5, 6, 7, 8))
    a.swap_out(2)  # the whole CPU pool is available again
    a.check_invariants()


def test_swap_with_prefix_caching_keeps_hashes_findable():
    a, rec = make(4, enable_prefix_caching=True, cpu_swap_bytes=4 * BB)
    prompt = toks(1, 2, 3, 4, 5, 6)
    start(a, 0, prompt)
    a.swap_out(0)
    assert a.usage().cached_idle == BB, "the swapped-out full block stays cached on the GPU until evicted"
    start(a, 1, toks(*range(20, 36)))  # 4 blocks: evicts the idle one
    assert rows(events(rec, "block_evict"), "block") == [(0,)]
    a.free(1)
    a.swap_in(0)
    cache = events(rec, "block_cache")
    cache = cache[cache["seq"] == 0]
    assert len(cache) == 2 and cache["aux"].nunique() == 1, "swap_in re-registers the full block's hash"
    a.check_invariants()
    assert start(a, 2, prompt) == 4


def test_events_replay_to_ref_counts():
    a, rec = make(6, enable_prefix_caching=True, cpu_swap_bytes=4 * BB)
    start(a, 0, toks(1, 1, 1, 1, 2, 2))
    a.fork(0, 1)
    a.append(1, toks(3))
    start(a, 2, toks(1, 1, 1, 1, 2, 2, 2, 2, 5))
    a.free(0)
    assert not a.can_swap_out(2)  # it shares block 0 with seq 1
    a.free(2)
    start(a, 3, toks(*range(40, 52)))
    a.swap_out(3)
    start(a, 4, toks(*range(60, 76)))  # evicts cached-idle blocks
    a.free(4)
    a.swap_in(3)
    a.check_invariants()
    assert not events(rec, "block_evict").empty and not events(rec, "block_cow").empty
    ref = [0] * a.num_blocks
    for kind, block, aux in rows(events(rec), "kind block aux"):
        if kind in ("block_alloc", "block_cow"):
            assert ref[block] == 0
            ref[block] = 1
        elif kind in ("block_share", "block_free"):
            assert aux == ref[block] + (1 if kind == "block_share" else -1)
            ref[block] = aux
        elif kind == "block_evict":
            assert ref[block] == 0
    assert ref == a.ref_counts()


def test_user_errors_are_one_line_value_errors():
    a, _ = make(4)
    a.admit(0, toks(1), 3)
    with pytest.raises(ValueError, match="already admitted"):
        a.admit(0, toks(1), 3)
    with pytest.raises(ValueError, match="already exists"):
        a.fork(0, 0)
    with pytest.raises(ValueError, match="not swapped out"):
        a.swap_in(0)
    with pytest.raises(ValueError, match="unknown seq 7"):
        a.append(7, toks(1))
