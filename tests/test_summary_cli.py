"""`kvscope summary TRACE [--json]` through kvscope.cli.main: the table, the JSON object, and user mistakes."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_analysis_tracegen import make_requests, record, write_trace_file

from kvscope import cli
from kvscope.analysis.summary import summarize
from kvscope.trace import load_trace


@pytest.fixture(autouse=True)
def only_our_commands(monkeypatch):
    # The CLI imports every command module; test ours without depending on the others being present.
    monkeypatch.setattr(cli, "COMMANDS", {"summary": cli.COMMANDS["summary"], "export": cli.COMMANDS["export"]})


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "paged.kvtrace"
    record("paged", make_requests(10, seed=4, n_max=2), path=path, prefix_caching=True)
    return path


def test_json_is_one_object_with_the_summary(trace_file, capsys):
    assert cli.main(["summary", str(trace_file), "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert isinstance(data, dict)
    expected = summarize(load_trace(trace_file))
    assert data == json.loads(json.dumps(expected))
    assert data["allocator"] == "paged" and data["finished"] == 10


def test_json_for_several_traces_is_a_list(trace_file, capsys):
    assert cli.main(["summary", str(trace_file), str(trace_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, list) and len(data) == 2 and data[0] == data[1]


def test_table_for_people(trace_file, capsys):
    assert cli.main(["summary", str(trace_file)]) == 0
    out = capsys.readouterr().out
    s = summarize(load_trace(trace_file))
    for label in ("peak used", "peak reserved", "mean waste / reserved", "generated tokens", "preemptions"):
        assert label in out
    assert f"{s['generated_tokens']:,}" in out
    assert "paged b16" in out


def test_missing_file_is_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.kvtrace"
    assert cli.main(["summary", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.kvtrace" in err[0] and "no such file" in err[0]


def test_not_a_trace_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.kvtrace"
    bad.write_text("hello")
    assert cli.main(["summary", str(bad), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "bad.kvtrace" in lines[0] and "Traceback" not in captured.err


def test_cut_off_trace_warns_in_one_line_and_still_summarizes(trace_file, tmp_path, capsys):
    small_batches = tmp_path / "batches.kvtrace"
    write_trace_file(load_trace(trace_file), small_batches, flush_events=64)
    data = small_batches.read_bytes()
    cut = tmp_path / "cut.kvtrace"
    cut.write_bytes(data[: len(data) // 2])
    assert cli.main(["summary", str(cut), "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["truncated"] is True
    assert 0 < summary["events"] < len(load_trace(trace_file).events)
    assert summary["steps"] > 0
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "cut off" in warnings[0] and "warning" in warnings[0]


def test_markup_in_file_names_and_metadata_is_printed_literally(trace_file, tmp_path, capsys):
    """Rich reads markup in plain strings: '[/]' used to crash the table (MarkupError), '[bold]' was applied."""
    trace = load_trace(trace_file)
    meta = {**trace.meta, "model": "[/]", "device_name": "[bold]gpu[/bold]"}
    marked = tmp_path / "[bold]x.kvtrace"
    write_trace_file(dataclasses.replace(trace, meta=meta), marked)
    assert cli.main(["summary", str(marked), str(trace_file)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    out = " ".join(captured.out.split())  # the table may wrap a long cell
    assert "[bold]x.kvtrace" in out and "[/]" in out and "[bold]gpu[/bold]" in out


def test_table_rows_are_the_presentation_layers(trace_file, capsys):
    from kvscope.present import rows

    assert cli.main(["summary", str(trace_file)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table may wrap a long cell
    s = summarize(load_trace(trace_file))
    for row in rows.SUMMARY_ROWS:
        if row is not None:
            assert rows.format_value(s, row.key, row.how) in out, row.label
    for label in ("retained after the last step", "peaks taken", "VMM driver calls", "cut off", "prompt misses: cold"):
        assert label in out
    for label in ("CPU-tier hit tokens", "ranks (TP / DCP)"):  # features this run did not use: no row
        assert label not in out


def test_the_rows_keep_the_cli_start_light():
    """The CLI imports the presentation layer's rows when it starts: they must not pull the views or plotting (the
    GPU path, `kvscope run --device cuda`, never imports plotly or streamlit)."""
    import subprocess
    import sys

    code = (
        "import sys, kvscope.cli; kvscope.cli.build_parser(); "
        "print(sorted(m for m in ('plotly', 'streamlit', 'kvscope.present.views') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
