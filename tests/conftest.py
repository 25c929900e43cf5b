"""Test setup. TRITON_INTERPRET must be set before any Triton kernel module is imported: on machines without a
GPU the kernels then run in Triton's interpreter on CPU tensors."""

from __future__ import annotations

import os

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing or broken
    HAS_CUDA = False

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
# HYPOTHESIS_PROFILE=nightly: 10,000 examples per property and state machine (explicit @settings(max_examples=...)
# keep theirs); print_blob so that a failure found after hours can be replayed with @reproduce_failure.
settings.register_profile("nightly", max_examples=10_000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: cuda when present, else cpu (interpreted Triton)."""
    return "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def shell():
    """An IPython shell with the kvscope magic loaded, giving the rich outputs a notebook gets (figures as plotly
    mimetype outputs, no PNG copies)."""
    import plotly.io as pio
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "kvscope")
    # Outside a kernel plotly renders nothing; the mimetype renderer makes figures real display outputs.
    saved = pio.renderers.default
    pio.renderers.default = "plotly_mimetype"
    # A plain InteractiveShell has no kernel: kvscope would print text (its terminal mode, tested apart in
    # test_magic_terminal.py); these tests read the rich outputs a notebook gets, without the PNG's Chromium.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVSCOPE_FRONTEND", "rich")
        mp.setenv("KVSCOPE_STATIC_FIGURES", "0")
        yield sh
    pio.renderers.default = saved
