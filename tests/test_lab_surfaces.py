"""The lab on its surfaces: `%kvscope lab` in a notebook and the dashboard's Policies page show the lab's rows and
the catalog's three figures (kvscope.present.lab), and a bad option is one line there too."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("IPython")
from IPython.utils.capture import capture_output  # noqa: E402

from kvscope.present.lab import LAB_VIEWS  # noqa: E402

DATA = Path(__file__).parent / "data" / "mooncake" / "conversation_head2000.jsonl"
APP = Path(__file__).resolve().parent.parent / "app" / "main.py"
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def test_magic_lab_shows_rows_and_figures(shell):
    with capture_output() as cap:
        result = shell.run_line_magic(
            "kvscope", f"lab -w {DATA} -n 400 -p lru,belady,phase -c 100,1000 --prediction-error 0,1"
        )
    assert result is not None and len(result.rows) == 2 + 2 + 4
    figures = [o.data[PLOTLY_MIME] for o in cap.outputs if PLOTLY_MIME in o.data]
    assert len(figures) == len(LAB_VIEWS)
    titles = [f["layout"]["title"]["text"] for f in figures]
    assert titles[0].startswith("Prefix-cache hit rate against capacity")
    assert "prediction error" in titles[1] and "outcome" in titles[2]


def test_magic_lab_bad_option_is_one_line(shell):
    with capture_output() as cap:
        assert shell.run_line_magic("kvscope", f"lab -w {DATA} -c 0") is None
    assert "--capacity: must be at least one block" in cap.stderr and cap.stderr.count("\n") == 1


@pytest.mark.slow  # about 7 s: a whole Streamlit script run with the lab inside
def test_policies_page_runs_the_lab_and_explains_a_request(monkeypatch):
    st_testing = pytest.importorskip("streamlit.testing.v1")
    monkeypatch.setenv("KVSCOPE_LAB_WORKLOAD", str(DATA))  # app/views/policies.py: LAB_WORKLOAD_ENV
    at = st_testing.AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    at.switch_page("views/policies.py").run()
    assert not at.exception, at.exception
    charts = list(at.get("plotly_chart"))
    assert len(charts) == len(LAB_VIEWS)
    assert len(at.dataframe) == 3  # the rows, the requests' causes, the chosen request's blocks
    requests = at.dataframe[1].value
    assert (requests[["hit", "cold", "evicted", "gap", "capacity"]].sum(axis=1) == requests["blocks"]).all()
