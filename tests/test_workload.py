"""Workloads: the Request record, token ids, the JSONL format and its errors, generators, the CLI command."""

from __future__ import annotations

import argparse
import json
import math
import re
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvscope.workload import (
    VOCAB_SIZE,
    Request,
    SharedPrefix,
    declared_reuse,
    describe_lengths,
    load_workload,
    save_workload,
    stream_tokens,
)
from kvscope.workload_gen import LENGTH_MODELS, NAMED_WORKLOADS, GenParams, generate, resolve_workload

# ------------------------------------------------------------------------------------------------ token ids


def test_stream_tokens_are_pinned_across_processes_and_versions():
    # Golden values: a prefix cache keyed on these ids must find the same blocks in any process on any machine.
    assert stream_tokens("req:r0", 0, 8).tolist() == [5889, 16184, 30001, 12522, 17781, 14814, 12204, 12667]
    assert stream_tokens("prefix:system-0", 100, 4).tolist() == [10053, 17490, 31499, 6347]


def test_stream_tokens_range_dtype_and_position_keyed():
    t = stream_tokens("x", 0, 50_000)
    assert t.dtype == np.int32
    assert t.min() >= 0 and t.max() < VOCAB_SIZE
    assert len(np.unique(t)) > 25_000  # well spread over the vocabulary
    assert np.array_equal(stream_tokens("x", 1000, 10), t[1000:1010])
    assert not np.array_equal(stream_tokens("y", 0, 100), t[:100])


def test_shared_prefix_tokens_identical_across_requests_and_different_after():
    sp = SharedPrefix("sys", 64)
    a = Request("a", 0.0, prompt_len=100, output_len=5, shared_prefix=sp)
    b = Request("b", 1.0, prompt_len=80, output_len=5, shared_prefix=sp)
    c = Request("c", 1.0, prompt_len=80, output_len=5)
    ta, tb = a.prompt_tokens(), b.prompt_tokens()
    assert len(ta) == 100 and len(tb) == 80 and ta.dtype == np.int32
    assert np.array_equal(ta[:64], tb[:64])
    assert np.mean(ta[64:80] != tb[64:80]) > 0.9
    assert np.mean(c.prompt_tokens()[:64] != ta[:64]) > 0.9
    # Another prefix id gives other tokens.
    d = Request("d", 0.0, prompt_len=100, output_len=5, shared_prefix=SharedPrefix("other", 64))
    assert np.mean(d.prompt_tokens()[:64] != ta[:64]) > 0.9


def test_output_tokens_per_sample_and_consistent_across_calls():
    r = Request("r", 0.0, prompt_len=10, output_len=40, n=3)
    full = r.output_tokens(0, 0, 40)
    assert np.array_equal(r.output_tokens(0, 15, 10), full[15:25])
    assert r.output_tokens(0, 40, 0).size == 0
    assert np.mean(r.output_tokens(1, 0, 40) != full) > 0.9
    assert np.mean(r.output_tokens(1, 0, 40) != r.output_tokens(2, 0, 40)) > 0.9
    with pytest.raises(ValueError, match="sample 3"):
        r.output_tokens(3, 0, 1)
    with pytest.raises(ValueError, match="outside"):
        r.output_tokens(0, 35, 6)


def test_explicit_prompt_is_used():
    r = Request("r", 0.0, prompt_len=3, output_len=2, prompt=np.array([7, 8, 9]))
    assert r.prompt == (7, 8, 9)
    assert r.prompt_tokens().tolist() == [7, 8, 9]


def _assert_conversations_continue(reqs: list[Request]) -> int:
    """Turn k+1's prompt starts with turn k's prompt + sample-0 answer; its new user text is new. Returns the
    number of turn pairs checked."""
    by_conv: dict[str, list[Request]] = {}
    for r in reqs:
        by_conv.setdefault(r.conversation, []).append(r)
    pairs = 0
    for turns in by_conv.values():
        for prev, nxt in pairwise(turns):
            history = np.concatenate([prev.prompt_tokens(), prev.output_tokens(0, 0, prev.output_len)])
            assert nxt.prompt_len > len(history)
            tokens = nxt.prompt_tokens()
            assert np.array_equal(tokens[: len(history)], history)
            # New user text: not a copy of the previous answer's other samples or of the history.
            assert not np.array_equal(tokens[len(history) : len(history) + 4], history[-4:])
            pairs += 1
    return pairs


