"""The dashboard served for real (streamlit on a free port) and opened in headless Chromium with Playwright:
pages render their charts with no exception box, navigation and the step slider work, and a screenshot is taken
(docs/dashboard.png when KVSCOPE_UPDATE_SCREENSHOT=1, else under the test's tmp dir). The server is killed at the
end."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from sim_runs import record

from kvscope.commands import dashboard as dashboard_cmd

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 120  # a cold streamlit import on 2 busy cores can take a while
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing (apt-get install chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (streamlit may start helpers), then kill it if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser-traces")
    traces = [
        record(d / "paged.kvtrace", "-w", "parallel", "-n", "32", "-a", "paged", "--kv-memory", "384MiB"),
        record(d / "vmm.kvtrace", "-w", "parallel", "-n", "24", "-a", "vmm", "--megacache", "--kv-memory", "1GiB"),
        record(d / "static.kvtrace", "-w", "parallel", "-n", "24", "-a", "static", "--max-len", "512"),
    ]
    port = free_port()
    parser = argparse.ArgumentParser()
    dashboard_cmd.add_parser(parser)
    args = parser.parse_args([*map(str, traces), "--port", str(port), "--address", "127.0.0.1", "--no-browser"])
    log = (d / "server.log").open("w")
    proc = subprocess.Popen(
        dashboard_cmd.streamlit_command(args, sys.executable),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so stop() reaches every child
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}: {(d / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer within {START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)
        log.close()
    assert proc.poll() is not None  # the server is gone


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(120_000)  # 2 shared cores: a script run can take a while
            yield page
        finally:
            browser.close()


def wait_for_app(page, timeout_ms: int = 120_000) -> None:
    """Until the script run is over: the status widget ("Running...") gone and at least one plot drawn."""
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout_ms)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_ms, polling=250
    )


def assert_no_exception(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0, page.locator(
        "[data-testid='stException']"
    ).first.inner_text()


def test_pages_render_in_a_real_browser(server, page, tmp_path):
    page.goto(server)
    wait_for_app(page)
    page.wait_for_selector(".js-plotly-plot", timeout=120_000)
    assert_no_exception(page)
    assert page.get_by_text("kvscope: overview & comparison").count() == 1
    assert page.locator("[data-testid='stFileUploader']").count() == 1  # the sidebar uploader

    for title in ("Fragmentation", "Sharing", "Timelines", "Events"):
        page.locator("[data-testid='stSidebarNav'] a", has_text=title).first.click()
        page.wait_for_selector(f"h1:has-text('{title}')", timeout=120_000)
        wait_for_app(page)
        assert_no_exception(page)
        if title != "Events":
            page.wait_for_selector(".js-plotly-plot", timeout=120_000)
        # The sidebar (uploader, trace picker) is drawn on every page.
        assert page.locator("[data-testid='stFileUploader']").count() == 1, title


def test_step_slider_redraws_the_block_grid_and_screenshot(server, page, tmp_path):
    page.goto(f"{server}/fragmentation")
    wait_for_app(page)
    page.wait_for_selector(".js-plotly-plot .gtitle", timeout=120_000)
    title = page.locator(".js-plotly-plot .gtitle").first
    before = title.text_content()
    assert before.startswith("Blocks and pages at step")
    # Streamlit's slider is an <input type=range> (older versions: a div with role=slider); arrow keys move it.
    slider = page.locator(
        "[data-testid='stSlider'] input[type='range'], [data-testid='stSlider'] [role='slider']"
    ).first
    slider.focus()
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "(old) => { const t = document.querySelector('.js-plotly-plot .gtitle'); return t && t.textContent !== old; }",
        arg=before,
        timeout=120_000,
    )
    wait_for_app(page)
    after = title.text_content()
    assert after != before and after.startswith("Blocks and pages at step")
    assert_no_exception(page)

    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000  # a real picture, not a blank page
    if os.environ.get("KVSCOPE_UPDATE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
