"""Parity with vLLM 0.33's own v1 block pool: the KV events vLLM published for two workloads (data/vllm-kv-events/,
made by vLLM, not by kvscope) against the BLOCK_CACHE / BLOCK_EVICT events of kvscope's PagedAllocator driven the
same way, step by step.

`drive` is this test's model of how the data README says vLLM's block pool was driven (not kvscope's engine): one
step at a time, FCFS admission up to 16 running with head-of-line blocking, an admitted request gets its whole prompt
(after a preemption: every token it held) in that step, then every running request in admission order gets one decode
token, preempting the most recently admitted running request by recompute while no block is free for it; a request
finishes holding prompt + output - 1 tokens and is freed at the end of the step; after the last one the prefix cache
is reset.

vLLM's hashes are sha256 over its own encoding and kvscope's are not, so blocks are compared by content: a vLLM hash
stands for the token chain (its parents' tokens and its own) that BlockStored events give it, a kvscope block for the
tokens before and in it in the table of the sequence that cached it.
"""

from __future__ import annotations

import json
import os
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kvscope.alloc.paged import _ROOT_HASH, PagedAllocator, block_hash, hash_prefix
from kvscope.recorder import Recorder
from kvscope.spec import get_spec
from kvscope.trace import trace_from_recorder

BS = 16
MAX_RUNNING = 16
SPEC = get_spec("tiny")
# stream -> (usable blocks, blocks stored, evictions before the reset), from the data README
STREAMS = {"shared-prefix": (96, 232, 141), "duplicate-hash": (40, 12, 0)}

Chain = tuple[int, ...]  # a block's content: every token id from the sequence's start to the block's end
Event = tuple[str, Chain]  # ("stored" | "removed", chain)


def _data_dir() -> Path:
    """vllm-kv-events/: $KVSCOPE_DATA's if set, else the copy under tests/data (see its README)."""
    if "KVSCOPE_DATA" in os.environ:
        return Path(os.environ["KVSCOPE_DATA"]) / "vllm-kv-events"
    return Path(__file__).resolve().parent / "data" / "vllm-kv-events"


DATA = _data_dir()


# ---- the workload and vLLM's scheduler, as the data README describes them -----------------------------------------
@dataclass
class Request:
    seq: int
    arrival: int
    prompt: list[int]
    output: list[int]
    held: int = 0  # tokens it holds; kept while it waits after a preemption (it gets all of them back)

    @property
    def ids(self) -> list[int]:
        return self.prompt + self.output

    @property
    def final(self) -> int:
        return len(self.prompt) + len(self.output) - 1


def load_workload(name: str) -> list[Request]:
    rows = [json.loads(line) for line in (DATA / f"{name}.workload.jsonl").read_text().splitlines() if line]
    return [
        Request(i, r["arrival_step"], list(r["prompt_token_ids"]), list(r["output_token_ids"]))
        for i, r in enumerate(rows)
    ]


def drive(reqs: list[Request], num_blocks: int, **opts) -> tuple[PagedAllocator, Recorder, int]:
    """Run the workload through a PagedAllocator one step at a time; return it, its recorder (events stamped with
    their step) and the step of the prefix-cache reset."""
    rec = Recorder()
    alloc = PagedAllocator(
        SPEC, num_blocks * BS * SPEC.bytes_per_token, rec, block_size=BS, enable_prefix_caching=True, **opts
    )
    arrivals = deque(sorted(reqs, key=lambda r: r.arrival))  # stable: same-step arrivals keep their order
    waiting: deque[Request] = deque()
    running: list[Request] = []  # admission order
    finished = 0
    step = 0
    while finished < len(reqs):
        rec.step = step
        while arrivals and arrivals[0].arrival <= step:
            waiting.append(arrivals.popleft())
        admit(alloc, waiting, running)
        decode(alloc, waiting, running)
        for r in [r for r in running if r.held == r.final]:
            alloc.free(r.seq)
            running.remove(r)
            finished += 1
        alloc.check_invariants()
        step += 1
    rec.step = step
    assert alloc.reset_prefix_cache(), "every request has finished: nothing may be active"
    return alloc, rec, step


def admit(alloc: PagedAllocator, waiting: deque[Request], running: list[Request]) -> None:
    """FCFS up to MAX_RUNNING, stopping at the first request that does not fit (its cache hit counted, as vLLM)."""
    while waiting and len(running) < MAX_RUNNING:
        r = waiting[0]
        n = r.held or len(r.prompt)
        tokens = np.array(r.ids[:n], dtype=np.int64)
        if not alloc.can_admit(n, r.final, prompt_tokens=tokens):
            assert running, f"request {r.seq} can never fit"
            return
        waiting.popleft()
        hit = alloc.admit(r.seq, tokens, r.final)
        alloc.append(r.seq, tokens[hit:])
        r.held = n
        running.append(r)