def test_multiturn_prompt_continues_previous_prompt_and_answer():
    reqs, desc = resolve_workload("multiturn", requests=60, seed=3)
    assert desc["conversations"] >= 15
    assert _assert_conversations_continue(reqs) >= 30
    assert desc["reusable_prompt_fraction"] > 0.3


def test_multiturn_with_system_prompt_and_parallel_samples_continues():
    reqs, _ = resolve_workload("multiturn", requests=40, seed=5, system_prompt_len=32, system_prompts=2, n=2)
    assert all(r.shared_prefix is not None and r.n == 2 for r in reqs)
    assert _assert_conversations_continue(reqs) >= 20
    # Conversations naming the same system prompt start with the same 32 tokens and then differ.
    firsts = {}
    for r in reqs:
        firsts.setdefault(r.shared_prefix.id, []).append(r.prompt_tokens())
    for group in firsts.values():
        for t in group[1:]:
            assert np.array_equal(t[:32], group[0][:32])


def test_declared_reuse_counts_shared_prefix_after_first_user_and_previous_turn():
    sp = SharedPrefix("s", 10)
    reqs = [
        Request("a", 0.0, 20, 5, shared_prefix=sp),
        Request("b", 1.0, 20, 5, shared_prefix=sp),
        Request("t0", 0.0, 30, 8, conversation="c"),
        Request("t1", 2.0, 50, 8, conversation="c"),
    ]
    assert declared_reuse(reqs) == {"a": 0, "t0": 0, "b": 10, "t1": 38}


# ------------------------------------------------------------------------------------------------ record validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_len": -3}, "field 'output_len': must be a positive integer, got -3"),
        ({"prompt_len": 0}, "field 'prompt_len': must be a positive integer, got 0"),
        ({"n": True}, "field 'n': must be a positive integer, got True"),
        ({"arrival": -1.0}, "field 'arrival'"),
        ({"arrival": math.nan}, "field 'arrival'"),
        ({"id": ""}, "field 'id'"),
        ({"prompt": (1, 2)}, "field 'prompt_len': 4 disagrees with the prompt's 2 tokens"),
        ({"prompt": (1, -2, 3, 4)}, "field 'prompt': token 1"),
        ({"shared_prefix": SharedPrefix("s", 5)}, "field 'shared_prefix.len': 5 exceeds the prompt length 4"),
        ({"beam": 0}, "field 'beam': must be a positive integer, got 0"),
        ({"beam": 4, "n": 2}, "field 'beam': beam search (beam=4) takes n=1, got n=2"),
    ],
)
def test_request_validation_names_the_field(kwargs, message):
    base = {"id": "r", "arrival": 0.0, "prompt_len": 4, "output_len": 2}
    with pytest.raises(ValueError, match=re.escape(message)):
        Request(**{**base, **kwargs})


# ------------------------------------------------------------------------------------------------ JSONL format

_requests = st.builds(
    Request,
    id=st.text(alphabet="abcxyz-_0123456789é", min_size=1, max_size=8),
    arrival=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    prompt_len=st.integers(8, 5000),
    output_len=st.integers(1, 5000),
    n=st.integers(1, 8),
    shared_prefix=st.none() | st.builds(SharedPrefix, id=st.sampled_from(["s0", "s1"]), len=st.integers(1, 8)),
    conversation=st.none() | st.sampled_from(["c0", "c1"]),
)
_beam_requests = st.builds(
    Request,
    id=st.text(alphabet="abcxyz", min_size=1, max_size=8),
    arrival=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    prompt_len=st.integers(8, 5000),
    output_len=st.integers(1, 5000),
    beam=st.integers(1, 8),
)


@given(st.lists(_requests | _beam_requests, min_size=1, max_size=12, unique_by=lambda r: r.id))
def test_jsonl_round_trip(tmp_path_factory, reqs):
    path = tmp_path_factory.mktemp("wl") / "w.jsonl"
    save_workload(reqs, path)
    loaded = load_workload(path)
    assert loaded == sorted(reqs, key=lambda r: r.arrival)
    assert [r.arrival for r in loaded] == sorted(r.arrival for r in reqs)


