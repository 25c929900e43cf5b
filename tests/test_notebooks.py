"""The tutorials in notebooks/ run top to bottom in a fresh kernel of this environment's Python (nbclient), with no
cell erroring, and show what they promise (summary tables, figures, the explorer, the files they write)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
KERNEL_NAME = "kvscope-test-python"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def kernel_manager_factory(tmp_path_factory):
    """Kernels run `sys.executable -m ipykernel_launcher`: a kernelspec of our own in a private directory, so a
    fresh CI venv needs no `ipykernel install` and a user's own python3 kernelspec cannot point elsewhere."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path_factory.mktemp("kernels") / KERNEL_NAME
    spec_dir.mkdir()
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "kvscope tests",
                "language": "python",
                "env": {"PYDEVD_DISABLE_FILE_VALIDATION": "1"},
            }
        )
    )
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])

    def make() -> KernelManager:
        return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)

    return make


def execute(path: Path, workdir: Path, make_km) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=make_km(),
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return nb


def outputs(nb) -> list[dict]:
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]


def errors(nb) -> list[str]:
    return [f"{o.get('ename')}: {o.get('evalue')}" for o in outputs(nb) if o.get("output_type") == "error"]


def plotly_titles(nb) -> list[str]:
    titles = []
    for o in outputs(nb):
        fig = o.get("data", {}).get(PLOTLY_MIME)
        if fig is not None:
            titles.append(fig.get("layout", {}).get("title", {}).get("text", ""))
    return titles


def texts(nb) -> str:
    parts = []
    for o in outputs(nb):
        if o.get("output_type") == "stream":
            parts.append(o.get("text", ""))
        for mime in ("text/plain", "text/html", "text/markdown"):
            value = o.get("data", {}).get(mime)
            if value:
                parts.append(value if isinstance(value, str) else "".join(value))
    return "\n".join(parts)


def test_notebooks_are_stored_without_outputs():
    books = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [b.stem for b in books] == [
        "01_quickstart",
        "02_paged_vs_vmm",
        "03_sharing_and_prefix_caching",
        "04_bring_your_own_engine",
    ]
    for book in books:
        nb = nbformat.read(book, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), book.name
        assert nb.cells[1].source.strip() == "%load_ext kvscope", book.name


def test_01_quickstart(tmp_path, kernel_manager_factory):
    nb = execute(NOTEBOOKS / "01_quickstart.ipynb", tmp_path, kernel_manager_factory)
    assert not errors(nb)
    assert (tmp_path / "runs" / "quickstart-paged.kvtrace").exists()
    assert (tmp_path / "runs" / "quickstart-report.html").stat().st_size > 100_000
    titles = plotly_titles(nb)
    assert "KV memory by state over time" in titles and any(t.startswith("Blocks and pages") for t in titles)
    text = texts(nb)
    assert "peak used" in text and "requests finished in" in text
    assert any(WIDGET_MIME in o.get("data", {}) for o in outputs(nb))  # the explorer
    assert_export_keeps_figures(nb)


def assert_export_keeps_figures(nb) -> None:
    """Every figure also carries a static PNG (kvscope.present.figures), so nbconvert's HTML, which cannot show the
    plotly mimetype, holds one image per figure. Needs kaleido's Chromium (/usr/bin/chromium)."""
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("no /usr/bin/chromium: kaleido cannot draw the static copies")
    nbconvert = pytest.importorskip("nbconvert")
    figures = [o for o in outputs(nb) if PLOTLY_MIME in o.get("data", {})]
    assert figures
    assert all("image/png" in o["data"] for o in figures)
    html, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    assert html.count('src="data:image/png;base64,') == len(figures)


def test_02_paged_vs_vmm(tmp_path, kernel_manager_factory):
    nb = execute(NOTEBOOKS / "02_paged_vs_vmm.ipynb", tmp_path, kernel_manager_factory)
    assert not errors(nb)
    for name in ("static", "paged", "vmm-2MiB", "vmm-64KiB"):
        assert (tmp_path / "runs" / f"cmp-{name}.kvtrace").exists(), name
    titles = plotly_titles(nb)
    assert "Runs compared" in titles
    assert sum(t.startswith("Blocks and pages") for t in titles) == 2
    text = texts(nb)
    assert "MiB at peak reserved" in text and "block_usage_frac" in text


def test_03_sharing_and_prefix_caching(tmp_path, kernel_manager_factory):
    nb = execute(NOTEBOOKS / "03_sharing_and_prefix_caching.ipynb", tmp_path, kernel_manager_factory)
    assert not errors(nb)
    titles = plotly_titles(nb)
    assert any(t.startswith("Who shares which blocks") for t in titles)
    assert any(t.startswith("Prefix-cache tree") for t in titles)
    text = texts(nb)
    assert "forked samples" in text
    assert "the second request found 64 of its 66 prompt tokens in the prefix cache" in text
    assert "block_share" in text


def test_04_bring_your_own_engine(tmp_path, kernel_manager_factory):
    nb = execute(NOTEBOOKS / "04_bring_your_own_engine.ipynb", tmp_path, kernel_manager_factory)
    assert not errors(nb)
    assert (tmp_path / "runs" / "toy-engine.kvtrace").exists()
    assert (tmp_path / "runs" / "toy-engine-report.html").stat().st_size > 100_000
    titles = plotly_titles(nb)
    assert "KV memory by state over time" in titles and any(t.startswith("Blocks and pages") for t in titles)
    text = texts(nb)
    assert "40 of 40 requests finished" in text and "matches the toy's own books" in text
    assert "Not shown for this run" in text  # the views a toy without sharing or driver calls does not get
