"""The views of issue 12 in headless Chromium: the comparison (verdict, bars, overlaid timelines), the fragmentation
map with its fill panel, block tables, the sharing matrix and the prefix icicle all draw, without console errors;
the comparison's text never overlaps and nothing is clipped; the verdict is on the page.

Run as a script to refresh the screenshots under docs/ from traces (the README's come from the demo's runs):
    python tests/test_views_browser.py out/demo/paged-b16.kvtrace out/demo/vmm-2MiB.kvtrace [SHARING_TRACE]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_report_browser import CHROMIUM, launch, open_report, pytestmark  # noqa: F401  (the browser marks)

DOCS = Path(__file__).resolve().parent.parent / "docs"
# Text a reader must be able to read: tick labels, subplot titles, notes, legend entries.
TEXT_SELECTOR = ".xtick text, .ytick text, .annotation-text, .legendtext, .gtitle"

OVERLAPS_JS = """
(root) => {
  const svg = root.querySelector('.main-svg');
  const frame = svg.getBoundingClientRect();
  const boxes = [...root.querySelectorAll(SELECTOR)]
    .filter(e => e.textContent.trim() && e.getBoundingClientRect().width > 0)
    .map(e => { const r = e.getBoundingClientRect();
                return {t: e.textContent, l: r.left, r: r.right, top: r.top, b: r.bottom}; });
  const clipped = boxes.filter(b => b.l < frame.left - 1 || b.r > frame.right + 1
                                 || b.top < frame.top - 1 || b.b > frame.bottom + 1);
  const overlaps = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i], c = boxes[j];
    const w = Math.min(a.r, c.r) - Math.max(a.l, c.l), h = Math.min(a.b, c.b) - Math.max(a.top, c.top);
    if (w > 1 && h > 1) overlaps.push([a.t, c.t]);
  }
  return {count: boxes.length, clipped: clipped.map(b => b.t), overlaps};
}
""".replace("SELECTOR", repr(TEXT_SELECTOR))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from test_report import record

    from kvscope.report import write_report
    from kvscope.workload import Request

    # Parallel sampling with prefix caching: sharing, copy-on-write and prefix-cache hits; the same workload on VMM.
    reqs = [Request(f"r{i}", i * 0.002, 24 + i % 9, 6 + i % 11, n=2 if i % 3 == 0 else 1) for i in range(30)]
    traces = [
        record("paged", reqs, prefix_caching=True, capacity=256 * 1024, max_batch=16),
        record("vmm", reqs, capacity=256 * 1024, max_batch=16),
    ]
    out = tmp_path_factory.mktemp("views") / "report.html"
    write_report(traces, out)
    return out


def test_new_views_render_without_errors(report):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page, watch = open_report(browser, report)
            wanted = ["compare-bars", "compare-timelines", "-fragmentation", "-tables", "-sharing", "-prefix"]
            wanted.append("-misses")
            ids = page.eval_on_selector_all("div.plot", "els => els.map(e => e.id)")
            for suffix in wanted:
                found = [i for i in ids if i.endswith(suffix)]
                assert found, f"no {suffix} view in {ids}"
                for pid in found:
                    plot = page.locator(f"#{pid}")
                    assert plot.locator(".main-svg").count() >= 1, pid
                    assert "could not be drawn" not in plot.inner_text(), pid
            # the fragmentation map has its two panels, the prefix tree is an icicle
            assert page.locator("[id$='-fragmentation'] .heatmaplayer image, [id$='-fragmentation'] .hm").count() >= 2
            assert page.locator("[id$='-prefix'] .iciclelayer").count() == 1
            assert page.locator("[id$='-misses'] .barlayer .point").count() > 0  # one bar a request and outcome
            verdict = page.locator("#compare-verdict").inner_text()
            assert "Memory:" in verdict and "Throughput:" in verdict and "Latency:" in verdict
            assert watch.console_errors == [] and watch.page_errors == [], watch.console_errors + watch.page_errors
            assert watch.remote_requests == []
        finally:
            browser.close()


@pytest.mark.parametrize("width", [1400, 1000])
def test_comparison_text_never_overlaps_or_clips(report, width):
    """The issue measured tick labels running into the next row's titles and a clipped last row: every text box of
    the comparison figures is checked against every other, and against the figure's frame."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page, _ = open_report(browser, report, width=width)
            for pid in ("compare-bars", "compare-timelines"):
                result = page.eval_on_selector(f"#{pid}", OVERLAPS_JS)
                assert result["count"] > 5, pid
                assert result["overlaps"] == [], (pid, result["overlaps"][:5])
                assert result["clipped"] == [], (pid, result["clipped"][:5])
        finally:
            browser.close()


def screenshots(report: Path, shots: dict[str, str], width: int = 1300) -> list[Path]:
    """Element screenshots of a report: {css selector: file name under docs/}."""
    from playwright.sync_api import sync_playwright

    DOCS.mkdir(exist_ok=True)
    out = []
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page, _ = open_report(browser, report, width=width, height=1000)
            for selector, name in shots.items():
                path = DOCS / name
                page.locator(selector).first.screenshot(path=str(path))
                out.append(path)
        finally:
            browser.close()
    return out


def test_screenshots_are_small_pngs(report, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "DOCS", tmp_path)
    paths = screenshots(report, {"#compare-verdict": "v.png", "[id$='-tables']": "t.png"})
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1_000 < len(data) < 1_000_000


if __name__ == "__main__":  # python tests/test_views_browser.py PAGED VMM [SHARING [MISSES]] -> docs/view-*.png
    import tempfile

    from kvscope.report import write_report

    paged, vmm, *rest = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "compare.html"
        write_report([paged, vmm], html)
        print(
            *screenshots(
                html,
                {
                    "#compare-verdict": "view-verdict.png",
                    "#compare-bars": "view-compare.png",
                    "#compare-timelines": "view-timelines.png",
                    "[id$='-fragmentation']": "view-fragmentation.png",
                    "#run1-vmm-2-mib-fragmentation": "view-fragmentation-vmm.png",
                    "[id$='-tables']": "view-block-tables.png",
                },
            ),
            sep="\n",
        )
        if rest:
            html = Path(tmp) / "sharing.html"
            write_report(rest[:1], html)
            shots = {"[id$='-sharing']": "view-sharing.png", "[id$='-prefix']": "view-prefix.png"}
            print(*screenshots(html, shots))
        if len(rest) > 1:  # a prefix-caching run with prompt misses (e.g. multiturn with --cpu-cache)
            html = Path(tmp) / "misses.html"
            write_report(rest[1:2], html)
            print(*screenshots(html, {"[id$='-misses']": "view-misses.png"}))