def test_jsonl_round_trip_explicit_prompt_and_prompt_only(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text(
        '{"id": "a", "arrival": 2, "prompt": [5, 6, 7], "output_len": 4}\n\n'
        '{"id": "b", "arrival": 1, "prompt_len": 3, "output_len": 1, "n": 2}\n'
    )
    a_b = load_workload(path)
    assert [r.id for r in a_b] == ["b", "a"]  # sorted by arrival
    assert a_b[1].prompt_len == 3 and a_b[1].prompt_tokens().tolist() == [5, 6, 7]
    save_workload(a_b, tmp_path / "again.jsonl")
    assert load_workload(tmp_path / "again.jsonl") == a_b


_GOOD = {"id": "r1", "arrival": 0.5, "prompt_len": 10, "output_len": 4}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({**_GOOD, "output_len": -3}, "field 'output_len': must be a positive integer, got -3"),
        ({**_GOOD, "output_len": 2.5}, "field 'output_len': must be a positive integer, got 2.5"),
        ({**_GOOD, "prompt_len": "10"}, "field 'prompt_len': must be a positive integer, got '10'"),
        ({k: v for k, v in _GOOD.items() if k != "output_len"}, "field 'output_len': missing"),
        ({k: v for k, v in _GOOD.items() if k != "prompt_len"}, "field 'prompt_len': missing"),
        ({**_GOOD, "arrival": "soon"}, "field 'arrival': must be a finite number"),
        ({**_GOOD, "id": 7}, "field 'id': must be a non-empty string, got 7"),
        ({**_GOOD, "n": 0}, "field 'n': must be a positive integer, got 0"),
        ({**_GOOD, "prompt": [1, 2, 3]}, "field 'prompt_len': 10 disagrees with the prompt's 3 tokens"),
        ({**_GOOD, "prompt": "hello"}, "field 'prompt': must be a list of token ids"),
        ({**_GOOD, "shared_prefix": {"id": "s", "len": 11}}, "field 'shared_prefix.len': 11 exceeds the prompt"),
        ({**_GOOD, "shared_prefix": {"id": "s"}}, "field 'shared_prefix.len': missing"),
        ({**_GOOD, "shared_prefix": "s"}, "field 'shared_prefix': must be an object"),
        ({**_GOOD, "promt_len": 3}, "field 'promt_len': unknown field"),
        ({**_GOOD, "id": "r0"}, "field 'id': duplicate id 'r0' (first on line 1)"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_load_errors_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    first = json.dumps({**_GOOD, "id": "r0"})
    path.write_text(f"{first}\n\n{json.dumps(line)}\n")
    with pytest.raises(ValueError) as e:
        load_workload(path)
    text = str(e.value)
    assert text.startswith(f"{path}:3: ")
    assert message in text
    assert "\n" not in text


def test_load_errors_bad_json_empty_missing_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "arrival": 0, "prompt_len": 3, "output_len": 1}\n{"id": "b",, }\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
        load_workload(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no requests"):
        load_workload(path)
    with pytest.raises(ValueError, match="no such workload file"):
        load_workload(tmp_path / "missing.jsonl")


def test_load_refuses_explicit_prompts_that_disagree_on_a_shared_prefix(tmp_path):
    path = tmp_path / "w.jsonl"
    lines = [
        {"id": "a", "arrival": 0, "prompt": [1, 2, 3, 4], "output_len": 1, "shared_prefix": {"id": "s", "len": 2}},
        {"id": "b", "arrival": 0, "prompt": [1, 2, 9], "output_len": 1, "shared_prefix": {"id": "s", "len": 2}},
        {"id": "c", "arrival": 0, "prompt": [1, 5, 9], "output_len": 1, "shared_prefix": {"id": "s", "len": 2}},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: field 'prompt': its first 2 tokens differ from")):
        load_workload(path)


# ------------------------------------------------------------------------------------------------ generators


@pytest.mark.parametrize("name", ["sharegpt", "alpaca"])
def test_length_means_match_the_papers_after_vllm_filter(name):
    model = LENGTH_MODELS[name]
    reqs = generate(GenParams(lengths=name), 20_000, seed=0)
    prompt = np.array([r.prompt_len for r in reqs])
    output = np.array([r.output_len for r in reqs])
    assert prompt.mean() == pytest.approx(model.target_prompt_mean, rel=0.03)
    assert output.mean() == pytest.approx(model.target_output_mean, rel=0.03)
    assert prompt.min() >= 4 and prompt.max() <= 1024 and (prompt + output).max() <= 2048
    # Heavy tails: the mean is well above the median.
    assert np.median(prompt) < 0.9 * prompt.mean() and np.median(output) < 0.9 * output.mean()
    assert [r.id for r in reqs][:3] == ["r0", "r1", "r2"]


def test_sharegpt_is_longer_than_alpaca_as_in_the_paper():
    share = describe_lengths(generate(GenParams(lengths="sharegpt"), 5000, seed=1))
    alpaca = describe_lengths(generate(GenParams(lengths="alpaca"), 5000, seed=1))
    assert 7 < share["prompt_len"]["mean"] / alpaca["prompt_len"]["mean"] < 10  # paper: ~8.4x
    assert 5 < share["output_len"]["mean"] / alpaca["output_len"]["mean"] < 6.6  # paper: ~5.8x


@pytest.mark.parametrize("name", list(NAMED_WORKLOADS))
def test_named_workloads_are_deterministic_with_the_seed(name):
    a, desc_a = resolve_workload(name, requests=200, seed=11, rate=4.0)
    b, desc_b = resolve_workload(name, requests=200, seed=11, rate=4.0)
    c, _ = resolve_workload(name, requests=200, seed=12, rate=4.0)
    assert a == b and desc_a == desc_b
    assert a != c
    assert len(a) == 200 == desc_a["requests"]
    assert [r.arrival for r in a] == sorted(r.arrival for r in a)
    assert len({r.id for r in a}) == 200
    for key in ("name", "params", "seed", "prompt_len", "output_len"):
        assert key in desc_a
    assert set(desc_a["prompt_len"]) == {"mean", "p50", "p90", "max"}
    json.dumps(desc_a, allow_nan=False)  # goes into the trace metadata as strict JSON


def test_poisson_arrivals_have_the_requested_rate_and_inf_means_all_at_zero():
    reqs = generate(GenParams(lengths="alpaca", rate=8.0), 20_000, seed=2)
    arrivals = np.array([r.arrival for r in reqs])
    assert arrivals[0] == 0.0
    gaps = np.diff(arrivals)
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 8.0, rel=0.05)  # exponential gaps: std == mean
    assert all(r.arrival == 0.0 for r in generate(GenParams(), 50, seed=2))


def test_shared_system_prompt_fraction_and_count():
    reqs = generate(GenParams(system_prompt_len=100, system_prompt_fraction=0.5, system_prompts=3), 4000, seed=4)
    with_prefix = [r for r in reqs if r.shared_prefix is not None]
    assert 0.45 < len(with_prefix) / len(reqs) < 0.55
    assert {r.shared_prefix.id for r in with_prefix} == {"system-0", "system-1", "system-2"}
    assert all(r.prompt_len >= 104 and r.shared_prefix.len == 100 for r in with_prefix)


def test_parallel_sampling_and_max_len_filter():
    reqs, desc = resolve_workload("parallel", requests=500, seed=0, max_len=64)
    assert all(r.n == 4 for r in reqs)
    assert all(r.prompt_len + r.output_len <= 64 for r in reqs)
    assert desc["samples"] == 2000 and desc["params"]["max_len"] == 64


def test_multiturn_turns_arrive_in_order_with_think_time():
    reqs, desc = resolve_workload("multiturn", requests=400, seed=9, rate=2.0, think_time=3.0)
    assert desc["params"]["turns"] == 4
    by_conv: dict[str, list[Request]] = {}
    for r in reqs:
        by_conv.setdefault(r.conversation, []).append(r)
    gaps = []
    for turns in by_conv.values():
        assert len(turns) <= 4
        assert [r.id.split("-t")[1] for r in turns] == [str(k) for k in range(len(turns))]
        gaps += [b.arrival - a.arrival for a, b in pairwise(turns)]
        assert all(r.prompt_len + r.output_len <= 4096 for r in turns)
    assert np.mean(gaps) == pytest.approx(3.0, rel=0.15)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"rate": 0.0}, "rate: must be > 0"),
        ({"n": 0}, "n: must be a positive integer"),
        ({"beam": 0}, "beam: must be a positive integer"),
        ({"beam": 2, "n": 2}, "beam: beam search (width 2) takes n=1"),
        ({"system_prompt_fraction": 1.5}, "system_prompt_fraction"),
        ({"max_len": 3}, "max_len: 3 leaves no room"),
        ({"bogus": 1}, "bogus: unknown workload option"),
    ],
)
def test_bad_generator_options_are_one_line_errors(opts, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_workload("sharegpt", requests=10, **opts)


def test_resolve_file_and_unknown_name(tmp_path):
    path = tmp_path / "w.jsonl"
    save_workload(generate(GenParams(lengths="alpaca"), 30, seed=0), path)
    reqs, desc = resolve_workload(str(path), requests=10)
    assert len(reqs) == 10 and desc["source"] == "file" and desc["requests"] == 10
    short, _ = resolve_workload(path, max_len=40)
    assert short and all(r.prompt_len + r.output_len <= 40 for r in short)
    with pytest.raises(ValueError, match="apply only to named workloads"):
        resolve_workload(path, n=2)
    with pytest.raises(ValueError, match="unknown workload 'shargpt'"):
        resolve_workload("shargpt")


# ------------------------------------------------------------------------------------------------ CLI


def _run_cli(argv: list[str]) -> int:
    from kvscope.commands import workload as command

    parser = argparse.ArgumentParser()
    command.add_parser(parser)
    return command.run(parser.parse_args(argv))


def test_cli_writes_workload_and_prints_distribution(tmp_path, capsys):
    out = tmp_path / "w.jsonl"
    argv = ["shared-prefix", "--requests", "50", "--seed", "7", "--rate", "inf", "--system-prompt-len", "64"]
    assert _run_cli([*argv, "-o", str(out)]) == 0
    reqs = load_workload(out)
    assert len(reqs) == 50 and all(r.shared_prefix == SharedPrefix("system-0", 64) for r in reqs)
    printed = capsys.readouterr().out
    assert f"wrote 50 requests (50 samples) to {out}" in printed
    mean_line = next(line for line in printed.splitlines() if line.startswith("mean"))
    assert float(mean_line.split()[1]) == pytest.approx(describe_lengths(reqs)["prompt_len"]["mean"], abs=0.05)
    assert resolve_workload("shared-prefix", requests=50, seed=7, system_prompt_len=64)[0] == reqs


def test_cli_user_mistake_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="unknown workload"):
        _run_cli(["nope", "-o", str(tmp_path / "w.jsonl")])


