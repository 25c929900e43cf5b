"""The notebook explorer (kvscope.widgets): it builds, the step slider and the view selector redraw the figure
with the analysis layer's numbers, and the summary table matches `kvscope summary`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

pytest.importorskip("ipywidgets")

from kvscope.commands import run as run_cmd  # noqa: E402
from kvscope.present.tables import summary_frame  # noqa: E402
from kvscope.trace import load_trace  # noqa: E402
from kvscope.widgets import VIEWS, TraceExplorer, explore  # noqa: E402


def record(path: Path, *options: str) -> Path:
    parser = argparse.ArgumentParser()
    run_cmd.add_parser(parser)
    assert run_cmd.run(parser.parse_args([*options, "--device", "sim", "--quiet", "-o", str(path)])) == 0
    return path


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    d = tmp_path_factory.mktemp("widget-traces")
    return load_trace(record(d / "paged.kvtrace", "-w", "parallel", "-n", "16", "-a", "paged", "--kv-memory", "96MiB"))


@pytest.fixture(scope="module")
def shell():
    # Output widgets and display() need an IPython instance; outside a kernel plotly would print, so use mime.
    import plotly.io as pio
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.instance()
    saved = pio.renderers.default
    pio.renderers.default = "plotly_mimetype"
    yield
    pio.renderers.default = saved


def test_explorer_builds_at_the_peak(trace, shell):
    from kvscope.analysis.memory import memory_timeline

    ex = explore(trace)
    assert isinstance(ex, TraceExplorer)
    tl = memory_timeline(trace)
    assert ex.slider.min == tl["step"].min() and ex.slider.max == tl["step"].max()
    assert ex.slider.value == tl.loc[tl["reserved"].idxmax(), "step"]
    assert [v for _, v in ex.view.options] == list(VIEWS)
    assert ex.figure.layout.title.text == f"Blocks and pages at step {ex.slider.value}"
    assert ex.slider in ex.widget.children[2].children and ex.output in ex.widget.children


def test_slider_updates_the_figure_data(trace, shell):
    from kvscope.analysis.fragmentation import block_states
    from kvscope.analysis.memory import memory_timeline

    ex = explore(trace, step=2)
    before = ex.figure.to_plotly_json()["data"][0]
    ex.slider.value = ex.slider.max
    after = ex.figure.to_plotly_json()["data"][0]
    assert ex.figure.layout.title.text == f"Blocks and pages at step {ex.slider.max}"
    assert repr(before) != repr(after)
    # The grid carries the analysis layer's states: as many cells hold a state as the pool has blocks.
    states = block_states(trace, ex.slider.max)
    assert len(states) == trace.meta["allocator_config"]["num_blocks"]
    row = memory_timeline(trace).set_index("step").loc[ex.slider.max]
    from kvscope.units import format_bytes

    assert f"reserved {format_bytes(int(row['reserved']))}" in ex.info.value


def test_view_selector_switches_figures(trace, shell):
    ex = explore(trace, step=5)
    ex.view.value = "sharing"
    assert ex.figure.layout.title.text.startswith("Block sharing at step 5")
    ex.view.value = "map"
    assert ex.figure.layout.shapes[0].x0 == 5  # the step marker on the whole-run map
    ex.slider.value = 9
    assert ex.figure.layout.shapes[0].x0 == 9
    assert len(ex.figure.layout.shapes) == 1  # the marker moved; the cached map was not drawn on


def test_explorer_accepts_a_path_and_refuses_unknown_views(trace, shell):
    ex = explore(trace.path, view="map")
    assert ex.trace.name == trace.name
    with pytest.raises(ValueError, match="view"):
        explore(trace, view="nope")
    with pytest.raises(ValueError, match="view"):
        ex.figure_for("nope", 0)


def test_summary_frame_matches_the_cli_rows(trace):
    from kvscope.analysis.summary import summarize
    from kvscope.present.rows import format_value

    frame = summary_frame([trace, trace], ["a", "a"])
    assert list(frame.columns) == ["a", "a (2)"]
    s = summarize(trace)
    assert frame.loc["peak used", "a"] == format_value(s, "peak_used_bytes", "bytes")
    assert frame.loc["forked sequences", "a"] == f"{s['forks']:,}"
    with pytest.raises(ValueError, match="names"):
        summary_frame([trace], ["a", "b"])


def test_views_come_from_the_catalog(trace, shell):
    from kvscope.present.views import VIEWS as CATALOG

    assert VIEWS == {
        "blocks": "Blocks at the step",
        "map": "Fragmentation map (whole run)",
        "sharing": "Sharing graph at the step",
    }
    ex = explore(trace, view="map", step=4)
    whole_run = CATALOG["fragmentation"].figure(trace)  # the catalog's map, at its resolution
    assert ex.figure.data[0].z.shape == whole_run.data[0].z.shape


def test_views_that_do_not_apply_are_not_offered(tmp_path, shell):
    static = load_trace(record(tmp_path / "static.kvtrace", "-w", "alpaca", "-n", "8", "-a", "static"))
    ex = explore(static)
    assert [v for _, v in ex.view.options] == ["blocks", "map"]  # a static arena shares nothing
    with pytest.raises(ValueError, match="No sequences shared KV memory"):
        explore(static, view="sharing")
