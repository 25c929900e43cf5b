"""The report in a real browser (headless Chromium through Playwright): it opens without console errors, every
chart renders, nothing leaves the page over the network, and a hostile request id or metadata value shows as text
without running.

Needs /usr/bin/chromium (CI: `apt-get install -y chromium`); Playwright's own browser downloads are never used.
Run as a script to refresh the README screenshot: `python tests/test_report_browser.py [TRACE ...]`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS = "<script>alert(1)</script>"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "report.png"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed (apt-get install -y chromium)"),
]


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)


class PageWatch:
    """Everything the page does that the test wants to see: console errors, uncaught errors, dialogs, requests."""

    def __init__(self, page) -> None:
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("dialog", self._dialog)
        page.on("request", lambda r: self.requests.append(r.url))

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    @property
    def remote_requests(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(("file:", "data:", "blob:", "about:"))]


def open_report(browser, path: Path, *, width: int = 1400, height: int = 1000):
    page = browser.new_page(viewport={"width": width, "height": height})
    watch = PageWatch(page)
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_selector("body[data-rendered='true']", timeout=60_000)
    return page, watch


@pytest.fixture(scope="module")
def report_file(tmp_path_factory) -> Path:
    from test_report import record, requests_for

    from kvscope.report import write_report

    reqs = requests_for(12, seed=5, n_max=3, shared_prefix=16, first_id=XSS)  # <= 40 rows: ids label the axis
    traces = [
        record("paged", reqs, prefix_caching=True, workload={"name": XSS}),
        record("vmm", reqs),
    ]
    out = tmp_path_factory.mktemp("report") / "report.html"
    write_report(traces, out)
    return out


def test_report_renders_offline_without_errors(report_file):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page, watch = open_report(browser, report_file)
            plots = page.locator("div.plot")
            count = plots.count()
            assert count >= 8
            for i in range(count):
                plot = plots.nth(i)
                pid = plot.get_attribute("id")
                assert plot.locator(".main-svg").count() >= 1, f"{pid}: no rendered chart"
                assert "could not be drawn" not in plot.inner_text(), pid
            # hovering a chart works (plotly's hover layer answers without errors)
            first = plots.first.locator(".nsewdrag").first
            first.hover()
            assert watch.console_errors == [], watch.console_errors
            assert watch.page_errors == [], watch.page_errors
            assert watch.remote_requests == [], watch.remote_requests
            assert watch.dialogs == []  # no alert() ran
        finally:
            browser.close()


def test_hostile_strings_show_as_text(report_file):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page, watch = open_report(browser, report_file)
            # The metadata value is visible as literal text, in a table cell, not as an element.
            cell = page.locator("table.meta td", has_text=XSS)
            assert cell.count() >= 1
            assert cell.first.inner_text().count(XSS) == 1
            # No script element carries it, and no alert fired.
            scripts = page.eval_on_selector_all("script", "els => els.map(e => e.textContent.includes('alert(1)'))")
            assert not any(scripts[:-1])  # only the figures' data script mentions it, as escaped JSON data
            assert watch.dialogs == []
            # The request id reached the request-lifetime chart as an axis label, rendered as text.
            ticks = page.eval_on_selector_all("[id$='-requests'] .ytick text", "els => els.map(e => e.textContent)")
            assert XSS in ticks
            assert watch.dialogs == [] and watch.page_errors == []
        finally:
            browser.close()


def take_screenshot(report: Path, out: Path = SCREENSHOT) -> Path:
    """The first run's memory chart and fragmentation map, as a PNG for the README."""
    from playwright.sync_api import sync_playwright

    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page, _ = open_report(browser, report, width=1400, height=1100)
            page.eval_on_selector("h3[id$='-memory-title']", "el => el.scrollIntoView()")
            page.screenshot(path=str(out), full_page=False)
        finally:
            browser.close()
    return out


if __name__ == "__main__":  # python tests/test_report_browser.py [TRACE ...] -> docs/report.png
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kvscope.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "report.html"
        write_report(sys.argv[1:], html)
        print(take_screenshot(html))