# ------------------------------------------------------------------------------------------------ bounds (issue 7)


def _reference_stream_tokens(name: str, start: int, count: int) -> np.ndarray:
    """The one-pass formula stream_tokens computed before it went in chunks: the ids must not change."""
    from kvscope.workload import _GAMMA, _MIX1, _MIX2, stream_seed

    z = np.arange(start + 1, start + count + 1, dtype=np.uint64) * _GAMMA + np.uint64(stream_seed(name))
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z ^= z >> np.uint64(31)
    return (z % np.uint64(VOCAB_SIZE)).astype(np.int32)


@pytest.mark.parametrize("count", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 3, 2 * (1 << 20) + 17])
def test_chunked_stream_tokens_equal_the_one_pass_formula(count):
    got = stream_tokens("req:x", 5, count)
    assert got.dtype == np.int32 and got.shape == (count,)
    assert np.array_equal(got, _reference_stream_tokens("req:x", 5, count))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt_len": 10**9}, "field 'prompt_len': must be at most 16,777,216, got 1000000000"),
        ({"output_len": 1 << 25}, "field 'output_len': must be at most 16,777,216"),
        ({"prompt_len": 10**400}, "got an integer of about 401 digits"),
        ({"n": 1 << 17}, "field 'n': must be at most 65,536"),
        ({"arrival": 1e300}, "field 'arrival': must be a finite number of seconds >= 0 (at most 1e+09), got 1e+300"),
        ({"arrival": 10**400}, "got an integer of about 401 digits"),
    ],
)
def test_request_bounds_are_checked_before_any_token_id_exists(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Request(**{"id": "r", "arrival": 0.0, "prompt_len": 10, "output_len": 5, **kwargs})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON: nested too deeply"),
        ('{"id": "a", "arrival": 0, "prompt_len": ' + "9" * 5000 + "}", "not valid JSON: Exceeds the limit"),
    ],
)
def test_json_failures_beyond_decode_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"id": "ok", "arrival": 0, "prompt_len": 3, "output_len": 1}) + "\n" + text + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: {message}")):
        load_workload(path)


