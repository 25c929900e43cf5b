"""`kvscope import vllm-events` on the streams vLLM 0.33's own block pool published (tests/data/vllm-kv-events, see
its README): the hashes come back exact, the summary's figures match what the data README says and what this test
computes on its own from the JSON form, both forms give the same trace, and damaged or foreign files are one line
naming the file and the message, with no output left behind."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest

from kvscope import cli
from kvscope.analysis import cache
from kvscope.analysis.summary import summarize
from kvscope.events import Kind
from kvscope.importers import codec, msgpack_frames
from kvscope.importers.vllm_events import EventFormatError, read_messages
from kvscope.importers.vllm_file import import_vllm_events
from kvscope.present.views import split
from kvscope.trace import TruncatedTraceWarning, load_trace


def _data_dir() -> Path:
    if "KVSCOPE_DATA" in os.environ:
        return Path(os.environ["KVSCOPE_DATA"]) / "vllm-kv-events"
    return Path(__file__).resolve().parent / "data" / "vllm-kv-events"


DATA = _data_dir()
# stream -> (blocks stored, BlockStored events, blocks removed), from the data README
README = {"shared-prefix": (232, 121, 141), "duplicate-hash": (12, 5, 0)}


@pytest.fixture(autouse=True)
def only_our_commands(monkeypatch):
    keep = ("import", "summary")
    monkeypatch.setattr(cli, "COMMANDS", {k: v for k, v in cli.COMMANDS.items() if k in keep})


def batches(name: str) -> list[list]:
    """The JSON form, read with the standard library (not kvscope's decoder)."""
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def imported(tmp_path: Path, name: str, form: str = "msgpack", **kw):
    out = tmp_path / f"{name}-{form}.kvtrace"
    import_vllm_events(DATA / f"{name}.{form}", out, **kw)
    return load_trace(out)


def rows(trace, kind: Kind):
    ev = trace.events
    return ev[ev["kind"] == kind.name.lower()]


@pytest.mark.parametrize("name", sorted(README))
def test_every_hash_comes_back_exact(tmp_path, name):
    trace = imported(tmp_path, name)
    # Node ids follow first sight of each (group, hash), parents included: rebuild that order from the JSON.
    first_seen: dict[tuple, int] = {}
    stored_hashes, removed_hashes, parents = [], [], []
    for _ts, events, *_ in batches(name):
        for e in events:
            if e["type"] == "BlockStored":
                if e["parent_block_hash"] is not None:
                    first_seen.setdefault((e["group_idx"], e["parent_block_hash"]), len(first_seen))
                for h in e["block_hashes"]:
                    first_seen.setdefault((e["group_idx"], h), len(first_seen))
                stored_hashes += e["block_hashes"]
                parents.append(e["parent_block_hash"])
            elif e["type"] == "BlockRemoved":
                for h in e["block_hashes"]:
                    first_seen.setdefault((e["group_idx"], h), len(first_seen))
                removed_hashes += e["block_hashes"]
    decl = rows(trace, Kind.KV_HASH)
    assert (decl["n"] == 0).all()  # integer hashes: one row each
    declared = decl["aux"].to_numpy(np.int64).view(np.uint64)
    assert [int(h) for h in declared] == [h for _g, h in first_seen]  # exact, all 64 bits
    assert max(h for _g, h in first_seen) >= 1 << 63  # the data does use the top bit
    node_hash = dict(zip(decl["block"].tolist(), [int(h) for h in declared], strict=True))
    assert [node_hash[b] for b in rows(trace, Kind.KV_STORED)["block"]] == stored_hashes
    assert [node_hash[b] for b in rows(trace, Kind.KV_REMOVED)["block"]] == removed_hashes
    store_parent = [None if p < 0 else node_hash[p] for p in rows(trace, Kind.KV_STORE)["aux"]]
    assert store_parent == parents
    tree = cache.cache_tree(trace)
    assert tree["hash"].dtype == np.uint64
    assert [int(h) for h in tree["hash"]] == [h for _g, h in first_seen]
    assert all(codec.i64_to_u64(codec.u64_to_i64(h)) == h for h in stored_hashes)


def independent_figures(name: str) -> dict[str, int]:
    """The summary's KV figures, computed here from the JSON form by their definitions."""
    cached = peak = stored = removed = events = restored = 0
    cleared = store_events = 0
    gone: set[tuple] = set()
    for _ts, evs, *_ in batches(name):
        for e in evs:
            events += 1
            if e["type"] == "BlockStored":
                store_events += 1
                for h in e["block_hashes"]:
                    restored += (e["medium"], e["group_idx"], h) in gone
                stored += len(e["block_hashes"])
                cached += len(e["block_hashes"])
            elif e["type"] == "BlockRemoved":
                removed += len(e["block_hashes"])
                cached -= len(e["block_hashes"])
                gone.update((e["medium"], e["group_idx"], h) for h in e["block_hashes"])
            else:
                cleared += 1
                cached = 0
            peak = max(peak, cached)  # after every event
    return {
        "kv_events": events,
        "store_events": store_events,
        "blocks_stored": stored,
        "blocks_removed": removed,
        "cleared": cleared,
        "cached_blocks_peak": peak,
        "restored_after_eviction": restored,
    }


@pytest.mark.parametrize("name", sorted(README))
def test_summary_matches_the_readme_and_an_independent_count(tmp_path, name, capsys):
    out = tmp_path / f"{name}.kvtrace"
    assert cli.main(["import", "vllm-events", str(DATA / f"{name}.msgpack"), "-o", str(out)]) == 0
    assert cli.main(["summary", "--json", str(out)]) == 0
    s = json.loads(capsys.readouterr().out.split("\n", 1)[1])  # after the import's own line
    stored, store_events, removed = README[name]
    assert s["source"] == "vllm-kv-events"
    assert (s["blocks_stored"], s["store_events"], s["blocks_removed"]) == (stored, store_events, removed)
    expected = independent_figures(name)
    assert {k: s[k] for k in expected} == expected
    assert s["messages"] == len(batches(name))
    assert s["cached_blocks_end"] == 0  # both streams end with AllBlocksCleared
    # engine figures are left out, not zero
    assert "peak_used_bytes" not in s and "generated_tokens" not in s


def test_duplicate_hash_counts_two_blocks_under_one_hash(tmp_path):
    trace = imported(tmp_path, "duplicate-hash")
    tree = cache.cache_tree(trace)
    s = summarize(trace)
    assert s["distinct_hashes"] < s["blocks_stored"]  # the second copy of the prompt's last block
    assert (tree["stores"] == 2).sum() == s["blocks_stored"] - s["distinct_hashes"]
    assert s["cached_blocks_peak"] == 12  # no removal before the clear: every stored block is cached at once


def test_the_tree_follows_the_hash_chain(tmp_path):
    trace = imported(tmp_path, "shared-prefix")
    tree = cache.cache_tree(trace).set_index("node")
    for _ts, evs, *_ in batches("shared-prefix"):
        for e in evs:
            if e["type"] == "BlockStored" and e["parent_block_hash"] is None:
                root = tree[tree["hash"] == np.uint64(e["block_hashes"][0])].iloc[0]
                assert root["parent"] == -1 and root["depth"] == 1 and root["tokens"] == e["block_size"]
    stored = tree[tree["stored"]]
    parents = stored[stored["parent"] >= 0]
    assert (parents["depth"].to_numpy() == tree.loc[parents["parent"], "depth"].to_numpy() + 1).all()
    assert (stored["tokens"] == stored["depth"] * 16).all()  # full 16-token blocks, chains rooted in the stream


def test_msgpack_and_jsonl_give_the_same_trace(tmp_path):
    a = imported(tmp_path, "shared-prefix", "msgpack").events
    b = imported(tmp_path, "shared-prefix", "jsonl").events
    assert len(a) == len(b)
    assert a.astype({"kind": str}).equals(b.astype({"kind": str}))


def test_token_ids_kept_on_request(tmp_path):
    trace = imported(tmp_path, "duplicate-hash", keep_tokens=True)
    tokens = rows(trace, Kind.KV_TOKEN)["aux"].tolist()
    expected = [
        t for _ts, evs, *_ in batches("duplicate-hash") for e in evs if "token_ids" in e for t in e["token_ids"]
    ]
    assert tokens == expected
    assert not len(rows(imported(tmp_path, "duplicate-hash"), Kind.KV_TOKEN))


def test_step_is_the_message_number_and_time_vllms_ts(tmp_path):
    trace = imported(tmp_path, "shared-prefix")
    b = rows(trace, Kind.KV_BATCH)
    ts = [row[0] for row in batches("shared-prefix")]
    assert b["step"].tolist() == list(range(len(ts)))
    assert np.allclose(b["t_ns"].to_numpy() / 1e9, np.array(ts) - ts[0])
    assert trace.meta["kv_events"]["ts_origin_s"] == ts[0]
    assert not trace.truncated


def test_views_of_an_imported_stream(tmp_path):
    trace = imported(tmp_path, "shared-prefix")
    shown, absent = split(trace)
    assert [v.key for v in shown] == ["kv_cached", "kv_rates", "kv_tree", "kv_restored", "kv_lifetimes"]
    assert {"memory", "blocks", "requests"} <= {v.key for v in absent}
    for view in shown:
        fig = view.figure(trace)
        assert fig.data, view.key  # every view draws something on this stream
    cached = cache.cached_blocks(trace)
    assert cached["total"].max() == summarize(trace)["cached_blocks_peak"]
    lt = cache.block_lifetimes(trace)
    assert len(lt) == summarize(trace)["blocks_stored"] and (lt["lifetime_s"] >= 0).all()
    assert (lt["end"] == "removed").sum() == summarize(trace)["blocks_removed"]
    rates = cache.cache_rates(trace)
    assert rates["stored"].sum() == 232 and rates["removed"].sum() == 141


# ---- other encodings ----------------------------------------------------------------------------------------------
def test_array_like_events_and_map_batches_decode_alike(tmp_path):
    mapped = batches("duplicate-hash")
    order = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")
    old = []
    for ts, evs, _rank in mapped:
        arr = [[e["type"], *(e[f] for f in order)] if e["type"] == "BlockStored" else [e["type"]] for e in evs]
        old.append({"ts": ts, "events": arr})  # map-form batch, tag-first array events
    path = tmp_path / "old.msgpack"
    path.write_bytes(b"".join(msgspec.msgpack.encode(b) for b in old))  # payloads one after another
    a = [m.batch for m in read_messages(path)]
    b = [m.batch for m in read_messages(DATA / "duplicate-hash.msgpack")]
    assert [x.ts for x in a] == [x.ts for x in b]
    for x, y in zip(a, b, strict=True):
        for ex, ey in zip(x.events, y.events, strict=True):
            assert type(ex) is type(ey)
            if hasattr(ex, "block_hashes"):
                assert ex.block_hashes == ey.block_hashes and ex.token_ids == ey.token_ids


def test_bytes_hashes_round_trip(tmp_path):
    digests = [bytes(range(i, i + 32)) for i in range(3)]
    payload = [
        [1.5, [{"type": "BlockStored", "block_hashes": digests[:2], "parent_block_hash": None, "token_ids": [1, 2],
                "block_size": 1, "lora_id": None, "medium": "CPU"}]],
        [2.0, [{"type": "BlockRemoved", "block_hashes": [digests[1]], "medium": "CPU"}]],
        [2.5, [{"type": "BlockStored", "block_hashes": [digests[2]], "parent_block_hash": digests[0],
                "token_ids": [3], "block_size": 1, "lora_id": 7, "medium": "CPU"}]],
    ]  # fmt: skip
    src = tmp_path / "bytes.msgpack"
    src.write_bytes(msgspec.msgpack.encode(payload))
    out = tmp_path / "bytes.kvtrace"
    import_vllm_events(src, out)
    trace = load_trace(out)
    tree = cache.cache_tree(trace)
    assert tree["hash_hex"].tolist() == [d.hex() for d in digests]
    assert [int(h) for h in tree["hash"]] == [int.from_bytes(d[-8:], "big") for d in digests]
    assert tree["parent"].tolist() == [-1, 0, 0]
    s = summarize(trace)
    assert (s["blocks_stored"], s["blocks_removed"], s["mediums"], s["cached_blocks_peak"]) == (3, 1, "CPU", 2)


def test_frame_spans_match_the_encoder():
    rng = np.random.default_rng(3)
    values = [
        None, True, -1, 127, 128, -33, 2**16, 2**32, 2**64 - 1, -(2**63), 1.5, "", "x" * 40, "y" * 300,
        b"z" * 70000, [], [1, [2, [3, {}]]], {"a": [1.0, None], "b": {"c": b""}}, list(range(20)),
    ]  # fmt: skip
    values += [{str(i): list(rng.integers(0, 2**63, 5).tolist())} for i in range(20)]
    chunks = [msgspec.msgpack.encode(v) for v in values]
    data = b"".join(chunks)
    spans = msgpack_frames._spans(data, 0, None)
    assert [data[a:b] for a, b in spans] == chunks


# ---- damaged and foreign input ------------------------------------------------------------------------------------
def one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_truncated_msgpack_names_the_message_and_writes_nothing(tmp_path, capsys):
    data = (DATA / "shared-prefix.msgpack").read_bytes()
    src = tmp_path / "cut.msgpack"
    src.write_bytes(data[: len(data) // 2])
    out = tmp_path / "cut.kvtrace"
    err = one_line_error(capsys, ["import", "vllm-events", str(src), "-o", str(out)])
    spans = msgpack_frames.payload_spans(data)
    cut_at = next(i for i, (_a, b) in enumerate(spans) if b > len(data) // 2)
    assert f"{src}: message {cut_at}: cut off" in err
    assert not out.exists()
    # --salvage keeps the complete messages before it, and says so
    assert cli.main(["import", "vllm-events", str(src), "-o", str(out), "--salvage"]) == 0
    assert f"kept the {cut_at} messages before it" in capsys.readouterr().err
    trace = load_trace(out)
    assert summarize(trace)["messages"] == cut_at
    assert "salvaged" in trace.meta["kv_events"]


def test_wrong_types_name_message_event_and_field(tmp_path, capsys):
    lines = (DATA / "shared-prefix.jsonl").read_text().splitlines()
    bad = json.loads(lines[3])
    bad[1][0]["block_hashes"][0] = "abc"
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join([*lines[:3], json.dumps(bad), *lines[4:]]) + "\n")
    err = one_line_error(capsys, ["import", "vllm-events", str(src), "-o", str(tmp_path / "o.kvtrace")])
    assert f"{src}:4: message 3, event 0.block_hashes[0]: expected a block hash" in err
    assert not (tmp_path / "o.kvtrace").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ([[1.0, [{"type": "BlockMoved", "block_hashes": [1]}]]], "event 0: unknown event type 'BlockMoved'"),
        ([[1.0, [{"type": "BlockRemoved", "block_hashes": [-5]}]]], "-5 is not an unsigned 64-bit block hash"),
        ([[1.0, [{"type": "BlockRemoved", "block_hashes": [2**64]}]]], "is not an unsigned 64-bit block hash"),
        ([[1.0, [{"type": "BlockStored", "block_hashes": [1]}]]], "BlockStored lacks parent_block_hash"),
        ([["now", []]], "message 0.ts: expected a finite number of seconds, got str"),
        ([[1.0, {"type": "AllBlocksCleared"}]], "message 0.events: expected an array of events, got map"),
        ([[1.0, [], 0], [2.0, [7]]], "message 1, event 0: expected an event"),
        ([{"id": "r1", "prompt": "hi"}], "not a vLLM KVEventBatch (a map needs 'ts' and 'events'"),
    ],
)
def test_bad_events_are_one_line(tmp_path, capsys, content, expected):
    # msgpack cannot even carry 2**64: that case is JSON only
    for form in ("jsonl", "msgpack") if str(2**64) not in json.dumps(content) else ("jsonl",):
        src = tmp_path / f"bad.{form}"
        if form == "jsonl":
            src.write_text("\n".join(json.dumps(c) for c in content) + "\n")
        else:
            src.write_bytes(msgspec.msgpack.encode(content))
        err = one_line_error(capsys, ["import", "vllm-events", str(src), "-o", str(tmp_path / "o.kvtrace")])
        assert expected in err and str(src) in err, err


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50)), "message 0: not a vLLM KVEventBatch"),
        (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(50)), "not vLLM KV events"),
        (lambda p: p.write_text('{"id": "a", "prompt_len": 5}\n'), "not a vLLM KVEventBatch"),
        (lambda p: p.write_text("[1.0, [], 0]\n{not json\n"), ":2: message 1: not JSON"),
        (lambda p: p.write_bytes(b"\x92" + msgspec.msgpack.encode([1.0, []]) + b"\xc1"), "message 1: byte"),
        (lambda p: p.write_bytes(msgspec.msgpack.encode([[1.0, []]]) + b"\x00\x00"), "2 bytes after the array"),
    ],
)
def test_foreign_files_are_one_line(tmp_path, capsys, make, expected):
    src = tmp_path / "input.bin"
    make(src)
    err = one_line_error(capsys, ["import", "vllm-events", str(src), "-o", str(tmp_path / "o.kvtrace")])
    assert expected in err, err


