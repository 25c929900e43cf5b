"""The Streamlit dashboard under streamlit.testing.v1.AppTest: every page renders, sliders redraw, uploads are
checked, and the `kvscope dashboard` command builds the right server command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("streamlit")
from sim_runs import record  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from kvscope.commands import dashboard as dashboard_cmd  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "app" / "main.py"
PAGES = ["views/overview.py", "views/fragmentation.py", "views/sharing.py", "views/timelines.py", "views/events.py"]
TIMEOUT = 120  # seconds per script run; 2 shared cores can be slow


@pytest.fixture(scope="session")
def traces(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("app-traces")
    return {
        # parallel sampling: forks share blocks, so the sharing page has a graph
        "paged": record(d / "paged.kvtrace", "-w", "parallel", "-n", "24", "-a", "paged", "--kv-memory", "96MiB"),
        "vmm": record(d / "vmm.kvtrace", "-w", "alpaca", "-n", "24", "-a", "vmm", "--megacache", "--kv-memory", "1GiB"),
        "static": record(d / "static.kvtrace", "-w", "alpaca", "-n", "24", "-a", "static", "--max-len", "512"),
    }


@pytest.fixture
def app(traces, monkeypatch) -> AppTest:
    from kvscope.app.sources import TRACES_ENV

    monkeypatch.setenv(TRACES_ENV, ":".join(str(traces[k]) for k in ("paged", "vmm", "static")))
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT)


def charts(at: AppTest) -> list:
    return list(at.get("plotly_chart"))


def chart_spec(at: AppTest, key: str) -> dict:
    for c in charts(at):
        if c.proto.id and key in c.proto.id or getattr(c, "key", None) == key:
            return json.loads(c.proto.spec)
    raise AssertionError(f"no chart with key {key!r}; have {[getattr(c, 'key', None) for c in charts(at)]}")


def decode(values):
    """A plotly array from a chart spec: a list, or plotly's typed-array form {dtype, bdata (base64)}."""
    import base64

    if isinstance(values, dict) and "bdata" in values:
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=np.dtype(values["dtype"]))
    return values


def chart_title(spec: dict) -> str:
    return spec["layout"]["title"]["text"]


def test_every_page_renders_with_charts(app):
    at = app.run()
    expected_charts = {
        "views/overview.py": 1,  # the comparison (3 runs)
        "views/fragmentation.py": 2,  # block grid + whole-run map
        "views/sharing.py": 1,  # sharing graph (the prefix tree only with prefix caching)
        "views/timelines.py": 3,  # memory, throughput, requests (the driver tab is a note on sim)
        "views/events.py": 0,
    }
    for page in PAGES:
        if page != PAGES[0]:
            at.switch_page(page).run()
        assert not at.exception, f"{page}: {[e.message for e in at.exception]}"
        assert not at.error, f"{page}: {[e.value for e in at.error]}"
        assert len(at.title) == 1, page
        assert len(charts(at)) >= expected_charts[page], page
    # The events page shows the focused trace's events.
    assert len(at.dataframe) == 1
    assert len(at.dataframe[0].value) > 0


def test_overview_summary_matches_analysis(app, traces):
    from kvscope.analysis.summary import summarize
    from kvscope.trace import load_trace
    from kvscope.units import format_bytes

    at = app.run()
    table = at.dataframe[0].value
    assert list(table.columns) == ["paged", "vmm", "static"]
    for name in ("paged", "vmm", "static"):
        s = summarize(load_trace(traces[name]))
        assert table.loc["peak used", name] == format_bytes(s["peak_used_bytes"])
        assert table.loc["requests", name] == f"{s['requests']:,}"
    compare = chart_spec(at, "overview_compare")
    assert {"paged b16", "vmm 2 MiB megacache", "static max"} <= set(compare["data"][0]["y"])  # one bar per run
    # The verdict, computed by kvscope.analysis.compare, in words, and the runs' timelines.
    prose = " ".join(m.value for m in at.markdown)
    assert "Memory\\:" in prose and "Throughput\\:" in prose
    assert {t.get("name") for t in chart_spec(at, "overview_timelines")["data"]} >= {"paged b16", "static max"}


def test_fragmentation_slider_redraws_the_grid(app):
    at = app.run()
    at.switch_page("views/fragmentation.py").run()
    slider = at.slider[0]
    before = chart_spec(at, "frag_grid")
    target = int(slider.min) if int(slider.value) != int(slider.min) else int(slider.max)
    slider.set_value(target).run()
    assert not at.exception
    after = chart_spec(at, "frag_grid")
    assert chart_title(after).endswith(f"step {target}")
    assert chart_title(before) != chart_title(after)
    assert before["data"][0] != after["data"][0]  # the cells themselves changed, not only the title
    # The metrics follow the slider too: the whole-run map does not depend on it.
    assert chart_spec(at, "frag_map")["data"] is not None


