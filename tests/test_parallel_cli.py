"""`kvscope run --tp/--dcp`, and `report` / `summary` over the rank files: what is written, what is shown, and the
mistakes that end in one line (exit 2), as tests/test_bad_inputs.py checks them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvscope import cli

SMALL = ["-w", "sharegpt", "-n", "6", "-q"]


def run_ok(capsys, *argv: str) -> str:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> Path:
    """A TP 2 run's prefix: tmp/tp2 (files tmp/tp2.rank0.kvtrace, tmp/tp2.rank1.kvtrace)."""
    root = tmp_path_factory.mktemp("tp")
    assert cli.main(["run", *SMALL, "--tp", "2", "-o", str(root / "tp2.kvtrace")]) == 0
    return root / "tp2"


def test_run_writes_one_trace_a_rank_and_not_the_name_itself(group: Path):
    assert sorted(p.name for p in group.parent.iterdir()) == ["tp2.rank0.kvtrace", "tp2.rank1.kvtrace"]


def test_run_prints_the_layout_and_the_capacity(tmp_path, capsys):
    out = run_ok(
        capsys, "run", *SMALL, "-m", "starcoder-15b", "--tp", "8", "--dcp", "8", "-o", str(tmp_path / "x.kvtrace")
    )
    assert "TP 8 x DCP 8: 1 of 1 KV heads a rank, duplication 1x" in out
    assert "token slots a rank 838,848, the group holds 6,710,784 tokens" in out  # 8 x 16 GiB // 327,680 B x 16
    assert len(list(tmp_path.glob("x.rank*.kvtrace"))) == 8


def test_summary_json_of_the_prefix_has_every_rank(group: Path, capsys):
    out = run_ok(capsys, "summary", str(group), "--json")
    ranks = json.loads(out)
    assert [s["rank"] for s in ranks] == [0, 1]
    for s in ranks:
        # Llama-3-8B at TP 2: 4 heads a rank, 65,536 B a token: 16 GiB holds 262,144 tokens on every rank
        assert (s["world_size"], s["kv_duplication"]) == (2, 1)
        assert s["capacity_tokens"] == s["capacity_tokens_total"] == 262_144
        assert s["bytes_per_token"] == 65_536


def test_summary_table_names_the_rank_files(group: Path, capsys):
    out = run_ok(capsys, "summary", str(group) + ".kvtrace")
    assert "tp2.rank0.kvtrace" in out and "tp2.rank1.kvtrace" in out


def test_report_of_the_prefix_shows_the_ranks(group: Path, tmp_path, capsys):
    html_path = tmp_path / "r.html"
    run_ok(capsys, "report", str(group), "-o", str(html_path))
    html = html_path.read_text()
    assert "Ranks: TP 2, 2 ranks" in html
    assert "KV memory per rank" in html and 'id="ranks0-stacks"' in html
    assert "tokens of context the group holds" in html and "262,144" in html
    assert 'id="run0-' in html and 'id="run1-' not in html  # rank 1 repeats rank 0's books: not drawn in full
    assert 'id="compare"' not in html  # one run, not two to compare


def test_two_parallel_runs_are_compared_by_their_rank_0(group: Path, tmp_path, capsys):
    assert cli.main(["run", *SMALL, "--tp", "8", "-o", str(tmp_path / "tp8.kvtrace")]) == 0
    capsys.readouterr()
    run_ok(capsys, "report", str(group), str(tmp_path / "tp8"), "-o", str(tmp_path / "r.html"))
    html = (tmp_path / "r.html").read_text()
    assert "Ranks: TP 2, 2 ranks" in html and "Ranks: TP 8, 8 ranks" in html and 'id="compare"' in html


def one_line_error(capsys, argv: list[str], needle: str) -> None:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert "Traceback" not in captured.err, captured.err
    assert rc == 2, (rc, captured.err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"kvscope {argv[0]}: error: "), lines[0]
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--tp", "0"], "--tp: must be an integer in 1..1,024, got 0"),
        (["--dcp", "0"], "--dcp: must be an integer in 1..1,024, got 0"),
        (["--tp", "3"], "--tp 3: llama-3-8b's 8 KV heads neither split evenly over 3 ranks"),
        (["--tp", "64"], "--tp 64: llama-3-8b's 32 query heads do not split over 64 ranks"),
        (["--dcp", "2"], "--dcp 2: at --tp 2 each of llama-3-8b's 8 KV heads is held by 1 rank(s)"),
        (["--tp", "4", "--dcp", "3"], "--dcp 3: must divide --tp 4"),
        (["--tp", "2", "-d", "cpu"], "--tp/--dcp run on --device sim (got --device cpu)"),
        (["-m", "starcoder-15b", "--dcp", "2", "--prefix-caching"], "--prefix-caching with --dcp: not supported"),
    ],
)
def test_bad_parallel_options_are_one_line(flags, needle, tmp_path, capsys):
    one_line_error(capsys, ["run", *SMALL, *flags, "-o", str(tmp_path / "x.kvtrace")], needle)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_mismatched_rank_files_are_one_line(group: Path, tmp_path, capsys):
    other = tmp_path / "again"
    assert cli.main(["run", *SMALL, "--tp", "2", "-o", str(other) + ".kvtrace"]) == 0
    capsys.readouterr()
    out = str(tmp_path / "r.html")
    one_line_error(capsys, ["report", f"{group}.rank0.kvtrace", f"{other}.rank1.kvtrace", "-o", out],
                   "again.rank1 is not a rank of the same run as tp2.rank0")  # fmt: skip
    one_line_error(capsys, ["report", f"{group}.rank0.kvtrace", f"{group}.rank0.kvtrace", "-o", out], "given twice")
    one_line_error(capsys, ["report", f"{other}.rank1.kvtrace", "-o", out], "run of 2 ranks, rank(s) 0 not given")
    Path(f"{other}.rank1.kvtrace").unlink()
    one_line_error(capsys, ["summary", str(other)], "rank files missing")
