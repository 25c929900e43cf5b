"""What the CLI prints for people: the demo's tables keep every run name whole at 80 columns and through a pipe,
`--help` says the defaults, and `kvscope run` ends with the next useful command."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from kvscope.cli import main
from kvscope.commands.demo import comparison_tables, print_table

LONG_NAMES = ["vmm-2MiB-megacache-run", "static-oracle-variant", "paged-b16"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli-out")
    out = {}
    for name, allocator in zip(LONG_NAMES, ["vmm", "static", "paged"], strict=True):
        path = d / f"{name}.kvtrace"
        code = main(
            ["run", "-w", "alpaca", "-n", "12", "-a", allocator, "--kv-memory", "256MiB", "-q", "-o", str(path)]
        )
        assert code == 0
        out[name] = path
    return out


@pytest.mark.parametrize("width", [60, 80, 120])
def test_demo_tables_never_cut_a_run_name(traces, width):
    from kvscope.analysis.compare import compare_runs
    from kvscope.trace import load_trace

    frame = compare_runs({name: load_trace(p) for name, p in traces.items()})
    buf = io.StringIO()
    console = Console(file=buf, width=width, markup=False, highlight=False, soft_wrap=True)
    for table in comparison_tables(frame):
        print_table(console, table)
    text = buf.getvalue()
    assert "…" not in text  # rich's ellipsis: nothing was cut, neither a name nor a number
    for name in LONG_NAMES:
        assert sum(line.split()[0] == name for line in text.splitlines() if line.strip()) == 2, name
    assert "memory" in text or "arrivals" in text  # the batch table says what limited each batch


def test_demo_table_through_a_pipe(traces, tmp_path):
    """A real pipe (not a terminal: rich falls back to 80 columns) keeps the names whole too."""
    code = (
        "import sys; from rich.console import Console; from kvscope.trace import load_trace;"
        "from kvscope.analysis.compare import compare_runs; from kvscope.commands.demo import comparison_tables, "
        "print_table; c = Console(file=sys.stdout, markup=False, highlight=False, soft_wrap=True);"
        "[print_table(c, t) for t in comparison_tables(compare_runs({p.split('/')[-1][:-8]: load_trace(p) "
        "for p in sys.argv[1:]}))]"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, traces.values())], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout
    for name in LONG_NAMES:
        assert name in done.stdout


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("run", ["(default: 256)", "(default: 8192)", "(default: paged)", "(default: sim)", "(default: 0)"]),
        ("demo", ["(default: 256)", "(default: 2048)", "(default sharegpt)", "(default: out/demo)"]),
    ],
)
def test_help_shows_defaults(command, expected, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for item in expected:
        assert item in text, item
    assert "(default: None)" not in text and "(default: False)" not in text


def test_run_prints_the_next_command(tmp_path, capsys):
    out = tmp_path / "r.kvtrace"
    assert main(["run", "-w", "alpaca", "-n", "4", "-q", "-o", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith(f"next: kvscope report {out} -o {out.with_suffix('.html')}")
    assert f"kvscope dashboard {out}" in lines[-1]
