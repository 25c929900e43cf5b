"""The lab on real data (Mooncake's traces), its agreement with the paged allocator, the learning-augmented
policies' consistency and robustness, and the `kvscope lab` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kvscope.alloc.paged import PagedAllocator, hash_prefix
from kvscope.cli import main
from kvscope.lab import oracle
from kvscope.lab.accesses import from_requests, load_accesses
from kvscope.lab.replay import replay
from kvscope.lab.sweep import COLUMNS, run_lab, run_one
from kvscope.policies.discard import Mark0
from kvscope.policies.phase import MarkAndPredict
from kvscope.recorder import Recorder
from kvscope.spec import get_spec
from kvscope.trace import trace_from_recorder
from kvscope.workload import Request

DATA = Path(__file__).parent / "data" / "mooncake"
CONVERSATION = DATA / "conversation_head2000.jsonl"


@pytest.fixture(scope="module")
def conversation():
    return load_accesses(str(CONVERSATION))


def test_a_mooncake_trace_is_replayed_as_given(conversation):
    acc = conversation
    assert acc.kind == "mooncake" and acc.block_size == 512
    assert acc.num_requests == 2000
    raw = [json.loads(line) for line in CONVERSATION.read_text().splitlines()]
    assert acc.num_blocks == sum(len(r["hash_ids"]) for r in raw)
    assert acc.num_keys == len({h for r in raw for h in r["hash_ids"]})
    assert int(acc.prompt_tokens.sum()) == int(acc.fill.sum()) == sum(r["input_length"] for r in raw)
    # An unbounded cache hits every block but each content's first use.
    row, _ = run_one(acc, "lru", acc.num_keys)
    assert row.hit_blocks == acc.num_blocks - acc.num_keys


def test_lru_is_monotone_in_capacity_and_below_the_optimum(conversation):
    frame = run_lab(conversation, ["lru", "belady"], [100, 400, 1600, 6400])
    lru = frame[frame.policy == "lru"]["hit_rate"].to_numpy()
    opt = frame[frame.policy == "belady"]["hit_rate"].to_numpy()
    assert np.all(np.diff(lru) >= 0) and np.all(np.diff(opt) >= 0)  # LRU is a stack algorithm: no Belady anomaly
    assert np.all(opt >= lru) and opt[1] > lru[1] * 1.5  # the optimum is far ahead at small capacities
    assert list(frame.columns) == list(COLUMNS)


def _mooncake_like_requests() -> list[Request]:
    """Prompts sharing system prompts and earlier turns, at 16-token blocks, one request at a time."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(40):
        head = int(rng.integers(0, 3))
        ids = [100 + head] + [int(x) for x in rng.integers(0, 6, size=int(rng.integers(1, 4)))]
        ids = [ids[0]] + [1000 * (j + 1) + ids[0] * 10 + v for j, v in enumerate(ids[1:])]  # ids name prefixes
        prompt_len = 16 * len(ids) - int(rng.integers(1, 8))  # the last block partly filled
        from kvscope.workload import PromptBlocks

        out.append(Request(f"r{i}", float(i), prompt_len, 1, prompt_blocks=PromptBlocks(16, tuple(ids))))
    return out


