"""The magics in a real terminal IPython (a subprocess reading its input, as a person typing would): every command
prints text and returns to the prompt. Before kvscope published figures as raw MIME bundles, `%kvscope run` never
returned there: plotly's default renderer outside a notebook opens a web browser and waits for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("IPython")

IPYTHON = Path(sys.executable).with_name("ipython")


@pytest.mark.skipif(not IPYTHON.exists(), reason="no ipython script next to this Python")
def test_terminal_ipython_magics_print_text_and_return(tmp_path):
    a, b = tmp_path / "a.kvtrace", tmp_path / "b.kvtrace"
    lines = [
        "%load_ext kvscope",
        f"r = %kvscope run --workload alpaca --requests 12 --allocator paged --kv-memory 64MiB -o {a}",
        f"%kvscope run --workload alpaca --requests 12 --allocator vmm --kv-memory 256MiB -o {b}",
        f"%kvscope compare {a} {b}",
        f"%kvscope explore {a}",
        "print('still-at-the-prompt', r.trace.name)",
        "exit",
    ]
    env = dict(os.environ, BROWSER="false")  # were a browser opened anyway, nothing would wait on it
    env.pop("KVSCOPE_FRONTEND", None)
    done = subprocess.run(
        [str(IPYTHON), "--simple-prompt", "--no-banner", "--colors=nocolor", "--HistoryManager.enabled=False"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=env,
    )
    out = done.stdout
    assert done.returncode == 0, done.stderr[-2000:]
    assert "still-at-the-prompt a" in out  # every command returned
    assert "Traceback" not in out + done.stderr
    assert "peak used" in out  # the summary table, as text
    assert "[figure: KV memory by state over time;" in out  # a figure says what it is instead of drawing
    assert "<IPython.core.display" not in out  # no object reprs in place of prose
    assert "Memory:" in out and "Throughput:" in out  # the comparison's verdict
    assert "widgets need a notebook frontend" in out  # the explorer says where it works