def test_sharing_page_draws_shared_blocks(app):
    at = app.run()
    at.switch_page("views/sharing.py").run()
    spec = chart_spec(at, "share_graph")
    names = {t.get("name") for t in spec["data"]}
    assert "shared (ref > 1)" in names  # parallel sampling shares prompt blocks between samples
    assert len(at.dataframe) == 1  # the fork table


def test_views_come_from_the_catalog_and_absent_ones_say_why(app):
    from kvscope.present.views import VIEWS

    at = app.run()
    at.switch_page("views/fragmentation.py").run()
    captions = [c.value for c in at.caption]
    assert VIEWS["blocks"].caption in captions and VIEWS["fragmentation"].caption in captions
    at.sidebar.selectbox[0].select_index(1).run()  # vmm: timed driver calls, no sharing
    at.switch_page("views/timelines.py").run()
    assert not at.exception
    assert [t.label for t in at.tabs] == [VIEWS[k].label for k in ("memory", "throughput", "requests", "driver")]
    assert chart_spec(at, "tl_driver")["data"]
    at.sidebar.selectbox[0].select_index(2).run()  # static: no sharing, no prefix cache, no driver calls
    at.switch_page("views/sharing.py").run()
    assert not at.exception and not charts(at)
    infos = [i.value for i in at.info]
    assert VIEWS["sharing"].absent in infos and VIEWS["prefix"].absent in infos
    at.switch_page("views/timelines.py").run()
    assert VIEWS["driver"].absent in [i.value for i in at.info]
    assert len(charts(at)) == 3


def test_focus_selector_switches_the_trace(app, traces):
    at = app.run()
    box = at.sidebar.selectbox[0]
    assert [o.split(" ")[0] for o in box.options] == ["paged", "vmm", "static"]
    box.select_index(1).run()
    assert at.sidebar.selectbox[0].value == f"path:{traces['vmm'].resolve()}"
    at.switch_page("views/fragmentation.py").run()
    assert not at.exception
    assert at.caption[0].value.startswith("vmm")
    assert len(at.sidebar.file_uploader) == 1  # the sidebar is drawn on every page


def test_events_filters(app):
    at = app.run()
    at.switch_page("views/events.py").run()
    at.multiselect[0].set_value(["finish"]).run()
    rows = at.dataframe[0].value
    assert len(rows) > 0 and set(rows["kind"].astype(str)) == {"finish"}
    at.text_input[0].set_value("0-2").run()
    rows = at.dataframe[0].value
    assert set(rows["seq"]) <= {0, 1, 2} and len(rows) > 0
    at.text_input[0].set_value("seven").run()
    assert not at.exception
    assert any("seven" in e.value for e in at.error)


def test_bad_upload_is_rejected_with_the_loader_message(app):
    at = app.run()
    at.sidebar.file_uploader[0].upload("broken.kvtrace", b"this is not an arrow stream").run()
    assert not at.exception
    messages = [e.value for e in at.error]
    assert any("broken.kvtrace" in m and "not a kvscope trace" in m for m in messages), messages
    # The page still works with the other traces.
    assert list(at.dataframe[0].value.columns) == ["paged", "vmm", "static"]
    assert charts(at)


def test_good_upload_joins_the_comparison(app, traces):
    at = app.run()
    data = traces["static"].read_bytes()
    at.sidebar.file_uploader[0].upload("uploaded-static.kvtrace", data).run()
    assert not at.exception and not at.error
    assert "uploaded-static" in at.dataframe[0].value.columns


def test_oversized_upload_is_refused(app, traces, monkeypatch):
    from kvscope.app import state

    monkeypatch.setattr(state, "MAX_UPLOAD_BYTES", 1024)
    at = app.run()
    at.sidebar.file_uploader[0].upload("big.kvtrace", traces["static"].read_bytes()).run()
    assert not at.exception
    assert any("upload limit" in e.value for e in at.error)


