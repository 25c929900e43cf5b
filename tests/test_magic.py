"""%kvscope / %%kvscope in a real IPython shell: the line commands, bad options (usage, no traceback, no
SystemExit), and the cell magic recording allocators built or driven in the cell."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

pytest.importorskip("IPython")
from IPython.utils.capture import capture_output  # noqa: E402
from sim_runs import record  # noqa: E402

from kvscope.commands import run as run_cmd  # noqa: E402
from kvscope.magic import MagicResult, build_parser  # noqa: E402

PLOTLY_MIME = "application/vnd.plotly.v1+json"


@pytest.fixture(scope="session")
def traces(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("magic-traces")
    return {
        "paged": record(d / "paged.kvtrace", "-w", "parallel", "-n", "16", "-a", "paged", "--kv-memory", "96MiB"),
        "static": record(d / "static.kvtrace", "-w", "alpaca", "-n", "16", "-a", "static", "--max-len", "512"),
    }


def figures(cap) -> list[dict]:
    return [o.data[PLOTLY_MIME] for o in cap.outputs if PLOTLY_MIME in o.data]


def titles(cap) -> list[str]:
    return [f["layout"]["title"]["text"] for f in figures(cap)]


def tables(cap) -> list[str]:
    return [o.data["text/html"] for o in cap.outputs if "text/html" in o.data and "<table" in o.data["text/html"]]


def test_extension_registers_the_magic(shell):
    assert "kvscope" in shell.magics_manager.magics["line"]
    assert "kvscope" in shell.magics_manager.magics["cell"]


def test_run_records_and_shows(shell, tmp_path):
    out = tmp_path / "run.kvtrace"
    with capture_output() as cap:
        result = shell.run_line_magic(
            "kvscope", f"run --workload alpaca --requests 12 --allocator paged --kv-memory 64MiB -o {out}"
        )
    assert isinstance(result, MagicResult)
    assert out.exists() and result.paths == [out]
    assert result.trace.meta["allocator"] == "paged" and result.trace.meta["device"] == "sim"
    assert f"trace: {out}" in cap.stdout
    assert tables(cap) and "peak used" in tables(cap)[0]
    shown = titles(cap)
    assert shown[0] == "KV memory by state over time"
    assert shown[1].startswith("Blocks and pages at step")
    assert shown[2] == "Throughput, batch and step time"
    assert "<kvscope: paged b16 (run)" in repr(result)


def test_run_uses_the_cli_parser():
    # The magic's `run` is built by kvscope.commands.run.add_parser: every CLI option exists in it.
    cli = argparse.ArgumentParser()
    run_cmd.add_parser(cli)
    magic_run = build_parser()._subparsers._group_actions[0].choices["run"]
    cli_flags = {s for a in cli._actions for s in a.option_strings}
    magic_flags = {s for a in magic_run._actions for s in a.option_strings}
    assert cli_flags <= magic_flags
    assert magic_flags - cli_flags == {"--no-show"}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("run --allocator paged", "the following arguments are required: --workload"),
        ("run --workload alpaca --allocator nope", "invalid choice: 'nope'"),
        ("run --workload alpaca --requests 5 --allocator static --block-size 8", "--block-size applies to"),
        ("run --workload alpaca --kv-memory lots", "--kv-memory"),
        ("show /no/such.kvtrace", "no such file"),
        ("frobnicate", "invalid choice: 'frobnicate'"),
        ("show 'unbalanced", "No closing quotation"),
    ],
)
def test_bad_lines_print_usage_and_return(shell, line, expected):
    with capture_output() as cap:
        result = shell.run_line_magic("kvscope", line)  # must not raise (SystemExit included)
    assert result is None
    assert expected in cap.stderr
    assert "Traceback" not in cap.stderr + cap.stdout


def test_usage_errors_show_the_subcommand_usage(shell):
    with capture_output() as cap:
        shell.run_line_magic("kvscope", "run --bogus-flag")
    assert cap.stderr.startswith("usage: %kvscope run")
    assert "%kvscope run: error:" in cap.stderr


def test_help_returns_to_the_prompt(shell):
    with capture_output() as cap:
        assert shell.run_line_magic("kvscope", "run --help") is None
        assert shell.run_line_magic("kvscope", "") is None
    assert "--kv-memory" in cap.stdout and "compare" in cap.stdout


def test_show_displays_summary_and_report_views(shell, traces):
    with capture_output() as cap:
        result = shell.run_line_magic("kvscope", f"show {traces['paged']}")
    assert result.trace.name == "paged"
    assert "sharing savings" in tables(cap)[0]
    found = titles(cap)
    assert any(t.startswith("Who shares which blocks") for t in found)  # parallel sampling: the sharing view
    assert len(found) >= 5
    with capture_output() as cap:
        shell.run_line_magic("kvscope", f"show {traces['paged']} --views memory")
    assert len(figures(cap)) == 1


def markdown(cap) -> str:
    return "\n".join(o.data["text/markdown"] for o in cap.outputs if "text/markdown" in o.data)


def test_show_names_the_views_a_run_lacks_and_refuses_unknown_ones(shell, traces):
    from kvscope.present.views import VIEWS

    with capture_output() as cap:
        shell.run_line_magic("kvscope", f"show {traces['paged']} --views prefix,memory")
    assert titles(cap) == ["KV memory by state over time"]  # no prefix caching in this run: no tree
    assert "Not shown for this run" in markdown(cap) and VIEWS["prefix"].absent in markdown(cap)
    with capture_output() as cap:
        assert shell.run_line_magic("kvscope", f"show {traces['paged']} --views memory,nope") is None
    assert "%kvscope show: error: views: 'nope' not among memory, fragmentation" in cap.stderr
    assert not cap.outputs and "Traceback" not in cap.stderr  # refused before anything is shown
    with capture_output() as cap:
        assert shell.run_line_magic("kvscope", f"explore {traces['static']} --tree forks") is None
    assert "tree 'forks' does not apply to static" in cap.stderr


def test_compare_two_traces(shell, traces):
    with capture_output() as cap:
        result = shell.run_line_magic("kvscope", f"compare {traces['paged']} {traces['static']}")
    assert [t.name for t in result.traces] == ["paged", "static"]
    table = tables(cap)[0]
    assert "paged b16 (paged)" in table and "static max (static)" in table
    assert titles(cap) == ["Runs compared", "Runs over time"]
    prose = " ".join(o.data.get("text/markdown", "") for o in cap.outputs)
    # The verdict, from kvscope.analysis.compare: the runs had different workloads, and it names a better run.
    assert "Warning:" in prose and "different workloads" in prose
    assert "Memory:" in prose and "Throughput:" in prose and "is better" in prose


def test_report_writes_a_file(shell, traces, tmp_path):
    out = tmp_path / "r.html"
    with capture_output() as cap:
        result = shell.run_line_magic("kvscope", f"report {traces['static']} -o {out}")
    assert out.exists() and out.stat().st_size > 100_000 and result.paths == [out]
    assert repr(result) == f"<kvscope: files: {out}>"
    assert "wrote" in cap.stdout
    with capture_output() as cap:
        assert shell.run_line_magic("kvscope", f"report {traces['static']} -o {tmp_path}") is None
    assert "is a directory" in cap.stderr


def test_explore_gives_the_widget(shell, traces):
    with capture_output():
        result = shell.run_line_magic("kvscope", f"explore {traces['paged']} --tree forks --step 3")
    assert result.explorer.tree_kind == "forks" and result.explorer.step == result.explorer.step_data["step"] == 3


# ---- %%kvscope ----------------------------------------------------------------------------------------------------
HAND_CELL = """
import numpy as np
from kvscope.alloc.paged import PagedAllocator
from kvscope.spec import get_spec
alloc = PagedAllocator(get_spec("llama-3-8b"), 64 << 20, block_size=16)
alloc.admit(0, np.arange(40), 60)
alloc.append(0, np.arange(40))
alloc.fork(0, 1)
alloc.append(1, np.arange(3))
"""


def test_cell_records_an_allocator_built_without_a_recorder(shell):
    from kvscope.analysis.fragmentation import block_states
    from kvscope.analysis.summary import summarize
    from kvscope.spec import get_spec

    with capture_output() as cap:
        result = shell.run_cell_magic("kvscope", "--name captured", HAND_CELL)
    assert shell.user_ns["captured"] is result
    (trace,) = result.traces
    assert trace.meta["allocator"] == "paged" and trace.meta["allocator_config"]["block_size"] == 16
    bpt = get_spec("llama-3-8b").bytes_per_token
    s = summarize(trace)
    # seq 0 holds 40 tokens; its fork shares them and copies the partly filled third block before appending 3:
    # 16 + 16 (shared) + 8 + 11 tokens held, 40 + 43 without sharing.
    assert s["peak_used_bytes"] == 51 * bpt
    assert s["sharing_saved_bytes_peak"] == (83 - 51) * bpt
    states = block_states(trace, 0)
    assert sorted(states.loc[states["state"] == "shared", "unit"]) == [0, 1]
    # Shown: the allocator's books (no engine: no requests or steps to summarise), its blocks, the sharing graph.
    books = tables(cap)[0]
    assert "allocator's books at the end of the cell" in books and "6.38 MiB" in books  # used: 51 x 128 KiB
    assert titles(cap) == ["Blocks and pages at step 0", "Who shares which blocks at step 0"]


def test_cell_records_an_engine_run(shell):
    cell = (
        "from kvscope.engine import RunConfig, record_run\n"
        "from kvscope.workload_gen import resolve_workload\n"
        "reqs, desc = resolve_workload('alpaca', 10, seed=0)\n"
        "res = record_run(reqs, RunConfig(allocator='static', max_len=512))\n"
    )
    with capture_output():
        result = shell.run_cell_magic("kvscope", "--no-show", cell)
    (trace,) = result.traces  # the engine's recorder, once (the allocator holds the same one)
    assert trace.meta["allocator"] == "static"
    assert not trace.truncated
    assert shell.user_ns["res"].stats.steps == trace.events["step"].max() + 1


def test_cell_respects_explicit_null_recorders_and_restores_classes(shell):
    from kvscope.alloc.paged import PagedAllocator

    original = PagedAllocator.__init__
    cell = (
        "from kvscope.alloc.paged import PagedAllocator\n"
        "from kvscope.recorder import NullRecorder\n"
        "from kvscope.spec import get_spec\n"
        "a = PagedAllocator(get_spec('llama-3-8b'), 64 << 20, NullRecorder())\n"
    )
    with capture_output() as cap:
        assert shell.run_cell_magic("kvscope", "", cell) is None
    assert "nothing recorded" in cap.stderr
    assert PagedAllocator.__init__ is original
    with capture_output():
        assert shell.run_cell_magic("kvscope", "", HAND_CELL + "\n1 / 0\n") is None  # the cell's own error
    assert PagedAllocator.__init__ is original


def test_cell_bad_options(shell):
    with capture_output() as cap:
        assert shell.run_cell_magic("kvscope", "--bogus", "bad_option_cell_ran = 1") is None
    assert "usage: %%kvscope" in cap.stderr and "unrecognized arguments: --bogus" in cap.stderr
    assert "bad_option_cell_ran" not in shell.user_ns  # the cell does not run on bad options


def test_cell_records_every_allocator_of_a_loop(shell):
    cell = (
        "from kvscope.alloc.static import StaticAllocator\n"
        "from kvscope.spec import get_spec\n"
        "import numpy as np\n"
        "for variant in ['max', 'pow2', 'oracle']:\n"
        "    a = StaticAllocator(get_spec('llama-3-8b'), 64 << 20, max_len=256, variant=variant)\n"
        "    a.admit(0, np.arange(20), 30)\n"
        "    a.append(0, np.arange(20))\n"
        "    del a\n"
    )
    with capture_output():
        result = shell.run_cell_magic("kvscope", "--no-show", cell)
    assert [t.label for t in result.traces] == ["static max", "static pow2", "static oracle"]
    reserved = [int(t.events.loc[t.events["kind"] == "acct_reserved", "bytes"].iloc[-1]) for t in result.traces]
    bpt = 128 * 1024
    assert reserved == [256 * bpt, 32 * bpt, 30 * bpt]  # max_len, next power of two of 30, exactly 30 tokens