def test_lab_lru_evicts_in_the_paged_allocators_order():
    """Requests one at a time (admit, prefill, free) through the paged allocator with prefix caching, and the same
    prompts through the lab's LRU: the same hits and the same blocks evicted, in the same order."""
    requests = _mooncake_like_requests()
    capacity = 9  # lab blocks; the allocator has one more for each prompt's partly filled last block
    spec = get_spec("tiny")
    rec = Recorder(None)
    alloc = PagedAllocator(
        spec, (capacity + 1) * 16 * spec.bytes_per_token, rec, block_size=16, enable_prefix_caching=True
    )
    engine_hits = []
    for i, r in enumerate(requests):
        tokens = r.prompt_tokens()
        hit = alloc.admit(i, tokens, r.prompt_len + 1)
        alloc.append(i, tokens[hit:])
        alloc.check_invariants()
        engine_hits.append(hit // 16)
        alloc.free(i)
    ev = trace_from_recorder(rec).events
    engine_evicted = ev[ev["kind"] == "block_evict"]["aux"].tolist()

    acc = from_requests(requests, 16)
    rep = replay(acc, oracle_lru(), capacity, explain=True)
    assert rep.hits.tolist() == engine_hits
    # The lab's victims, as the allocator's hashes of the same blocks, in eviction order.
    lab_order = _lab_eviction_order(acc, requests, capacity)
    assert lab_order == engine_evicted
    assert len(engine_evicted) > 10  # the cache was under pressure


def oracle_lru():
    from kvscope.policies.lru import LRU

    return LRU()


def _lab_eviction_order(acc, requests, capacity) -> list[int]:
    """Replay the lab's LRU and record its victims, mapped to the paged allocator's chain hashes."""
    from kvscope.alloc.paged import _ROOT_HASH, block_hash
    from kvscope.policies.lru import LRU

    key_hash: dict[int, int] = {}
    for r, req in zip(range(acc.num_requests), requests, strict=True):
        tokens = req.prompt_tokens()
        parent = _ROOT_HASH
        for j, key in enumerate(acc.chains[r]):
            parent = block_hash(parent, tokens[16 * j : 16 * (j + 1)])
            key_hash[key] = hash_prefix(parent)

    victims: list[int] = []

    class Logged(LRU):
        __slots__ = ()

        def evict(self, n):
            out = super().evict(n)
            victims.extend(out)
            return out

    replay(acc, Logged(), capacity)
    return [key_hash[k] for k in victims]


def test_discard_predictions_are_consistent_and_robust(conversation):
    """p = 0: the discard policy matches the optimum. p = 1: its misses stay within the combination's bound of
    LRU's (a quarter of the cache per switch plus a refill: 2 x capacity here), while the bare prediction-following
    rule collapses (so the bound is not vacuous)."""
    acc = conversation
    total = acc.num_blocks
    for capacity in (500, 3000, 6000):
        opt = run_one(acc, "belady", capacity)[0].hit_blocks
        lru = run_one(acc, "lru", capacity)[0].hit_blocks
        assert run_one(acc, "discard", capacity, 0.0)[0].hit_blocks >= 0.97 * opt
        robust = run_one(acc, "discard", capacity, 1.0)[0].hit_blocks
        assert total - robust <= (total - lru) + 2 * capacity, (capacity, robust, lru)
    capacity = 6000  # where LRU keeps enough to lose
    bare_bits = oracle.flip(oracle.discard_bits(acc, capacity), 1.0).tolist()
    bare = replay(acc, Mark0(bare_bits, acc.offsets.tolist(), capacity), capacity).hits.sum()
    lru = run_one(acc, "lru", capacity)[0].hit_blocks
    robust = run_one(acc, "discard", capacity, 1.0)[0].hit_blocks
    assert bare < 0.5 * lru < robust, (bare, lru, robust)


def test_phase_predictions_are_consistent_and_bounded(conversation):
    """p = 0 beats p = 1 and LRU; p = 1 (every bit wrong) keeps at least half of what the same marking algorithm
    gets with no information (all bits equal: uniformly random unmarked victims)."""
    acc = conversation
    capacity = 3000
    right = run_one(acc, "phase", capacity, 0.0)[0].hit_blocks
    wrong = run_one(acc, "phase", capacity, 1.0)[0].hit_blocks
    lru = run_one(acc, "lru", capacity)[0].hit_blocks
    blind = replay(acc, MarkAndPredict([0] * acc.num_blocks, acc.offsets.tolist(), capacity), capacity).hits.sum()
    assert right > lru and right > wrong
    assert wrong >= 0.5 * blind, (wrong, blind)


def test_hit_rate_degrades_with_the_prediction_error(conversation):
    frame = run_lab(conversation, ["discard", "phase"], [3000], [0.0, 0.25, 0.5, 1.0])
    for policy in ("discard", "phase"):
        rates = frame[frame.policy == policy].sort_values("prediction_error")["hit_rate"].to_numpy()
        assert rates[0] == rates.max() and rates[0] > rates[-1]


def test_the_oracles_bits(conversation):
    acc = conversation
    bits = oracle.discard_bits(acc, 10**9)  # a cache holding everything evicts nothing
    assert np.array_equal(bits == 1, acc.next_use >= acc.num_requests)
    phase = oracle.phase_bits(acc, 10**9)  # one phase: no next phase, so nothing is "needed next phase"
    assert not phase.any()
    assert oracle.flip(bits, 1.0).tolist() == (1 - bits).tolist()
    flipped = oracle.flip(bits, 0.3, seed=1)
    assert 0.25 < np.mean(flipped != bits) < 0.35
    with pytest.raises(ValueError, match="prediction-error"):
        oracle.flip(bits, 1.5)


def test_lab_command_json_and_parquet(tmp_path, capsys):
    out = tmp_path / "lab.parquet"
    code = main(
        [
            "lab",
            "-w",
            str(CONVERSATION),
            "-p",
            "lru,discard",
            "-c",
            "200,800",
            "--prediction-error",
            "0,1",
            "-n",
            "500",
            "--json",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["policy"] for r in rows} == {"lru", "discard"} and len(rows) == 2 + 4
    for r in rows:
        assert r["hit_rate"] == pytest.approx(r["hit_blocks"] / r["total_blocks"])
        assert (r["prediction_error"] is None) == (r["policy"] == "lru")
        assert {"capacity_blocks", "hit_tokens"} <= set(r)
    frame = pd.read_parquet(out)
    assert len(frame) == 6 and set(COLUMNS) <= set(frame.columns)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-p", "lru,nope", "-c", "10"], "--policies: unknown policy 'nope'"),
        (["-c", "0"], "--capacity: must be at least one block"),
        (["-c", "ten"], "--capacity: 'ten' is not a whole number"),
        (["-c", "10", "--prediction-error", "2"], "--prediction-error: must be a probability"),
        (["-c", "10", "--block-size", "16"], "a Mooncake trace's blocks are 512 tokens"),
        (["-c", "10", "-o", str(CONVERSATION)], "refusing to overwrite it"),
    ],
)
def test_lab_command_errors_are_one_line(argv, message, capsys):
    assert main(["lab", "-w", str(CONVERSATION), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_kvscope_workload_is_replayed_by_its_full_blocks():
    requests = [
        Request("a", 0.0, 40, 1),
        Request("b", 1.0, 40, 1, prompt=tuple(Request("a", 0.0, 40, 1).prompt_tokens().tolist())),
    ]
    acc = from_requests(requests, 16)
    assert acc.chains == [[0, 1], [0, 1]]  # 2 full blocks of 16; the 8-token tail is the floor
    row, rep = run_one(acc, "lru", 4)
    assert rep.hits.tolist() == [0, 2] and row.floor_tokens == 16


def test_block_ids_and_token_hashing_give_the_same_chains():
    """A converted Mooncake workload keyed from its ids (fast path) and from its tokens hashed as vLLM does."""
    from kvscope.importers.mooncake import load_mooncake, to_requests

    requests = to_requests(load_mooncake(CONVERSATION, limit=60))
    by_ids = from_requests(requests, 64)
    as_tokens = [
        Request(r.id, r.arrival, r.prompt_len, r.output_len, prompt=tuple(r.prompt_tokens().tolist())) for r in requests
    ]
    by_tokens = from_requests(as_tokens, 64)
    assert by_ids.chains == by_tokens.chains
    assert by_ids.num_keys < by_ids.num_blocks  # they do share


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mooncake"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["conversation_trace.jsonl", "synthetic_trace.jsonl"])
def test_consistency_and_robustness_on_the_whole_shared_traces(name):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} is not here (the project's shared data)")
    acc = load_accesses(str(path))
    total = acc.num_blocks
    for capacity in (1000, 6000):
        opt = run_one(acc, "belady", capacity)[0].hit_blocks
        lru = run_one(acc, "lru", capacity)[0].hit_blocks
        assert run_one(acc, "discard", capacity, 0.0)[0].hit_blocks >= 0.97 * opt
        assert total - run_one(acc, "discard", capacity, 1.0)[0].hit_blocks <= total - lru + 2 * capacity
        assert run_one(acc, "phase", capacity, 0.0)[0].hit_blocks > run_one(acc, "phase", capacity, 1.0)[0].hit_blocks
