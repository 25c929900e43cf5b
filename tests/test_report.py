"""The HTML report: self-contained (plotly.js inline once, no network), every view present, trace strings escaped,
a comparison for several traces, the `kvscope report` command, and a size bound for big traces."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kvscope.cli import main
from kvscope.trace import Trace

XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def requests_for(count: int, *, seed: int = 0, n_max: int = 1, shared_prefix: int = 0, first_id: str | None = None):
    from kvscope.workload import Request, SharedPrefix

    rng = np.random.default_rng(seed)
    out, t = [], 0.0
    for i in range(count):
        t += float(rng.exponential(1 / 400))
        p = int(rng.integers(shared_prefix + 2, shared_prefix + 40))
        sp = SharedPrefix("sys", shared_prefix) if shared_prefix else None
        rid = first_id if (i == 0 and first_id) else f"r{i}"
        out.append(Request(rid, t, p, int(rng.integers(1, 24)), n=int(rng.integers(1, n_max + 1)), shared_prefix=sp))
    return out


def record(
    kind: str,
    requests,
    *,
    capacity: int = 48 * 1024,
    max_len: int = 96,
    max_batch: int = 8,
    path: Path | None = None,
    workload: dict | None = None,
    command: str = "pytest",
    **opts,
) -> Trace:
    """A sim run of the tiny model through the real engine, scheduler and allocator (kvscope.engine.record_run)."""
    from kvscope.engine.api import RunConfig, record_run

    if kind == "vmm":
        opts.setdefault("page_size", 4096)
    cfg = RunConfig(
        allocator=kind,
        device="sim",
        model="tiny",
        kv_memory=capacity,
        max_len=max_len,
        max_batch=max_batch,
        max_tokens_per_step=256,
        **opts,
    )
    return record_run(requests, cfg, path=path, workload=workload, command=command).trace()


@pytest.fixture(scope="module")
def paged_trace() -> Trace:
    reqs = requests_for(40, seed=1, n_max=3, shared_prefix=16, first_id=XSS)
    return record("paged", reqs, prefix_caching=True, command=XSS)


@pytest.fixture(scope="module")
def paged_html(paged_trace) -> str:
    from kvscope.report import build_report

    return build_report([paged_trace])


def embedded_figures(html: str) -> list[tuple[str, dict]]:
    block = html.split("const KVSCOPE_FIGURES = ", 1)[1].split("];\n", 1)[0] + "]"
    return [(div, fig) for div, fig in json.loads(block)]


# ---- self-contained ----------------------------------------------------------------------------------------------
def test_plotly_js_is_inline_exactly_once_and_nothing_is_fetched(paged_html):
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs()
    assert paged_html.count(js[:300]) == 1 and js[-300:] in paged_html
    page = paged_html.replace(js, "")  # plotly.js mentions plotly.com links of its own (the hidden logo)
    assert "<script src" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no remote script, style or font
    assert "cdn.plot.ly" not in page and "@import" not in page


def test_every_plot_div_has_its_figure_and_every_figure_its_div(paged_html):
    figures = embedded_figures(paged_html)
    divs = re.findall(r'<div class="plot" id="([^"]+)">', paged_html)
    assert divs and sorted(divs) == sorted(d for d, _ in figures)
    for _, fig in figures:
        assert fig["data"], fig["layout"].get("title")
        assert fig["layout"]["title"]["text"]
    keys = {d.split("-")[-1] for d in divs}
    assert {"memory", "fragmentation", "blocks", "throughput", "requests", "sharing", "prefix"} <= keys


def test_summary_and_metadata_are_shown(paged_trace, paged_html):
    from kvscope.analysis.summary import summarize
    from kvscope.units import format_bytes

    s = summarize(paged_trace)
    assert f'<td class="num">{format_bytes(s["peak_reserved_bytes"])}</td>' in paged_html
    assert f"{s['generated_tokens']:,}" in paged_html
    assert paged_trace.meta["device_name"].startswith("simulated")
    assert paged_trace.meta["device_name"] in paged_html and "torch=" in paged_html and "python=" in paged_html
    assert "Run metadata" in paged_html and "workload" in paged_html
    assert "block_size=16" in paged_html


# ---- escaping ----------------------------------------------------------------------------------------------------
def test_trace_strings_are_escaped_not_executable(paged_html):
    from plotly.offline import get_plotlyjs

    page = paged_html.replace(get_plotlyjs(), "")
    assert XSS not in page
    assert XSS_ESCAPED in page  # the metadata value, shown as text
    # Inside the figures' script no "<" survives at all: tojson writes it as \u003c, so nothing can close the tag.
    block = page.split("const KVSCOPE_FIGURES = ", 1)[1].split("</script>", 1)[0]
    assert "<" not in block
    # The request id reached the request-lifetime figure, escaped for plotly's HTML-ish text.
    figures = dict(embedded_figures(paged_html))
    requests_fig = json.dumps(next(f for d, f in figures.items() if d.endswith("requests")))
    assert XSS_ESCAPED.replace("/", "\\u002f") in requests_fig or XSS_ESCAPED in requests_fig


def test_a_run_label_cannot_inject_markup(paged_trace):
    from kvscope.report import build_report

    trace = Trace(
        meta=paged_trace.meta | {"allocator": "<b onmouseover=alert(1)>x</b>"},
        events=paged_trace.events,
        path=Path("/tmp/<img src=x onerror=alert(1)>.kvtrace"),
    )
    html = build_report([trace])
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<b onmouseover" not in html


# ---- several traces ----------------------------------------------------------------------------------------------
def test_several_traces_get_a_comparison_section():
    from kvscope.report import build_report

    reqs = requests_for(30, seed=2)
    traces = [
        record("paged", reqs),
        record("static", reqs, static_variant="max"),
        record("vmm", reqs),
    ]
    html = build_report(traces)
    assert 'id="compare"' in html and 'id="compare-bars"' in html
    figures = dict(embedded_figures(html))
    assert "compare-bars" in figures
    bars = [t for t in figures["compare-bars"]["data"] if t["type"] == "bar"]
    assert bars and all(len(t["y"]) == 3 for t in bars)  # horizontal bars: one per run
    # the verdict (kvscope.analysis.compare) and the overlaid timelines
    verdict = re.search(r'<div class="verdict" id="compare-verdict">(.*?)</div>', html, re.S).group(1)
    assert "Memory:" in verdict and "Throughput:" in verdict and "Latency:" in verdict
    assert "compare-timelines" in figures
    lines = [t for t in figures["compare-timelines"]["data"] if t["type"] == "scatter"]
    assert {t["name"] for t in lines} == {t.label for t in traces}
    for t in traces:
        assert '<a href="#' in html and t.label in html
    sections = re.findall(r'<section class="run" id="([^"]+)">', html)
    assert len(sections) == 3 and len(set(sections)) == 3
    vmm_divs = [d for d in figures if d.startswith(sections[2])]
    assert any(d.endswith("driver") for d in vmm_divs) or "No timed driver calls" in html
    # static arena: no sharing views, and the blocks view is a strip of segments
    static_divs = [d for d in figures if d.startswith(sections[1])]
    assert not any(d.endswith(("sharing", "prefix")) for d in static_divs)


# ---- command line ------------------------------------------------------------------------------------------------
def test_cli_writes_one_file(tmp_path, capsys):
    reqs = requests_for(20, seed=3)
    a = tmp_path / "a.kvtrace"
    b = tmp_path / "b.kvtrace"
    record("paged", reqs, path=a)
    record("vmm", reqs, path=b)
    out = tmp_path / "r.html"
    assert main(["report", str(a), str(b), "-o", str(out), "--title", "my <runs>"]) == 0
    html = out.read_text(encoding="utf-8")
    assert "<title>my &lt;runs&gt;</title>" in html and 'id="compare"' in html
    assert f"wrote {out}" in capsys.readouterr().out


def test_cli_user_mistakes_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing.kvtrace"), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.kvtrace" in err and "\n" not in err
    bad = tmp_path / "bad.kvtrace"
    bad.write_bytes(b"not arrow")
    assert main(["report", str(bad), "-o", str(tmp_path / "r.html")]) == 2
    assert "bad.kvtrace" in capsys.readouterr().err
    good = tmp_path / "good.kvtrace"
    record("paged", requests_for(5), path=good)
    assert main(["report", str(good), "-o", str(tmp_path / "no" / "dir" / "r.html")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["report", str(good), "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_write_report_refuses_no_traces(tmp_path):
    from kvscope.report import write_report

    with pytest.raises(ValueError, match="no traces"):
        write_report([], tmp_path / "r.html")


# ---- size ----------------------------------------------------------------------------------------------------------
def test_report_size_stays_bounded_for_a_long_run():
    """~2,000 requests (a few hundred thousand events): the figures add a bounded amount over plotly.js.
    (Measured by hand: 20,000 requests, 3.0 M events -> a 6.7 MB report, 1.9 MB of it figures.)"""
    from plotly.offline import get_plotlyjs

    from kvscope.report import build_report

    reqs = requests_for(2000, seed=4, n_max=2, shared_prefix=8)
    trace = record("paged", reqs, capacity=256 * 1024, max_batch=32, prefix_caching=True)
    assert len(trace.events) > 100_000
    html = build_report([trace])
    figures_bytes = len(html) - len(get_plotlyjs())
    assert figures_bytes < 4_000_000, figures_bytes
    figures = dict(embedded_figures(html))
    requests_fig = next(f for d, f in figures.items() if d.endswith("requests"))
    assert requests_fig["data"][0]["type"] == "heatmap"  # 2000+ sequences: aggregated, not one bar each


# ---- which views a run gets: from what the trace contains ---------------------------------------------------------
def test_views_follow_the_trace_contents_not_the_allocator_name():
    from kvscope.present.views import VIEWS
    from kvscope.report import build_report

    reqs = requests_for(20, seed=6, n_max=3)  # forks share blocks; no prefix caching
    trace = record("paged", reqs)
    html = build_report([trace])
    divs = {d.split("-")[-1] for d, _ in embedded_figures(html)}
    assert "sharing" in divs and "prefix" not in divs
    # The prefix tree is left out, and the page says why, once, in the run's list of views not shown.
    absent = html.split('class="note absent"', 1)[1].split("</div>", 1)[0]
    assert "Prefix-cache tree" in absent and VIEWS["prefix"].absent in absent
    assert "Prefix-cache tree</h3>" not in html
    # The same events under an allocator name kvscope does not know get the same views.
    renamed = Trace(meta=trace.meta | {"allocator": "my-blocks"}, events=trace.events, path=trace.path)
    renamed_divs = {d.split("-")[-1] for d, _ in embedded_figures(build_report([renamed]))}
    assert renamed_divs == divs


def test_a_run_without_sharing_says_why_the_sharing_views_are_absent():
    from kvscope.present.views import VIEWS
    from kvscope.report import build_report

    html = build_report([record("static", requests_for(10, seed=7), static_variant="max")])
    absent = html.split('class="note absent"', 1)[1].split("</div>", 1)[0]
    for key in ("sharing", "prefix", "driver"):
        assert VIEWS[key].label in absent and VIEWS[key].absent in absent, key
    paged = build_report([record("paged", requests_for(10, seed=7, n_max=3, shared_prefix=16), prefix_caching=True)])
    absent = paged.split('class="note absent"', 1)[1].split("</div>", 1)[0]
    assert absent.count("<li>") == 1 and VIEWS["driver"].label in absent  # a paged run makes no driver calls


def test_headings_and_captions_come_from_the_catalog(paged_trace, paged_html):
    from markupsafe import escape

    from kvscope.present.views import split

    shown, _ = split(paged_trace)
    keys = ["memory", "fragmentation", "blocks", "tables", "throughput", "requests", "sharing", "prefix", "misses"]
    assert [v.key for v in shown] == keys
    for view in shown:
        assert f">{escape(view.heading(paged_trace))}</h3>" in paged_html, view.key
        assert f'<p class="caption">{escape(view.caption)}</p>' in paged_html, view.key


def test_summary_rows_are_the_presentation_layers(paged_trace, paged_html):
    from markupsafe import escape

    from kvscope.analysis.summary import summarize
    from kvscope.present.rows import SUMMARY_ROWS, format_value

    s = summarize(paged_trace)
    for row in SUMMARY_ROWS:
        if row is not None:
            cells = f'<th>{escape(row.label)}</th><td class="num">{escape(format_value(s, row.key, row.how))}</td>'
            # A feature's rows the run did not use (no CPU tier, one rank) are left out, not shown as zeros.
            shown = row.unused is None or s.get(row.key, row.unused) != row.unused
            assert (cells in paged_html) is shown, row.label
    labels = [row.label for row in SUMMARY_ROWS if row is not None]
    assert "retained after the last step" in labels and "peaks taken" in labels
