"""summary.summarize: exact numbers on hand-written traces, and agreement with the engine's own counters."""

from __future__ import annotations

import json

import pytest
from test_analysis_tracegen import BLOCK, BPT, CAP, make_requests, record, scenario_fork, scenario_prefix

from kvscope.analysis.requests import generated_tokens, request_lifetimes
from kvscope.analysis.summary import event_counts, last_step, summarize
from kvscope.recorder import Recorder
from kvscope.trace import trace_from_recorder

REQUIRED = [
    "allocator",
    "device",
    "model",
    "bytes_per_token",
    "requests",
    "finished",
    "steps",
    "generated_tokens",
    "peak_used_bytes",
    "peak_reserved_bytes",
    "mean_waste_fraction",
    "preemptions",
    "sharing_saved_bytes_peak",
    "prefix_hit_tokens",
    "capacity_bytes",
    "peak_waste_bytes",
    "wall_time_s",
    "events",
    "tokens_per_s",
    "truncated",
]


def test_fork_scenario_numbers():
    s = summarize(scenario_fork())
    assert [k for k in REQUIRED if k not in s] == []
    assert s["allocator"] == "paged" and s["model"] == "tiny" and s["bytes_per_token"] == BPT
    assert s["requests"] == 2 and s["finished"] == 2 and s["finished_sequences"] == 3 and s["forks"] == 1
    # seq 1: P=3 finishing with 4 tokens -> 2; seq 0: P=5 finishing with 7 -> 3; its fork seq 2 starts with 6 of
    # seq 0's tokens (forked during decode, as a beam is) and finishes with 7 -> 1 of its own.
    assert s["generated_tokens"] == 6
    assert s["steps"] == 3
    assert s["capacity_bytes"] == CAP
    assert s["peak_used_bytes"] == 8 * BPT
    assert s["peak_reserved_bytes"] == 3 * BLOCK
    assert s["peak_waste_bytes"] == 3 * BLOCK - 8 * BPT
    # Steps with reserved > 0: step 0 (waste 4 of 12 tokens' room), step 1 (2 of 8); step 2 reserves nothing.
    assert s["mean_waste_fraction"] == pytest.approx((4 / 12 + 2 / 8) / 2)
    assert s["sharing_saved_bytes_peak"] == 6 * BPT  # step 1: 12 tokens logical, 6 held once
    assert s["preemptions"] == 0 and s["prefix_hit_tokens"] == 0
    assert s["clock"] == "sim" and s["run_time_s"] == pytest.approx(0.003)
    assert s["tokens_per_s"] == pytest.approx(6 / 0.003)
    assert s["truncated"] is False
    json.dumps(s, allow_nan=False)


def test_prefix_scenario_excludes_readmission_hits_and_counts_recompute_once():
    s = summarize(scenario_prefix())
    # seq 0: P=9 finishing with 12 -> 4; seq 1: P=10, preempted holding 10, back with 11 and finishing -> 2.
    assert s["generated_tokens"] == 6
    assert s["preemptions"] == 1 and s["preemptions_recompute"] == 1 and s["preemptions_swap"] == 0
    assert s["prefix_hit_tokens"] == 8  # the re-admission's 8 hit tokens were this sequence's own work
    assert s["prompt_tokens"] == 19
    assert s["prefix_hit_rate"] == pytest.approx(8 / 19)
    assert s["prefill_tokens_computed"] == 14
    assert s["recomputed_tokens"] == 14 - (19 - 8)
    assert s["sharing_saved_bytes_peak"] == 8 * BPT
    assert s["peak_cached_idle_bytes"] == 3 * BLOCK
    assert s["mean_waste_fraction"] == pytest.approx((3 / 12 + 4 / 16 + 1 / 12) / 3)


def test_generated_tokens_per_sequence():
    lt = request_lifetimes(scenario_prefix()).set_index("seq")
    assert lt.loc[0, "generated"] == 4 and lt.loc[1, "generated"] == 2
    assert lt.loc[1, "preemptions"] == 1 and lt.loc[1, "prefix_hit_tokens"] == 8
    assert lt.loc[1, "max_tokens_held"] == 11


@pytest.mark.parametrize(
    "kind,opts",
    [
        ("paged", {"prefix_caching": True}),
        ("paged", {"preemption": "swap", "swap_space": 64 * 1024}),
        ("static", {"static_variant": "pow2"}),
        ("vmm", {"eager_pages": 1}),
    ],
)
def test_real_runs_agree_with_the_engine(kind, opts):
    requests = make_requests(24, seed=5, n_max=3, shared_prefix=12)
    trace = record(kind, requests, kv_memory=24 * 1024, **opts)
    stats = trace._stats
    s = summarize(trace)
    assert s["requests"] == 24 == stats.requests
    assert s["finished"] == stats.finished_requests
    assert s["rejected"] == stats.rejected_requests
    assert s["finished_sequences"] == stats.finished_sequences
    assert s["steps"] == stats.steps
    assert s["preemptions"] == stats.preemptions
    assert s["peak_used_bytes"] == stats.peak_used_bytes
    assert s["peak_reserved_bytes"] == stats.peak_reserved_bytes
    assert s["prefill_tokens_computed"] == stats.prefill_tokens
    assert s["decode_tokens_computed"] == stats.decode_tokens
    assert s["run_time_s"] == pytest.approx(stats.clock_s)
    assert s["generated_tokens"] == stats.generated_tokens
    # Every sample of every finished request generated its output_len tokens; unfinished ones generated fewer.
    lt = request_lifetimes(trace)
    out = {r.id: r.output_len for r in requests}
    finished = lt[lt["status"] == "finished"]
    assert (finished["generated"] == finished["request_id"].map(out)).all()
    assert (lt["generated"] <= lt["request_id"].map(out)).all()
    assert generated_tokens(trace) == s["generated_tokens"] == int(lt["generated"].sum())
    json.dumps(s, allow_nan=False)