def test_binary_files_and_directories_are_named(tmp_path):
    png = tmp_path / "w.jsonl"
    png.write_bytes(b'{"id": "a", "arrival": 0, "prompt_len": 3, "output_len": 1}\n\x89PNG\r\n')
    with pytest.raises(ValueError, match=re.escape(f"{png}:2: not UTF-8 text")):
        load_workload(png)
    with pytest.raises(ValueError, match="is a directory, not a workload file"):
        load_workload(tmp_path)


def test_save_workload_names_the_file_when_the_disk_is_full():
    reqs = [Request("r", 0.0, 3, 1)]
    with pytest.raises(OSError) as e:
        save_workload(reqs, "/dev/full")
    assert e.value.filename == "/dev/full" and "No space left" in e.value.strerror


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"n": 1 << 20}, "n: must be at most 65,536"),
        ({"system_prompt_len": 10**12}, "system_prompt_len: must be in 0.."),
        ({"think_time": 1e300, "turns": 2}, "think_time: must be a finite number of seconds >= 0 (at most 1e+09)"),
        ({"rate": 1e-300}, "rate: 1e-300 requests/s puts arrivals at"),
        ({"rate": 1e-7, "turns": 2, "think_time": 1e9}, "puts arrivals at"),
    ],
)
def test_generator_bounds(opts, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_workload("sharegpt", requests=30, **opts)


def test_request_count_is_bounded_before_generating():
    for requests in (0, 10**12):
        with pytest.raises(ValueError, match=r"requests: must be an integer in 1\.\.1,000,000"):
            resolve_workload("sharegpt", requests=requests)


def test_cli_refuses_to_rewrite_its_input_and_names_options(tmp_path):
    path = tmp_path / "w.jsonl"
    save_workload(generate(GenParams(lengths="alpaca"), 5, seed=0), path)
    before = path.read_bytes()
    with pytest.raises(Exception, match="is also an input"):
        _run_cli([str(path), "-o", str(path)])
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match=re.escape("--think-time: must be a finite")):
        _run_cli(["multiturn", "--think-time", "-1", "-o", str(tmp_path / "m.jsonl")])


