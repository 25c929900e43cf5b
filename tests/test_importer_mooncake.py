"""Mooncake's traces: read and checked (real data, damaged and foreign input), converted into a kvscope workload
whose requests share prompt tokens exactly where their hash ids agree, and `kvscope workload import mooncake`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvscope.alloc.paged import PagedAllocator
from kvscope.cli import main
from kvscope.importers.mooncake import load_mooncake, to_requests
from kvscope.spec import get_spec
from kvscope.workload import load_workload

DATA = Path(__file__).parent / "data" / "mooncake"
CONVERSATION = DATA / "conversation_head2000.jsonl"
SYNTHETIC = DATA / "synthetic_head300.jsonl"
GOOD = {"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]}


def test_real_traces_load_with_their_counts():
    for path in (CONVERSATION, SYNTHETIC):
        raw = [json.loads(line) for line in path.read_text().splitlines()]
        trace = load_mooncake(path)
        assert len(trace) == len(raw)
        assert trace.input_length.tolist() == [r["input_length"] for r in raw]
        assert trace.hash_ids.tolist() == [h for r in raw for h in r["hash_ids"]]
        fill = trace.block_fill()
        assert int(fill.sum()) == sum(r["input_length"] for r in raw)  # the partial last blocks included
        assert fill.max() == 512 and fill.min() >= 1


def test_requests_share_tokens_exactly_where_their_ids_agree():
    trace = load_mooncake(CONVERSATION)
    requests = to_requests(trace)
    # Find pairs of requests with a common id prefix and a divergence after it.
    by_first: dict[int, list[int]] = {}
    for i in range(len(trace)):
        by_first.setdefault(int(trace.ids(i)[0]), []).append(i)
    checked = 0
    for group in by_first.values():
        for a, b in zip(group, group[1:], strict=False):
            ia, ib = trace.ids(a), trace.ids(b)
            common = 0
            while common < min(len(ia), len(ib)) and ia[common] == ib[common]:
                common += 1
            ta, tb = requests[a].prompt_tokens(), requests[b].prompt_tokens()
            n = min(common * 512, len(ta), len(tb))
            assert np.array_equal(ta[:n], tb[:n])
            if common < min(len(ia), len(ib)):  # the next block differs in content (all 512 or the partial fill)
                m = min(len(ta), len(tb), (common + 1) * 512)
                assert np.mean(ta[common * 512 : m] == tb[common * 512 : m]) < 0.01
            checked += 1
    assert checked > 50


def test_the_paged_allocator_shares_what_the_ids_share():
    """Two prompts with the same first two ids: with prefix caching at 16-token blocks the second is served
    2 x 512 tokens from the cache (exactly the shared ids), not more, not less."""
    lines = [
        {"timestamp": 0, "input_length": 1300, "output_length": 2, "hash_ids": [7, 8, 9]},
        {"timestamp": 5, "input_length": 1500, "output_length": 2, "hash_ids": [7, 8, 10]},
    ]
    from kvscope.importers.mooncake import MooncakeTrace

    trace = MooncakeTrace(
        path=Path("inline.jsonl"),
        timestamp_ms=np.array([0.0, 5.0]),
        input_length=np.array([1300, 1500]),
        output_length=np.array([2, 2]),
        offsets=np.array([0, 3, 6]),
        hash_ids=np.array([h for r in lines for h in r["hash_ids"]]),
    )
    a, b = to_requests(trace)
    spec = get_spec("tiny")
    alloc = PagedAllocator(spec, 400 * 16 * spec.bytes_per_token, block_size=16, enable_prefix_caching=True)
    alloc.append(0, a.prompt_tokens()[alloc.admit(0, a.prompt_tokens(), 1301) :])
    alloc.free(0)
    assert alloc.admit(1, b.prompt_tokens(), 1501) == 1024


def write(tmp_path: Path, lines: list, name: str = "t.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({**GOOD, "timestamp": -1}, "field 'timestamp': must be milliseconds >= 0"),
        ({**GOOD, "timestamp": "soon"}, "field 'timestamp'"),
        ({k: v for k, v in GOOD.items() if k != "hash_ids"}, "field 'hash_ids': missing"),
        ({**GOOD, "input_length": 0}, "field 'input_length': must be an integer >= 1"),
        ({**GOOD, "output_length": 1.5}, "field 'output_length'"),
        ({**GOOD, "hash_ids": []}, "field 'hash_ids': must be a non-empty list"),
        ({**GOOD, "hash_ids": [0, "x", 2]}, "field 'hash_ids': id 1 must be an integer"),
        ({**GOOD, "hash_ids": [0, 1]}, "2 ids, but input_length 1100 in blocks of 512 needs 3"),
        ({**GOOD, "hash_ids": [0, 1, 0]}, "an id repeats within one prompt"),
        ({**GOOD, "input_length": 10**9, "hash_ids": [0]}, "more than the"),
    ],
)
def test_bad_lines_are_one_line_errors_naming_file_line_and_field(tmp_path, line, message):
    path = write(tmp_path, [GOOD, line])
    with pytest.raises(ValueError) as e:
        load_mooncake(path)
    text = str(e.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text


def test_ids_that_are_not_prefix_chains_are_refused(tmp_path):
    other = {**GOOD, "hash_ids": [5, 1, 6]}  # id 1 after 5 here, after 0 on line 1
    with pytest.raises(ValueError, match=r":2: field 'hash_ids': id 1 follows id 5 here but id 0 on line 1"):
        load_mooncake(write(tmp_path, [GOOD, other]))


def test_foreign_and_empty_files(tmp_path):
    kvscope_workload = write(tmp_path, [{"id": "r0", "arrival": 0, "prompt_len": 5, "output_len": 2}])
    with pytest.raises(ValueError, match="field 'timestamp': missing"):
        load_mooncake(kvscope_workload)
    with pytest.raises(ValueError, match="no requests"):
        load_mooncake(write(tmp_path, [], "empty.jsonl"))
    with pytest.raises(ValueError, match="no such Mooncake trace"):
        load_mooncake(tmp_path / "missing.jsonl")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_mooncake(binary)


def test_import_command_writes_a_workload_and_never_its_input(tmp_path, capsys):
    out = tmp_path / "w.jsonl"
    assert main(["workload", "import", "mooncake", str(SYNTHETIC), "-o", str(out)]) == 0
    assert "wrote 300 requests" in capsys.readouterr().out
    requests = load_workload(out)
    trace = load_mooncake(SYNTHETIC)
    assert [r.prompt_len for r in requests] == trace.input_length.tolist()
    assert [r.arrival for r in requests] == (trace.timestamp_ms / 1000).tolist()
    assert requests[0].prompt_blocks is not None and list(requests[0].prompt_blocks.ids) == trace.ids(0).tolist()

    copy = tmp_path / "trace.jsonl"
    copy.write_bytes(SYNTHETIC.read_bytes())
    before = copy.read_bytes()
    for argv, message in (
        (["workload", "import", "mooncake", str(copy), "-o", str(copy)], "refusing to overwrite it"),
        (["workload", "import", "vllm", str(copy), "-o", str(out)], "unknown format 'vllm'"),
        (["workload", "import", "mooncake", "-o", str(out)], "give a format and a file"),
        (["workload", "import", "mooncake", str(copy), "-o", str(out), "--rate", "2"], "--rate: applies to generated"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert copy.read_bytes() == before


def test_prompt_blocks_field_round_trips_and_is_checked():
    from kvscope.workload import PromptBlocks, Request, declared_reuse

    a = Request("a", 0.0, 1100, 3, prompt_blocks=PromptBlocks(512, (0, 1, 2)))
    assert Request.from_json(json.loads(json.dumps(a.to_json()))) == a
    b = Request("b", 1.0, 600, 3, prompt_blocks=PromptBlocks(512, (0, 5)))
    assert declared_reuse([a, b]) == {"a": 0, "b": 512}
    for bad, message in (
        ({"prompt": [1, 2], "prompt_len": 2}, "cannot be combined with 'prompt'"),
        ({"prompt_blocks": {"size": 512, "ids": [0, 1]}}, "2 ids, but prompt_len 1100"),
        ({"prompt_blocks": {"size": 512, "ids": [0, 1, 2], "x": 1}}, "prompt_blocks.x': unknown field"),
    ):
        d = {**a.to_json(), **bad}
        with pytest.raises(ValueError, match=message):
            Request.from_json(d)