def decode(alloc: PagedAllocator, waiting: deque[Request], running: list[Request]) -> None:
    """One token for each running request in admission order; no block for it: preempt the most recently admitted
    running request by recompute (to the front of the waiting queue) and retry."""
    i = 0
    while i < len(running):
        r = running[i]
        if r.held < r.final:
            while r in running and not alloc.can_append(r.seq, 1):
                victim = running.pop()
                alloc.free(victim.seq)
                waiting.appendleft(victim)
            if r not in running:  # it preempted itself: it was the most recently admitted
                return
            alloc.append(r.seq, np.array([r.ids[r.held]], dtype=np.int64))
            r.held += 1
        i += 1


# ---- both sides' events as (kind, token chain) per step ----------------------------------------------------------
def vllm_events(name: str) -> tuple[dict[int, list[Event]], int]:
    """Step -> the stored / removed block chains in event order, and the step of AllBlocksCleared."""
    chains: dict[int | None, Chain] = {None: ()}
    steps: dict[int, list[Event]] = {}
    cleared = -1
    for line in (DATA / f"{name}.jsonl").read_text().splitlines():
        ts, events = json.loads(line)[:2]  # KVEventBatch: [ts, events, data_parallel_rank]
        out = steps.setdefault(int(ts), [])
        for e in events:
            if e["type"] == "BlockStored":
                assert e["block_size"] == BS
                chain = chains[e["parent_block_hash"]]
                for i, h in enumerate(e["block_hashes"]):
                    chain = chain + tuple(e["token_ids"][i * BS : (i + 1) * BS])
                    assert chains.setdefault(h, chain) == chain, "one vLLM hash, two contents"
                    out.append(("stored", chain))
            elif e["type"] == "BlockRemoved":
                out += [("removed", chains[h]) for h in e["block_hashes"]]
            elif e["type"] == "AllBlocksCleared":
                assert cleared == -1, "cleared twice"
                cleared = int(ts)
    return steps, cleared


def kvscope_events(rec: Recorder, reqs: list[Request]) -> dict[int, list[Event]]:
    """The same from kvscope's trace: block tables replayed from BLOCK_ALLOC / SHARE / FREE (addr = table index),
    so a BLOCK_CACHE block's chain is its sequence's tokens up to the block's end, and a BLOCK_EVICT one's is what it
    was cached with. Checks each BLOCK_CACHE / BLOCK_EVICT aux against the chain's hash."""
    ev = trace_from_recorder(rec).events
    ids = {r.seq: r.ids for r in reqs}
    where: dict[tuple[int, int], int] = {}  # (seq, block) -> index in the seq's table
    content: dict[int, Chain] = {}  # cached block -> chain
    steps: dict[int, list[Event]] = {}
    for kind, step, seq, block, addr, aux in ev[["kind", "step", "seq", "block", "addr", "aux"]].itertuples(
        index=False
    ):
        if kind in ("block_alloc", "block_share"):
            where[seq, block] = addr
        elif kind == "block_free":
            del where[seq, block]
        elif kind == "block_cache":
            chain = tuple(ids[seq][: (where[seq, block] + 1) * BS])
            assert aux == hash_prefix(chain_hash(chain)), f"block {block}: BLOCK_CACHE aux is not its chain's hash"
            content[block] = chain
            steps.setdefault(step, []).append(("stored", chain))
        elif kind == "block_evict":
            chain = content.pop(block)
            assert aux == hash_prefix(chain_hash(chain)), f"block {block}: BLOCK_EVICT aux is not its chain's hash"
            steps.setdefault(step, []).append(("removed", chain))
    return steps


def chain_hash(chain: Chain) -> bytes:
    h = _ROOT_HASH
    for i in range(0, len(chain), BS):
        h = block_hash(h, list(chain[i : i + BS]))
    return h


def live_chains(steps: dict[int, list[Event]], before: int) -> Counter:
    """Blocks (by chain, with multiplicity: two blocks may carry one hash) cached before step `before`."""
    live: Counter = Counter()
    for step in sorted(s for s in steps if s < before):
        for kind, chain in steps[step]:
            live[chain] += 1 if kind == "stored" else -1
            assert live[chain] >= 0, f"step {step}: removed a block that was not cached"
    return +live