# ----------------------------------------------------------------------------------------- beam search (issue 11)


def test_beam_field_in_the_file_format_and_beam_token_streams(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"id": "r", "arrival": 0, "prompt_len": 19, "output_len": 58, "beam": 4}\n')
    (r,) = load_workload(path)
    assert (r.beam, r.n, r.width) == (4, 1, 4) and r.to_json()["beam"] == 4
    assert "beam" not in Request("s", 0.0, 4, 2).to_json()
    # Beam 0 reads the request's own stream, every other beam its own one (forked beams are numbered on past K).
    assert not np.array_equal(r.beam_tokens(1, 0, 20), r.beam_tokens(9, 0, 20))
    assert np.array_equal(r.beam_tokens(9, 5, 10), r.beam_tokens(9, 0, 20)[5:15])
    with pytest.raises(ValueError, match="not a beam search request"):
        Request("s", 0.0, 4, 2).beam_tokens(1, 0, 1)


def test_cli_beam_workload_with_width(tmp_path, capsys):
    out = tmp_path / "beam.jsonl"
    assert _run_cli(["beam", "--width", "6", "--requests", "20", "-o", str(out)]) == 0
    reqs = load_workload(out)
    assert len(reqs) == 20 and {r.beam for r in reqs} == {6} and {r.n for r in reqs} == {1}
    assert "beams 120" in capsys.readouterr().out
    alpaca = resolve_workload("alpaca", requests=20)[0]  # the beam workload is Alpaca-like, as the paper's
    assert [r.prompt_len for r in reqs] == [r.prompt_len for r in alpaca]
    assert _run_cli(["sharegpt", "--width", "2", "--requests", "5", "-o", str(out)]) == 0
    assert {r.beam for r in load_workload(out)} == {2}
    with pytest.raises(ValueError, match=r"^--width: must be a positive integer, got 0$"):
        _run_cli(["beam", "--width", "0", "-o", str(out)])
