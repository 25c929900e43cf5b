"""Scheduler and engine semantics on --device sim: step-by-step memory per the contract, hand-computed peaks on every
allocator, preemption (recompute and swap), forks, prefix hits, chunked prefill, arrivals on the simulated clock."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvscope.engine import RunConfig, record_run
from kvscope.events import Kind
from kvscope.spec import get_spec
from kvscope.workload import Request, SharedPrefix

SPEC = get_spec("tiny")
BPT = SPEC.bytes_per_token  # 512


def run(requests, **options):
    """Record a sim run in memory with invariant checks after every step -> (events DataFrame, stats, trace)."""
    options.setdefault("model", "tiny")
    options.setdefault("kv_memory", 1 << 20)
    options.setdefault("max_len", 64)
    setup = options.pop("setup", None)
    cfg = RunConfig(check_invariants=True, **options)
    result = record_run(requests, cfg, setup=setup)
    trace = result.trace()
    return trace.events, result.stats, trace


def kind(ev, k: Kind):
    return ev[ev["kind"] == k.name.lower()]


def acct(ev, k: Kind) -> list[int]:
    """The ACCT sample of every step, in step order."""
    return kind(ev, k).sort_values("step")["bytes"].tolist()


def reqs(*specs, arrival=0.0):
    """Requests from (prompt_len, output_len[, n]) tuples."""
    out = []
    for i, s in enumerate(specs):
        p, o, n = (*s, 1) if len(s) == 2 else s
        out.append(Request(f"r{i}", arrival, p, o, n=n))
    return out


# ---- the contract: prefill in step 0, one token per later step, finish and free at the end of step O - 1 -------------


@pytest.mark.parametrize("allocator", ["static", "paged", "vmm"])
def test_all_at_t0_prefill_step0_decode_every_step_finish_per_contract(allocator):
    workload = reqs((5, 4), (20, 3), (33, 1), (7, 6))
    ev, stats, _ = run(workload, allocator=allocator, **({"page_size": 4096} if allocator == "vmm" else {}))
    for i, r in enumerate(workload):
        mine = ev[ev["seq"] == i]
        assert kind(mine, Kind.ADMIT)["step"].tolist() == [0]
        appends = kind(mine, Kind.APPEND)
        # Prefill: P tokens in step 0; then one token in each of steps 1..O-1.
        assert appends["step"].tolist() == list(range(r.output_len))
        assert appends["n"].tolist() == [r.prompt_len] + [1] * (r.output_len - 1)
        assert appends["aux"].tolist() == [r.prompt_len + k for k in range(r.output_len)]
        fin = kind(mine, Kind.FINISH)
        assert fin["step"].tolist() == [r.output_len - 1]
        assert fin["n"].tolist() == [r.prompt_len + r.output_len - 1]
    assert stats.steps == 6
    assert stats.finished_requests == 4 and stats.rejected_requests == 0
    assert stats.generated_tokens == sum(r.output_len for r in workload)
    assert kind(ev, Kind.STEP_PREFILL)["n"].tolist() == [65, 0, 0, 0, 0, 0]
    assert kind(ev, Kind.STEP_DECODE)["n"].tolist() == [0, 3, 3, 2, 1, 1]
    # Memory is released at the end of the finishing step: the step-end samples never show P + O - 1.
    held = [5 + 20 + 7, 6 + 21 + 8, 7 + 9, 10, 11, 0]
    assert acct(ev, Kind.ACCT_USED) == [t * BPT for t in held]
    assert acct(ev, Kind.ACCT_LOGICAL) == [t * BPT for t in held]


SMALL = reqs((5, 4), (20, 3), (33, 1))
# Tokens held at the end of each step: A=5,B=20 (C finished in step 0) | A=6,B=21 | A=7 (B done) | 0 (A done)
SMALL_USED = [25, 27, 7, 0]
# The most held at any instant of each step: C (output length 1) holds its 33 prompt tokens during step 0, B its
# 22 during step 2 and A its 8 during step 3, each released only at the end of its finishing step.
SMALL_PEAK_USED = [5 + 20 + 33, 6 + 21, 7 + 22, 8]


@pytest.mark.parametrize(
    ("allocator", "options", "reserved_tokens", "peak_reserved_tokens"),
    [
        # paged, 16-token blocks: A 1 block, B 2 blocks, C 3 blocks during step 0; then A alone 1 block
        ("paged", {}, [48, 48, 16, 0], [96, 48, 48, 16]),
        ("paged", {"block_size": 4}, [4 * (2 + 5), 4 * (2 + 6), 4 * 2, 0], [4 * (2 + 5 + 9), 32, 32, 8]),
        # static reserves max_len (64) rows / next power of two of P + O - 1 / exactly P + O - 1 per sequence
        ("static", {}, [128, 128, 64, 0], [192, 128, 128, 64]),
        ("static", {"static_variant": "pow2"}, [8 + 32, 8 + 32, 8, 0], [8 + 32 + 64, 40, 40, 8]),
        ("static", {"static_variant": "oracle"}, [8 + 22, 8 + 22, 8, 0], [8 + 22 + 33, 30, 30, 8]),
        # vmm, 4 KiB pages of 128-byte rows: 32 tokens per page-group (4 pages). A 1, B 1, C 2 groups; freed slots
        # keep their pages (deferred reclamation), so reserved never drops
        ("vmm", {"page_size": 4096}, [128, 128, 128, 128], [128, 128, 128, 128]),
        ("vmm", {"page_size": 4096, "deferred_reclaim": False}, [64, 64, 32, 0], [128, 64, 64, 32]),
    ],
)
def test_hand_computed_used_and_reserved_match_acct_samples_and_summary(
    allocator, options, reserved_tokens, peak_reserved_tokens
):
    from kvscope.analysis.memory import memory_timeline
    from kvscope.analysis.summary import summarize

    ev, stats, trace = run(SMALL, allocator=allocator, **options)
    assert acct(ev, Kind.ACCT_USED) == [t * BPT for t in SMALL_USED]
    assert acct(ev, Kind.ACCT_RESERVED) == [t * BPT for t in reserved_tokens]
    # In-step peaks: every request was resident during step 0, including the one that finished in it.
    assert acct(ev, Kind.ACCT_PEAK_USED) == [t * BPT for t in SMALL_PEAK_USED]
    assert acct(ev, Kind.ACCT_PEAK_RESERVED) == [t * BPT for t in peak_reserved_tokens]
    tl = memory_timeline(trace)
    assert tl["peak_used"].tolist() == [t * BPT for t in SMALL_PEAK_USED]
    assert tl["peak_reserved"].tolist() == [t * BPT for t in peak_reserved_tokens]
    assert (tl["peak_used"] >= tl["used"]).all() and (tl["peak_reserved"] >= tl["reserved"]).all()
    assert stats.peak_used_bytes == 58 * BPT
    assert stats.peak_reserved_bytes == max(peak_reserved_tokens) * BPT
    summary = summarize(trace)
    assert summary["peaks"] == "at any instant"
    assert summary["peak_used_bytes"] == 58 * BPT
    assert summary["peak_reserved_bytes"] == max(peak_reserved_tokens) * BPT
    assert summary["peak_used_end_of_step_bytes"] == 27 * BPT
    assert summary["peak_reserved_end_of_step_bytes"] == max(reserved_tokens) * BPT
    assert summary["finished"] == 3
    assert summary["generated_tokens"] == 8


@pytest.mark.parametrize("output_len", [1, 2])
@pytest.mark.parametrize("allocator", ["static", "paged", "vmm"])
def test_peak_counts_requests_that_finish_in_the_peak_step(allocator, output_len):
    """Twelve requests at t=0, every one of them done within two steps: the high-water mark is the sum of what
    they all held, though no end-of-step sample ever shows more than a fraction of it."""
    from kvscope.analysis.summary import summarize

    lens = [(10 + 3 * i, output_len if i % 2 else 1) for i in range(12)]
    extra = {"page_size": 4096} if allocator == "vmm" else {}
    ev, _, trace = run(reqs(*lens), allocator=allocator, max_len=64, kv_memory=1 << 22, **extra)
    held_step0 = sum(p for p, _ in lens)
    held_step1 = sum(p + 1 for p, o in lens if o == 2)
    peaks = acct(ev, Kind.ACCT_PEAK_USED)
    assert peaks[0] == held_step0 * BPT
    if output_len == 2:
        assert peaks[1] == held_step1 * BPT
    summary = summarize(trace)
    assert summary["peak_used_bytes"] == held_step0 * BPT
    assert summary["peak_used_end_of_step_bytes"] < summary["peak_used_bytes"]
    if allocator == "static":  # every request reserves max_len rows during step 0
        assert summary["peak_reserved_bytes"] == 12 * 64 * BPT


def test_vmm_waste_is_measured_while_requests_hold_memory_and_retention_is_apart():
    """Deferred reclamation keeps every page mapped after the last request: that is retention, not waste.
    Hand-computed (tokens): 4 groups of 32 stay mapped from step 0 on. Waste peaks at 121 right after B finishes in
    step 2 (A holds 7 tokens in 128 mapped); after A's release nothing is live, so the 128 retained tokens' worth
    of pages are not waste."""
    from kvscope.analysis.summary import summarize

    ev, _, trace = run(SMALL, allocator="vmm", page_size=4096)
    # A step's peak includes the state it starts from (the previous step's end): step 1 starts at 128 - 25 and
    # step 3 at 128 - 7, both above anything reached inside those steps.
    assert acct(ev, Kind.ACCT_PEAK_WASTE) == [t * BPT for t in (128 - 25, 128 - 25, 128 - 7, 128 - 7)]
    summary = summarize(trace)
    assert summary["peak_waste_bytes"] == 121 * BPT
    assert summary["retained_end_bytes"] == 128 * BPT
    assert summary["peak_waste_bytes"] < summary["capacity_bytes"]


def test_meta_carries_request_table_allocator_config_and_versions():
    _, _, trace = run(SMALL, allocator="paged", block_size=8)
    meta = trace.meta
    assert meta["requests"]["seq"] == [0, 1, 2]
    assert meta["requests"]["prompt_len"] == [5, 20, 33]
    assert meta["requests"]["output_len"] == [4, 3, 1]
    assert meta["allocator_config"]["block_size"] == 8
    assert meta["allocator_config"]["num_blocks"] == (1 << 20) // (8 * BPT)
    assert meta["device"] == "sim" and meta["model"] == "tiny"
    assert meta["device_name"] == "simulated H100 SXM 80GB, roofline model"
    assert meta["spec"]["bytes_per_token"] == BPT
    assert meta["engine_config"]["max_len"] == 64
    assert meta["versions"]["kvscope"] and meta["versions"]["python"]
    assert meta["start_time"].endswith("+00:00")


# ---- limits ----------------------------------------------------------------------------------------------------------


def test_max_batch_caps_the_running_sequences():
    ev, stats, _ = run(reqs(*[(4, 5)] * 5), allocator="paged", max_batch=2)
    assert kind(ev, Kind.STEP)["n"].max() == 2
    assert stats.finished_requests == 5
    # FCFS: requests are admitted in workload order.
    assert kind(ev, Kind.ADMIT)["seq"].tolist() == [0, 1, 2, 3, 4]


def test_token_budget_limits_prefill_and_an_oversized_prompt_runs_alone():
    ev, stats, _ = run(reqs((20, 3), (20, 3), (50, 2)), allocator="paged", max_tokens_per_step=30)
    admits = kind(ev, Kind.ADMIT)
    # 20 + 20 > 30: the second waits a step; the 50-token prompt exceeds the whole budget and is admitted when it is
    # the step's first prefill (beside decodes).
    assert admits["step"].tolist() == [0, 1, 2]
    assert kind(ev, Kind.STEP_PREFILL)["n"].tolist()[:3] == [20, 20, 50]
    assert stats.finished_requests == 3


def test_requests_longer_than_max_len_or_the_pool_are_rejected():
    # r0: P + O - 1 = 70 > max_len 64. r1 fits max_len but needs 60 tokens (4 blocks of 16); the pool has 3 blocks.
    ev, stats, _ = run(reqs((60, 11), (40, 21), (4, 2)), allocator="paged", kv_memory=3 * 16 * BPT)
    rejects = kind(ev, Kind.REJECT)
    assert rejects["seq"].tolist() == [0, 1]
    assert rejects["n"].tolist() == [70, 60]
    assert stats.rejected_requests == 2 and stats.finished_requests == 1
    assert kind(ev, Kind.FINISH)["seq"].tolist() == [2]


def test_a_request_longer_than_max_len_is_rejected_before_its_token_ids_are_built(monkeypatch):
    built = []
    real = Request.prompt_tokens

    def counting(self):
        built.append(self.id)
        return real(self)

    monkeypatch.setattr(Request, "prompt_tokens", counting)
    seen = {}
    _, stats, _ = run(reqs((60, 11), (4, 2)), allocator="paged", setup=lambda e: seen.setdefault("engine", e))
    assert stats.rejected_requests == 1 and built == ["r1"]
    rejected = seen["engine"].scheduler.sequences[0]
    assert rejected.status == "rejected" and len(rejected.prompt) == 0 and len(rejected.output) == 0


# ---- preemption ------------------------------------------------------------------------------------------------------

# Two requests P=8, O=10 (final length 17) in a pool of 6 blocks of 4 tokens: both grow to 12 tokens (3 blocks each)
# by step 4; in step 5 r0 needs a 4th block: r1, the most recently admitted, is preempted.
PRESSURE = reqs((8, 10), (8, 10))
PRESSURE_OPTS = {"allocator": "paged", "block_size": 4, "kv_memory": 6 * 4 * BPT}


def test_preemption_by_recompute_requeues_with_generated_tokens():
    ev, stats, _ = run(PRESSURE, **PRESSURE_OPTS)
    pre = kind(ev, Kind.PREEMPT)
    assert pre[["step", "seq", "n", "aux"]].values.tolist() == [[5, 1, 12, 0]]
    assert kind(ev, Kind.OOM)["step"].tolist() == [5]  # r0's refused append, before the preemption
    r1 = ev[ev["seq"] == 1]
    # Readmitted once r0 finished (step 9) and freed its blocks: prompt + the 5 tokens generated so far.
    assert kind(r1, Kind.ADMIT)[["step", "n"]].values.tolist() == [[0, 8], [10, 13]]
    assert kind(r1, Kind.FINISH)[["step", "n"]].values.tolist() == [[14, 17]]
    assert kind(ev, Kind.FINISH)["n"].tolist() == [17, 17]
    assert stats.preemptions == 1 and stats.finished_requests == 2
    assert stats.generated_tokens == 20  # recompute regenerates nothing: the 13-token prefill yields token 6
    assert kind(ev, Kind.STEP_PREFILL)["n"].sum() == 8 + 8 + 13


def test_preemption_by_swap_moves_blocks_out_and_back():
    ev, stats, _ = run(PRESSURE, preemption="swap", swap_space=64 * BPT, **PRESSURE_OPTS)
    pre = kind(ev, Kind.PREEMPT)
    assert pre[["step", "seq", "n", "aux"]].values.tolist() == [[5, 1, 12, 1]]
    out = kind(ev, Kind.SWAP_OUT)
    back = kind(ev, Kind.SWAP_IN)
    assert out[["step", "seq", "n"]].values.tolist() == [[5, 1, 3]]
    assert back[["step", "seq", "n"]].values.tolist() == [[10, 1, 3]]
    r1 = ev[ev["seq"] == 1]
    assert kind(r1, Kind.ADMIT)["step"].tolist() == [0]  # never readmitted: nothing recomputed
    # Swapped back in step 10 and decoding in the same step: tokens 13..17 in steps 10..14.
    assert kind(r1, Kind.FINISH)[["step", "n"]].values.tolist() == [[14, 17]]
    assert kind(ev, Kind.STEP_PREFILL)["n"].sum() == 16
    assert stats.preemptions == 1 and stats.finished_requests == 2


def test_a_sequence_that_cannot_grow_even_alone_is_rejected_not_looped():
    # 3 blocks of 4 tokens: the prompt fits, the final length 16 never does.
    ev, stats, _ = run(reqs((8, 9)), allocator="paged", block_size=4, kv_memory=3 * 4 * BPT)
    assert kind(ev, Kind.REJECT)[["seq", "n"]].values.tolist() == [[0, 16]]
    assert stats.rejected_requests == 1 and stats.finished_requests == 0
    assert acct(ev, Kind.ACCT_USED)[-1] == 0


def test_static_admission_waits_for_a_free_reservation():
    # Room for two max_len reservations: the third request waits until one finishes.
    ev, stats, _ = run(reqs((4, 3), (4, 6), (4, 2)), allocator="static", kv_memory=2 * 64 * BPT)
    assert kind(ev, Kind.ADMIT)[["seq", "step"]].values.tolist() == [[0, 0], [1, 0], [2, 3]]
    assert stats.finished_requests == 3 and stats.preemptions == 0


# ---- parallel sampling -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocator", ["paged", "static", "vmm"])
def test_n_samples_fork_after_prefill_and_each_generates_o_tokens(allocator):
    workload = [Request("a", 0.0, 10, 4, n=3), Request("b", 0.0, 6, 2)]
    opts = {"page_size": 4096} if allocator == "vmm" else {}
    ev, stats, _ = run(workload, allocator=allocator, **opts)
    forks = kind(ev, Kind.FORK)
    # Children get ids after all requests: 2 and 3; one FORK each, at the end of the parent's prefill step.
    assert forks[["seq", "aux", "n", "step"]].values.tolist() == [[2, 0, 10, 0], [3, 0, 10, 0]]
    fin = kind(ev, Kind.FINISH).sort_values("seq")
    assert fin[["seq", "n", "step"]].values.tolist() == [[0, 13, 3], [1, 7, 1], [2, 13, 3], [3, 13, 3]]
    assert stats.generated_tokens == 3 * 4 + 2
    assert stats.finished_requests == 2 and stats.finished_sequences == 4
    logical = acct(ev, Kind.ACCT_LOGICAL)
    used = acct(ev, Kind.ACCT_USED)
    assert logical[0] == (3 * 10 + 6) * BPT
    if allocator == "static":
        assert used[0] == logical[0]  # static copies the prompt into each child's reservation
    else:
        # paged shares the parent's blocks; vmm maps the parent's pages into the children's slots (tiny: 32 tokens
        # a 4 KiB page of a per-layer buffer, so the 10 prompt tokens share one partly filled page per buffer until
        # the first decode step copies it).
        assert used[0] == (10 + 6) * BPT


def test_paged_fork_children_copy_on_write_their_shared_partial_block():
    ev, _, _ = run([Request("a", 0.0, 10, 3, n=2)], allocator="paged")
    cows = kind(ev, Kind.BLOCK_COW)
    # Parent and child both append in step 1 to the shared partly filled block: the first writer copies.
    assert len(cows) == 1 and cows["step"].tolist() == [1]


# ---- beam search (issue 11) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allocator", ["paged", "static", "vmm"])
def test_beam_search_keeps_the_width_forking_and_pruning_every_decode_step(allocator):
    """K = 3 beams of a 10-token prompt, 5 tokens each: the first two beams fork at the end of the prefill step; at
    the end of each later step before the last, each pruned beam is matched by a fork of a surviving beam holding
    P + step tokens; 3 beams are live at every step end and all finish together holding P + O - 1."""
    opts = {"page_size": 4096} if allocator == "vmm" else {}
    ev, stats, _ = run([Request("a", 0.0, 10, 5, beam=3)], allocator=allocator, **opts)
    forks, prunes = kind(ev, Kind.FORK), kind(ev, Kind.PRUNE)
    first = forks[forks["step"] == 0]
    assert first[["seq", "aux", "n"]].values.tolist() == [[1, 0, 10], [2, 0, 10]]
    later = forks[forks["step"] > 0]
    assert set(later["step"]) <= {1, 2, 3} and set(prunes["step"]) <= {1, 2, 3}
    for step in (1, 2, 3):
        assert (later["step"] == step).sum() == (prunes["step"] == step).sum()
        assert (later.loc[later["step"] == step, "n"] == 10 + step).all()  # the parent's tokens, shared
        assert (prunes.loc[prunes["step"] == step, "n"] == 10 + step).all()
    assert len(prunes) > 0, "no beam was ever pruned"
    live = set()
    for step in range(5):
        upto = ev[ev["step"] <= step]
        born = set(kind(upto, Kind.ADMIT)["seq"]) | set(kind(upto, Kind.FORK)["seq"])
        gone = set(kind(upto, Kind.PRUNE)["seq"]) | set(kind(upto, Kind.FINISH)["seq"])
        live = born - gone
        assert len(live) == (3 if step < 4 else 0), step
    fin = kind(ev, Kind.FINISH)
    assert len(fin) == 3 and set(fin["step"]) == {4} and set(fin["n"]) == {14}
    assert stats.finished_requests == 1 and stats.finished_sequences == 3
    # Every pruned beam's memory goes back in its step (its blocks, slot or reservation).
    freed = {"paged": Kind.BLOCK_FREE, "static": Kind.STATIC_RELEASE, "vmm": Kind.SLOT_FREE}[allocator]
    for _, p in prunes.iterrows():
        assert ((kind(ev, freed)["seq"] == p["seq"]) & (kind(ev, freed)["step"] == p["step"])).any()


@pytest.mark.parametrize("width", [{"n": 4}, {"beam": 4}], ids=["samples", "beams"])
def test_forks_still_due_count_against_max_batch(width):
    """Admission counts the samples (or beams) that requests admitted in the same step fork at its end: 5 requests
    of width 4 with max_batch 8 run two at a time, never 5 x 4 sequences at once (and a VMM slot each)."""
    workload = [Request(f"r{i}", 0.0, 6, 4, **width) for i in range(5)]
    for allocator, opts in (("paged", {}), ("vmm", {"page_size": 4096})):
        ev, stats, _ = run(workload, allocator=allocator, max_batch=8, **opts)
        assert kind(ev, Kind.STEP)["n"].max() <= 8
        assert stats.finished_requests == 5 and not (kind(ev, Kind.FORK)["n"] == 0).any()  # no fork without room
        assert kind(ev, Kind.ADMIT)["step"].tolist()[:2] == [0, 0]


def test_forked_beams_copy_the_shared_partial_block_before_their_first_write():
    ev, _, _ = run([Request("a", 0.0, 10, 6, beam=4)], allocator="paged", block_size=16)
    forks, cows = kind(ev, Kind.FORK), kind(ev, Kind.BLOCK_COW)
    # A beam's tokens share its parent's partly filled block: whichever of the two writes first copies it.
    for _, f in forks.iterrows():
        pair = {f["seq"], f["aux"]}
        assert (cows["seq"].isin(pair) & (cows["step"] == f["step"] + 1)).any(), f"fork of {f['seq']} not copied"


def test_beam_selection_is_deterministic_and_the_same_on_every_allocator():
    workload = [Request("a", 0.0, 10, 8, beam=4), Request("b", 0.0, 7, 6, beam=2)]
    trees = []
    for allocator, opts in (("paged", {}), ("paged", {}), ("vmm", {"page_size": 4096}), ("static", {})):
        ev, _, _ = run(workload, allocator=allocator, **opts)
        trees.append(kind(ev, Kind.FORK)[["seq", "aux", "step"]].values.tolist())
        trees.append(kind(ev, Kind.PRUNE)[["seq", "step"]].values.tolist())
    assert trees[0::2] == [trees[0]] * 4 and trees[1::2] == [trees[1]] * 4


# ---- prefix caching --------------------------------------------------------------------------------------------------


def test_prefix_caching_hits_shared_prompt_blocks():
    sp = SharedPrefix("sys", 32)
    workload = [Request("a", 0.0, 40, 3, shared_prefix=sp), Request("b", 0.0, 45, 3, shared_prefix=sp)]
    ev, stats, _ = run(workload, allocator="paged", prefix_caching=True)
    admits = kind(ev, Kind.ADMIT)
    assert admits[["seq", "aux"]].values.tolist() == [[0, 0], [1, 32]]
    assert kind(ev, Kind.PREFIX_HIT)[["seq", "n"]].values.tolist() == [[1, 32]]
    assert kind(ev, Kind.STEP_PREFILL)["n"].tolist()[0] == 40 + 45 - 32
    assert stats.finished_requests == 2
    # Without prefix caching: no hits, the whole prompts are computed.
    ev2, _, _ = run(workload, allocator="paged")
    assert kind(ev2, Kind.ADMIT)["aux"].tolist() == [0, 0]
    assert kind(ev2, Kind.STEP_PREFILL)["n"].tolist()[0] == 85


def test_prefix_hits_for_a_later_request_after_the_first_finished():
    sp = SharedPrefix("sys", 16)
    workload = [Request("a", 0.0, 20, 2, shared_prefix=sp), Request("b", 1.0, 20, 2, shared_prefix=sp)]
    ev, _, _ = run(workload, allocator="paged", prefix_caching=True)
    # a finished long before b arrives; its full block stays cached-idle and b hits it.
    assert kind(ev, Kind.ADMIT)["aux"].tolist() == [0, 16]
    cached_idle = acct(ev, Kind.ACCT_CACHED_IDLE)
    assert cached_idle[1] == 16 * BPT  # after a finished: its full block, idle but still cached


# ---- chunked prefill -------------------------------------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt_within_the_budget():
    workload = [Request("short", 0.0, 4, 6), Request("long", 0.0, 100, 2)]
    ev, stats, _ = run(workload, allocator="paged", max_tokens_per_step=32, chunked_prefill=True, max_len=128)
    prefill = kind(ev, Kind.STEP_PREFILL)["n"].tolist()
    decode = kind(ev, Kind.STEP_DECODE)["n"].tolist()
    # Step 0: short's 4 + 28 of long; then 31 (budget minus short's decode) per step until 100 are done.
    assert prefill[:5] == [32, 31, 31, 10, 0]
    assert decode == [0, 1, 1, 1, 2, 1]
    long_appends = kind(ev[ev["seq"] == 1], Kind.APPEND)["n"].tolist()
    assert long_appends == [28, 31, 31, 10, 1]
    # The long prompt's first token comes with its last chunk (step 3); one decode later it is done.
    assert kind(ev, Kind.FINISH)[["seq", "step"]].values.tolist() == [[1, 4], [0, 5]]
    assert stats.finished_requests == 2


def test_without_chunking_the_same_long_prompt_is_one_prefill():
    workload = [Request("short", 0.0, 4, 6), Request("long", 0.0, 100, 2)]
    ev, _, _ = run(workload, allocator="paged", max_tokens_per_step=32, max_len=128)
    assert kind(ev[ev["seq"] == 1], Kind.APPEND)["n"].tolist()[0] == 100
    assert kind(ev, Kind.ADMIT)["step"].tolist() == [0, 1]  # over budget: admitted as the first prefill of step 1


# ---- the clock -------------------------------------------------------------------------------------------------------


def test_arrivals_wait_for_the_simulated_clock_and_idle_time_is_skipped():
    workload = [Request("a", 0.0, 10, 3), Request("b", 2.5, 10, 3)]
    ev, stats, _ = run(workload, allocator="paged")
    arrive_b = int(kind(ev, Kind.ARRIVE).set_index("seq").loc[1, "step"])
    steps = kind(ev, Kind.STEP).set_index("step")
    assert arrive_b == 3  # a's three steps, then a jump to 2.5 s
    assert steps.loc[2, "aux"] < 2_500_000_000 < steps.loc[3, "aux"]
    assert stats.steps == 6
    assert stats.clock_s > 2.5


def test_cost_model_decode_is_weight_bandwidth_bound():
    from kvscope.engine.costmodel import GPUCostModel, ModelCosts, StepCost, step_time_ns

    spec = get_spec("llama-3-8b")
    costs = ModelCosts.from_spec(spec)
    assert 8.0e9 < costs.params < 8.1e9  # Llama-3-8B has 8.03 B parameters
    model = GPUCostModel()
    t = step_time_ns(model, costs, StepCost(tokens=1, kv_tokens_read=1000, attn_pairs=1000))
    expected = (costs.weight_bytes + 1001 * spec.bytes_per_token) / (model.hbm_bandwidth * model.bandwidth_efficiency)
    assert t == int(expected * 1e9) + model.step_overhead_ns
    # A 4096-token prefill is compute-bound.
    big = StepCost(tokens=4096, kv_tokens_read=4096, attn_pairs=4096 * 4097 // 2)
    flops = 4096 * costs.flops_per_token + big.attn_pairs * costs.attn_flops_per_pair
    assert step_time_ns(model, costs, big) == int(flops / (model.peak_flops * model.flops_efficiency) * 1e9) + (
        model.step_overhead_ns
    )


# ---- interruption ----------------------------------------------------------------------------------------------------


def test_interrupted_run_leaves_a_truncated_but_readable_trace(tmp_path):
    from kvscope.trace import TruncatedTraceWarning, load_trace

    path = tmp_path / "cut.kvtrace"

    def interrupt_at_step_3(engine):
        original = engine.executor.execute

        def execute(plan):
            if engine.steps == 3:
                raise KeyboardInterrupt
            return original(plan)

        engine.executor.execute = execute

    with pytest.raises(KeyboardInterrupt):
        record_run(reqs((5, 10), (6, 10)), RunConfig(model="tiny", kv_memory=1 << 20), path=path,
                   setup=interrupt_at_step_3)  # fmt: skip
    with pytest.warns(TruncatedTraceWarning):
        trace = load_trace(path)
    assert trace.truncated
    ev = trace.events
    assert sorted(kind(ev, Kind.STEP)["step"].tolist()) == [0, 1, 2]
    assert len(kind(ev, Kind.RUN_END)) == 0
    assert trace.meta["allocator"] == "paged"


# ---- every run ends: random workloads on every allocator -------------------------------------------------------------

workloads = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 30), st.integers(1, 3), st.floats(0, 0.05)), min_size=1, max_size=12
)


@pytest.mark.parametrize(
    "options",
    [
        {"allocator": "paged", "block_size": 4, "kv_memory": 24 * 4 * BPT},
        {"allocator": "paged", "block_size": 4, "kv_memory": 24 * 4 * BPT, "prefix_caching": True},
        {"allocator": "paged", "block_size": 4, "kv_memory": 24 * 4 * BPT, "preemption": "swap",
         "swap_space": 16 * 4 * BPT},
        {"allocator": "paged", "block_size": 8, "kv_memory": 12 * 8 * BPT, "chunked_prefill": True,
         "max_tokens_per_step": 24},
        {"allocator": "static", "kv_memory": 3 * 64 * BPT, "static_variant": "pow2"},
        {"allocator": "vmm", "page_size": 4096, "kv_memory": 6 * 4 * 4096, "max_batch": 4},
    ],
    ids=["paged", "paged-prefix", "paged-swap", "paged-chunked", "static-pow2", "vmm"],
)  # fmt: skip
@given(workload=workloads)
def test_every_request_finishes_or_is_rejected_with_exact_lengths(options, workload):
    requests = [
        Request(f"r{i}", t, p, o, n=n, shared_prefix=SharedPrefix("s", min(p, 8)))
        for i, (p, o, n, t) in enumerate(workload)
    ]
    ev, stats, _ = run(requests, **options)
    assert stats.finished_requests + stats.rejected_requests == len(requests)
    fin = kind(ev, Kind.FINISH)
    finals = {}
    for i, r in enumerate(requests):
        finals[i] = r.prompt_len + r.output_len - 1
    forks = kind(ev, Kind.FORK)
    parent = dict(zip(forks["seq"], forks["aux"], strict=True))
    for seq, n in zip(fin["seq"], fin["n"], strict=True):
        root = seq
        while root in parent:
            root = parent[root]
        assert n in (finals[root], 0)  # 0: an O == 1 child that never needed memory of its own
    assert acct(ev, Kind.ACCT_USED)[-1] == 0
    if stats.rejected_requests == 0:
        assert stats.generated_tokens == sum(r.output_len * r.n for r in requests)
    np.testing.assert_array_equal(kind(ev, Kind.STEP)["step"].to_numpy(), np.arange(stats.steps))


def test_teardown_closes_the_backend_even_when_the_allocator_close_fails(monkeypatch):
    """A failed unmap at the allocator's close must not leave the backend's reservations behind."""
    from kvscope.alloc.vmm import VMMAllocator
    from kvscope.backends.sim import SimMemory

    closed = []
    real_close = SimMemory.close

    def boom(self):
        raise RuntimeError("injected: unmap failed at close")

    def track(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(VMMAllocator, "close", boom)
    monkeypatch.setattr(SimMemory, "close", track)
    with pytest.raises(RuntimeError, match="injected"):
        run(reqs((5, 2)), allocator="vmm", page_size=4096)
    assert len(closed) == 1