# ---- the tests -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_same_blocks_stored_and_removed_in_the_same_order_per_step(name: str) -> None:
    num_blocks, n_stored, n_evicted = STREAMS[name]
    want, cleared = vllm_events(name)
    reqs = load_workload(name)
    alloc, rec, reset_step = drive(reqs, num_blocks)
    got = kvscope_events(rec, reqs)

    def count(steps: dict[int, list[Event]], kind: str) -> int:
        return sum(k == kind for s, evs in steps.items() if s < cleared for k, _ in evs)

    # The data is what its README says, and kvscope stores and evicts as many blocks.
    assert (count(want, "stored"), count(want, "removed")) == (n_stored, n_evicted)
    assert (count(got, "stored"), count(got, "removed")) == (n_stored, n_evicted)
    # Step by step, the same blocks in the same order (an append's evictions before its stores, as in vLLM).
    assert reset_step == cleared
    for step in sorted(set(want) | set(got)):
        if step != cleared:
            assert got.get(step, []) == want.get(step, []), f"{name}: step {step} differs"
    # AllBlocksCleared: kvscope evicts exactly the blocks vLLM had cached then, each copy of a duplicated hash too.
    cleared_now = Counter(chain for kind, chain in got[cleared] if kind == "removed")
    assert all(kind == "removed" for kind, _ in got[cleared])
    assert cleared_now == live_chains(want, cleared) and sum(cleared_now.values()) > 0
    u = alloc.usage()
    assert (u.reserved, u.cached_idle, u.free) == (0, 0, u.capacity)


def shares_of(rec: Recorder, seq: int) -> dict[int, tuple[int, int]]:
    """Table index -> (block, ref after) of the seq's BLOCK_SHARE events (its prefix hits)."""
    ev = trace_from_recorder(rec).events
    ev = ev[(ev["kind"] == "block_share") & (ev["seq"] == seq)]
    return {a: (b, r) for a, b, r in ev[["addr", "block", "aux"]].itertuples(index=False)}


def cached_at(rec: Recorder, seq: int) -> dict[int, int]:
    """Table index -> block of the blocks this seq cached (BLOCK_CACHE), through its BLOCK_ALLOC events."""
    ev = trace_from_recorder(rec).events
    mine = ev[ev["seq"] == seq]
    index = dict(mine[mine["kind"] == "block_alloc"][["block", "addr"]].itertuples(index=False))
    return {index[b]: b for b in mine[mine["kind"] == "block_cache"]["block"]}


def test_duplicate_hash_lookup_revives_the_first_registered_block() -> None:
    """r0 and r1 run the same 128-token prompt at once: r1 hits r0's first 7 blocks and registers its own copy of the
    8th under the same hash. r0 finishes at step 0, so its copy goes idle while r1's is active; r2 (the prompt + 20
    tokens) looks the hash up at step 5 and, as in vLLM, gets r0's block, the first registered, revived from idle."""
    reqs = load_workload("duplicate-hash")
    _, rec, _ = drive(reqs, STREAMS["duplicate-hash"][0])
    r0, r1 = cached_at(rec, 0), cached_at(rec, 1)
    assert sorted(r0) == list(range(8)), "r0 computes and caches the whole prompt"
    assert sorted(r1) == [7, 8, 9], "r1 hits 7 blocks, caches its copy of the 8th, then two output blocks"
    aux = dict(trace_from_recorder(rec).events.query("kind == 'block_cache'")[["block", "aux"]].itertuples(index=False))
    assert aux[r0[7]] == aux[r1[7]] and r0[7] != r1[7], "two blocks carry one hash"
    hits = shares_of(rec, 2)
    assert sorted(hits) == list(range(8))
    assert hits[7] == (r0[7], 1), "the first-registered block, revived (ref 0 -> 1), not r1's active copy"
    assert [hits[i][0] for i in range(7)] == [r0[i] for i in range(7)]
    # The rule before (an active holder first) shares r1's copy instead: this is what the test tells apart.
    _, old, _ = drive(load_workload("duplicate-hash"), STREAMS["duplicate-hash"][0], hit_prefers_active=True)
    assert shares_of(old, 2)[7] == (cached_at(old, 1)[7], 2)


def test_driver_preempts_and_readmits_on_a_smaller_pool() -> None:
    """Neither stream runs out of blocks (no preemption, no admission held back by memory), so this checks those
    paths of the driver on shared-prefix with 40 blocks instead of 96: requests are preempted by recompute and
    re-admitted with every token they held, the books hold after every step, every request finishes and the events
    replay to consistent block contents (each eviction removes a block cached before, with its own chain's hash)."""
    reqs = load_workload("shared-prefix")
    alloc, rec, _ = drive(reqs, 40)
    ev = trace_from_recorder(rec).events
    starts = ev[ev["kind"].isin(["block_alloc", "block_share"]) & (ev["addr"] == 0)]
    assert len(starts) > len(reqs), "some request was admitted more than once"
    steps = kvscope_events(rec, reqs)
    assert sum(kind == "removed" for evs in steps.values() for kind, _ in evs) > STREAMS["shared-prefix"][2]
    assert all(alloc.block_state(b) == "free" for b in range(alloc.num_blocks))