def test_cut_off_upload_loads_with_a_warning(app, traces):
    data = traces["paged"].read_bytes()
    at = app.run()
    at.sidebar.file_uploader[0].upload("cut.kvtrace", data[: len(data) * 2 // 3]).run()
    assert not at.exception and not at.error
    assert any("cut off" in w.value for w in at.warning)
    assert "cut" in at.dataframe[0].value.columns
    assert at.dataframe[0].value.loc["cut off", "cut"] == "yes"


def test_no_traces_says_how_to_get_one(tmp_path, monkeypatch):
    from kvscope.app.sources import SAMPLES_ENV, TRACES_ENV

    monkeypatch.delenv(TRACES_ENV, raising=False)
    monkeypatch.setenv(SAMPLES_ENV, str(tmp_path))  # an empty sample_runs
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    for page in PAGES:
        if page != PAGES[0]:
            at.switch_page(page).run()
        assert not at.exception, page
        assert any("No trace loaded" in i.value for i in at.info), page


def test_missing_startup_file_is_an_error_not_a_crash(traces, tmp_path, monkeypatch):
    from kvscope.app.sources import TRACES_ENV

    monkeypatch.setenv(TRACES_ENV, f"{tmp_path / 'gone.kvtrace'}:{traces['paged']}")
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception
    assert any("gone.kvtrace" in e.value and "no such file" in e.value for e in at.error)
    assert list(at.dataframe[0].value.columns) == ["paged"]


# ---- pieces without streamlit ---------------------------------------------------------------------------------
def test_parse_id_list():
    from kvscope.app.filters import parse_id_list

    assert parse_id_list("") is None
    assert parse_id_list(" 3, 7-9 ;1") == [1, 3, 7, 8, 9]
    for bad in ("x", "9-7", "1-2-3", "0-99999999"):
        with pytest.raises(ValueError, match="sequences"):
            parse_id_list(bad)


def test_filter_events_keeps_only_matching_rows(traces):
    from kvscope.app.filters import filter_events

    from kvscope.trace import load_trace

    events = load_trace(traces["paged"]).events
    out = filter_events(events, kinds=["admit", "finish"], seqs=[0, 1], steps=(0, 10**6))
    assert len(out) > 0
    assert set(out["kind"].astype(str)) <= {"admit", "finish"}
    assert set(out["seq"]) <= {0, 1}
    assert len(filter_events(events)) == len(events)


def test_expand_trace_paths(traces, tmp_path):
    from kvscope.app.sources import expand_trace_paths

    d = traces["paged"].parent
    assert expand_trace_paths([d, traces["paged"]]) == sorted(d.glob("*.kvtrace"))
    with pytest.raises(ValueError, match="no such file"):
        expand_trace_paths([tmp_path / "nope.kvtrace"])
    with pytest.raises(ValueError, match="holds no"):
        expand_trace_paths([tmp_path])


def _dashboard_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dashboard_cmd.add_parser(parser)
    return parser.parse_args(list(argv))


def test_dashboard_command_line(traces):
    args = _dashboard_args(str(traces["paged"]), "--port", "8600", "--no-browser")
    cmd = dashboard_cmd.streamlit_command(args, "python")
    # streamlit's own command line, through kvscope.app.serve (the pages' imports done and the traces opened first)
    assert cmd[:4] == ["python", "-m", "kvscope.app.serve", "run"]
    from kvscope.app import serve

    assert serve.trace_args(cmd[2:]) == [str(traces["paged"].resolve())]
    assert Path(cmd[4]).name == "main.py" and Path(cmd[4]).is_file()
    assert cmd[cmd.index("--server.port") + 1] == "8600"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"  # offline: no usage statistics
    assert cmd[cmd.index("--") + 1 :] == [str(traces["paged"].resolve())]


def test_dashboard_cli_reports_a_missing_trace_in_one_line(tmp_path, capsys):
    from kvscope.cli import main

    assert main(["dashboard", str(tmp_path / "missing.kvtrace")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kvscope dashboard: error: {tmp_path / 'missing.kvtrace'}: no such file"


def test_dashboard_refuses_bad_paths_and_ports(tmp_path):
    from kvscope.errors import UserError

    with pytest.raises(ValueError, match="no such file"):
        dashboard_cmd.run(_dashboard_args(str(tmp_path / "missing.kvtrace")))
    with pytest.raises(UserError, match="--port"):
        dashboard_cmd.run(_dashboard_args("--port", "70000"))


def test_pages_show_no_warnings_on_complete_traces(app):
    at = app.run()
    for page in PAGES:
        if page != PAGES[0]:
            at.switch_page(page).run()
        # The comparison's warnings are not about the traces: these sample runs differ in workload and budget.
        warnings = [w.value for w in at.warning if not w.value.startswith("Warning\\: the runs have different")]
        assert not warnings, f"{page}: {warnings}"


def test_fragmentation_map_zooms_into_a_step_and_block_range(app):
    at = app.run()
    at.switch_page("views/fragmentation.py").run()
    whole = chart_spec(at, "frag_map")["data"][0]
    steps = next(s for s in at.slider if s.label == "steps")
    units = next(s for s in at.slider if s.label == "blocks / pages / rows")
    lo, hi = int(steps.min), int(steps.max)
    steps.set_value((lo + (hi - lo) // 2, hi)).run()
    units.set_value((0, 15)).run()
    assert not at.exception
    zoomed = chart_spec(at, "frag_map")["data"][0]
    xs = np.asarray(decode(zoomed["x"]), dtype=float)
    ys = np.asarray(decode(zoomed["y"]), dtype=float)
    assert xs.min() >= lo + (hi - lo) // 2 and ys.max() < 16  # only the window, re-binned
    assert len(xs) > 1 and not np.array_equal(np.asarray(decode(whole["y"]), dtype=float), ys)
    assert "Block tables" in " ".join(h.value for h in at.subheader)
    assert chart_spec(at, "frag_tables")["data"][0]["type"] == "heatmap"
