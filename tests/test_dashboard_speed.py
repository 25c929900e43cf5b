"""What keeps the dashboard quick on big traces (issue 13, item 3), checked as work done rather than seconds (2
shared cores make timings noisy; benchmarks/bench_dashboard.py times the real thing in Chromium): a step-slider move
rebuilds no whole-run map and finds the neighbouring step's figures prefetched, the figures are the catalog's,
a re-recorded file is drawn again, and the figure cache builds each figure once however many ask at once."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import pytest

pytest.importorskip("streamlit")
from sim_runs import record  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "app" / "main.py"
TIMEOUT = 120  # seconds per script run; 2 shared cores can be slow


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("speed-traces")
    return record(d / "paged.kvtrace", "-w", "parallel", "-n", "24", "-a", "paged", "--kv-memory", "96MiB")


@pytest.fixture
def app(trace_path, monkeypatch) -> AppTest:
    from kvscope.app.sources import TRACES_ENV

    monkeypatch.setenv(TRACES_ENV, str(trace_path))
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


def spec(at: AppTest, key: str) -> dict:
    for chart in at.get("plotly_chart"):
        if key in (chart.proto.id or ""):
            return json.loads(chart.proto.spec)
    raise AssertionError(f"no chart {key!r}")


def as_drawn(fig: go.Figure) -> dict:
    """A figure as st.plotly_chart sends it to the browser."""
    return json.loads(pio.to_json(fig, validate=False))


def wait_prefetched(keys: list, timeout_s: float = 60) -> None:
    from kvscope.app import memo

    deadline = time.monotonic() + timeout_s
    for key in keys:
        with memo.STEPPED._lock:
            future = memo.STEPPED._items.get(key)
        assert future is not None, f"{key} was not prefetched"
        future.result(timeout=max(0.0, deadline - time.monotonic()))


def test_slider_moves_rebuild_no_map_and_find_the_next_step_prefetched(app, trace_path, monkeypatch):
    from kvscope.app import memo

    from kvscope.present import views

    built: list[tuple] = []
    real = views.fragmentation_map

    def counting(trace, steps=None, units=None):
        built.append((steps, units))
        return real(trace, steps, units)

    monkeypatch.setattr(views, "fragmentation_map", counting)
    memo._fragmentation_map.clear()

    at = app.run()
    at.switch_page("views/fragmentation.py").run()
    assert not at.exception
    assert built == [(None, None)]  # the unzoomed map, once
    slider = at.slider[0]
    step, first, last = int(slider.value), int(slider.min), int(slider.max)
    assert first < step < last, "the test needs a start step with room on both sides"
    cache_id = next(lt.cache_id for lt in at.session_state["kvscope_traces"])
    # No move yet: the next step forwards, both views.
    wait_prefetched([(cache_id, view, step + 1) for view in ("blocks", "tables")])

    for target in (step + 1, step + 2):
        at.slider[0].set_value(target).run()
        assert not at.exception
        assert spec(at, "frag_grid")["layout"]["title"]["text"].endswith(f"step {target}")
    assert built == [(None, None)]  # slider moves never rebuild the whole-run map
    wait_prefetched([(cache_id, "blocks", step + 3)])  # moving forwards keeps prefetching forwards
    # A move back turns the prefetch around (to a step far from those drawn so far).
    far = (step + last) // 2
    assert far - 2 > step + 3, "the test needs more steps after the start step"
    at.slider[0].set_value(far).run()
    at.slider[0].set_value(far - 1).run()
    wait_prefetched([(cache_id, view, far - 2) for view in ("blocks", "tables")])
    assert (cache_id, "blocks", far) in memo.STEPPED  # drawn
    assert (cache_id, "blocks", far + 1) in memo.STEPPED  # prefetched after the move to far

    zoom = next(s for s in at.slider if s.label == "steps")
    zoom.set_value((first + (last - first) // 2, last)).run()
    assert built == [(None, None), ((first + (last - first) // 2, last), None)]


def test_cached_figures_are_the_catalogs(app, trace_path):
    from kvscope.present.views import VIEWS, fragmentation_map
    from kvscope.trace import load_trace

    trace = load_trace(trace_path)
    at = app.run()
    at.switch_page("views/fragmentation.py").run()
    step = int(at.slider[0].value)
    for _ in range(2):  # first built by the page, then from the cache (the same figure)
        assert spec(at, "frag_grid")["data"] == as_drawn(VIEWS["blocks"].figure(trace, step))["data"]
        assert spec(at, "frag_tables")["data"] == as_drawn(VIEWS["tables"].figure(trace, step))["data"]
        assert spec(at, "frag_map")["data"] == as_drawn(fragmentation_map(trace))["data"]
        at.run()
    # A prefetched step is drawn as the catalog draws it too.
    at.slider[0].set_value(step + 1).run()
    assert spec(at, "frag_grid")["data"] == as_drawn(VIEWS["blocks"].figure(trace, step + 1))["data"]
    at.switch_page("views/sharing.py").run()
    share_step = int(at.slider[0].value)
    assert spec(at, "share_graph")["data"] == as_drawn(VIEWS["sharing"].figure(trace, share_step))["data"]


def test_a_rerecorded_file_gets_a_new_cache_id(trace_path, tmp_path):
    from kvscope.app import state

    copy = tmp_path / "copy.kvtrace"
    copy.write_bytes(trace_path.read_bytes())
    before = state.load_path(copy)
    assert state.load_path(copy).cache_id == before.cache_id  # unchanged file: the same entries
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = state.load_path(copy)
    assert after.cache_id != before.cache_id and after.key == before.key


# ---- the figure cache on its own ------------------------------------------------------------------------------
def test_figure_cache_builds_once_for_concurrent_askers():
    from concurrent.futures import ThreadPoolExecutor

    from kvscope.app.memo import FigureCache

    cache = FigureCache(size=4)
    calls: list[int] = []
    release = threading.Event()

    def build() -> go.Figure:
        calls.append(1)
        release.wait(10)
        return go.Figure()

    with ThreadPoolExecutor(max_workers=2) as worker:
        cache.prefetch("k", build, worker)
        results: list[go.Figure] = []
        askers = [threading.Thread(target=lambda: results.append(cache.get("k", build))) for _ in range(3)]
        for t in askers:
            t.start()
        release.set()
        for t in askers:
            t.join(10)
    assert len(calls) == 1 and len(results) == 3 and all(r is results[0] for r in results)


def test_figure_cache_keeps_the_latest_and_reports_errors():
    from kvscope.app.memo import FigureCache

    cache = FigureCache(size=2)
    for key in "abc":
        cache.get(key, go.Figure)
    assert len(cache) == 2
    built: list[str] = []
    cache.get("a", lambda: built.append("a") or go.Figure())  # evicted: built again
    assert built == ["a"]

    tries: list[int] = []

    def broken() -> go.Figure:
        tries.append(1)
        raise ValueError("cannot replay")

    for _ in range(2):  # the page shows the builder's error every time it asks, and a failure is not kept
        with pytest.raises(ValueError, match="cannot replay"):
            cache.get("bad", broken)
    assert len(tries) == 2 and "bad" not in cache


def test_neighbours_follow_the_last_move():
    from kvscope.app.memo import neighbours

    assert neighbours(5, None, 0, 10) == [6]  # forwards when there was no move yet
    assert neighbours(5, 4, 0, 10) == [6]
    assert neighbours(5, 6, 0, 10) == [4]
    assert neighbours(10, 9, 0, 10) == []  # the last step: nothing further on
    assert neighbours(0, None, 0, 0) == []


def test_event_filters_compare_category_codes():
    import pandas as pd
    from kvscope.app.filters import filter_events

    kinds = ["admit", "finish", "append", "admit", "finish"]
    frame = pd.DataFrame({"kind": kinds, "seq": [0, 0, 1, 1, 2], "step": [-1, 3, 4, 5, 6]})
    categorical = frame.assign(kind=pd.Categorical(kinds, categories=["admit", "append", "finish", "unused"]))
    for events in (frame, categorical):
        assert filter_events(events, kinds=["finish"]).index.tolist() == [1, 4]
        assert filter_events(events, kinds=["unused"]).empty
        assert filter_events(events, kinds=["admit", "finish"], seqs=[0, 1], steps=(0, 9)).index.tolist() == [1, 3]
        assert filter_events(events) is events