def test_generated_tokens_all_finished_equals_workload():
    requests = make_requests(16, seed=9, n_max=2)
    trace = record("paged", requests, kv_memory=256 * 1024)
    s = summarize(trace)
    assert s["finished"] == 16
    assert s["generated_tokens"] == sum(r.n * r.output_len for r in requests)


def test_empty_and_cut_off_traces():
    rec = Recorder(None, {"allocator": "paged"})
    empty = trace_from_recorder(rec)
    s = summarize(empty)
    assert s["steps"] == 0 and s["generated_tokens"] == 0 and s["peak_used_bytes"] == 0
    assert s["mean_waste_fraction"] == 0.0 and s["tokens_per_s"] == 0.0
    json.dumps(s, allow_nan=False)


def test_summary_is_cached_but_returns_copies():
    trace = scenario_fork()
    a = summarize(trace)
    a["generated_tokens"] = -1
    assert summarize(trace)["generated_tokens"] == 6


def test_forked_samples_without_memory_at_the_fork():
    from test_analysis_tracegen import PAGED4, Script

    from kvscope.analysis.sharing import prefix_stats
    from kvscope.events import Kind

    # Request 0 (P=4, O=3, two samples): the fork finds no room (FORK n=0); the sample is admitted a step later
    # with prompt + its first token (5 tokens), 4 of them served from the prefix cache: the request's own work.
    s = Script("paged", PAGED4, requests=[(4, 3)])
    s.at(0).emit(Kind.ARRIVE, seq=0, n=4, aux=3).emit(Kind.ADMIT, seq=0, n=4)
    s.emit(Kind.BLOCK_ALLOC, seq=0, block=0, addr=0).emit(Kind.APPEND, seq=0, n=4, aux=4)
    s.emit(Kind.BLOCK_CACHE, seq=0, block=0, aux=7).emit(Kind.FORK, seq=1, n=0, aux=0)
    s.step_end(capacity=CAP, reserved=BLOCK, used=BLOCK, logical=BLOCK, free=CAP - BLOCK)
    s.at(1).emit(Kind.BLOCK_ALLOC, seq=0, block=1, addr=1).emit(Kind.APPEND, seq=0, n=1, aux=5)
    s.emit(Kind.BLOCK_SHARE, seq=1, block=0, addr=0, aux=2).emit(Kind.PREFIX_HIT, seq=1, n=4)
    s.emit(Kind.ADMIT, seq=1, n=5, aux=4).emit(Kind.BLOCK_ALLOC, seq=1, block=2, addr=1)
    s.emit(Kind.APPEND, seq=1, n=1, aux=5)
    s.step_end(capacity=CAP, reserved=3 * BLOCK, used=6 * BPT, logical=10 * BPT, internal=6 * BPT, free=5 * BLOCK)
    s.at(2).emit(Kind.APPEND, seq=0, n=1, aux=6).emit(Kind.FINISH, seq=0, n=6)
    s.emit(Kind.APPEND, seq=1, n=1, aux=6).emit(Kind.FINISH, seq=1, n=6)
    s.step_end(capacity=CAP, free=CAP)
    trace = s.trace()
    trace.meta["requests"]["n"] = [2]
    summary = summarize(trace)
    assert summary["generated_tokens"] == 3 + 3
    assert summary["finished"] == 1 and summary["forks"] == 1
    assert summary["prefix_hit_tokens"] == 0
    assert prefix_stats(trace)["readmission_hit_tokens"] == 4
    lt = request_lifetimes(trace).set_index("seq")
    assert lt.loc[1, "admit_step"] == 1 and lt.loc[1, "parent"] == 0 and lt.loc[1, "prefix_hit_tokens"] == 0

    # O = 1: the sample is complete at its fork without any memory (FORK n=0, FINISH n=0): it generated 1 token.
    s = Script("paged", PAGED4, requests=[(3, 1)])
    s.at(0).emit(Kind.ARRIVE, seq=0, n=3, aux=1).emit(Kind.ADMIT, seq=0, n=3)
    s.emit(Kind.BLOCK_ALLOC, seq=0, block=0, addr=0).emit(Kind.APPEND, seq=0, n=3, aux=3)
    s.emit(Kind.FORK, seq=1, n=0, aux=0).emit(Kind.FINISH, seq=1, n=0).emit(Kind.FINISH, seq=0, n=3)
    s.emit(Kind.BLOCK_FREE, seq=0, block=0, aux=0)
    s.step_end(capacity=CAP, free=CAP)
    trace = s.trace()
    trace.meta["requests"]["n"] = [2]
    assert summarize(trace)["generated_tokens"] == 2
    assert summarize(trace)["finished"] == 1


def test_last_step_and_event_counts():
    trace = scenario_fork()
    assert last_step(trace) == summarize(trace)["steps"] - 1 == 2
    counts = event_counts(trace)
    assert list(counts.columns) == ["kind", "events"]
    assert (counts["events"] > 0).all()
    expected = trace.events["kind"].astype(str).value_counts()
    assert dict(zip(counts["kind"], counts["events"], strict=True)) == expected.to_dict()
    empty = trace_from_recorder(Recorder(None, {"allocator": "paged"}))
    assert last_step(empty) == 0
    assert event_counts(empty).empty