def test_a_kvscope_trace_is_not_vllm_events(tmp_path, capsys):
    trace = tmp_path / "t.kvtrace"
    import_vllm_events(DATA / "duplicate-hash.msgpack", trace)
    err = one_line_error(capsys, ["import", "vllm-events", str(trace), "-o", str(tmp_path / "o.kvtrace")])
    assert "not vLLM KV events" in err


def test_never_writes_over_its_input_or_a_missing_file(tmp_path, capsys):
    src = tmp_path / "in.msgpack"
    src.write_bytes((DATA / "duplicate-hash.msgpack").read_bytes())
    before = src.read_bytes()
    err = one_line_error(capsys, ["import", "vllm-events", str(src), "-o", str(src)])
    assert "refusing to overwrite" in err and src.read_bytes() == before
    err = one_line_error(capsys, ["import", "vllm-events", str(tmp_path / "nope.msgpack")])
    assert "no such file" in err
    assert one_line_error(capsys, ["import", "sglang-events", str(src)])


def test_a_failure_while_writing_keeps_the_messages_before_it(tmp_path, monkeypatch):
    from kvscope.importers import kv_trace

    calls = Counter()
    real = kv_trace.KVTraceWriter.write

    def failing(self, batch, seq, where, **kw):
        calls["n"] += 1
        if seq == 40:
            raise EventFormatError(f"{where}: injected")
        return real(self, batch, seq, where, **kw)

    monkeypatch.setattr(kv_trace.KVTraceWriter, "write", failing)
    out = tmp_path / "partial.kvtrace"
    with pytest.raises(EventFormatError, match="message 40: injected"):
        import_vllm_events(DATA / "shared-prefix.msgpack", out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = load_trace(out)
    assert any(issubclass(w.category, TruncatedTraceWarning) for w in caught)
    assert summarize(trace)["messages"] == 40  # whole messages only


def test_an_imported_stream_compares_with_an_own_run_and_is_left_out_of_the_verdicts_it_cannot_join(tmp_path):
    """A report of a vLLM stream beside a kvscope run: the stream has no KV budget, waste or clock, so the verdict
    compares nothing for it and says so (it once raised KeyError / NaN-to-int)."""
    from kvscope.analysis.compare import comparison_verdict, setup_differences
    from kvscope.engine import RunConfig, record_run
    from kvscope.workload_gen import resolve_workload

    stream = imported(tmp_path, "shared-prefix")
    requests, desc = resolve_workload("sharegpt", requests=10, seed=0)
    own = record_run(requests, RunConfig(), workload=desc).trace()
    verdict = comparison_verdict([stream, own])
    assert verdict.memory == "" and verdict.throughput == ""
    assert any("left out of the memory verdict" in w and "vLLM" in w for w in verdict.warnings)
    assert any("different KV budgets" in w for w in setup_differences([stream, own]))
