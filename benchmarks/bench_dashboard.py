"""How fast the dashboard answers on a big trace (issue 13, item 3), measured in headless Chromium.

    python benchmarks/bench_dashboard.py TRACE.kvtrace --out benchmarks/results/dashboard.json

Starts `kvscope dashboard TRACE` (streamlit on a free local port) and opens it with Playwright in /usr/bin/chromium.
Times, on the browser's side:
  first_page_s   from navigating to the Overview until its summary table or first chart is drawn and the script run
                 is over
  frag_page_s    from clicking "Fragmentation" until its block grid is drawn and the run is over
  slider_s       from one ArrowRight on the step slider until the block grid's title names the new step and the run
                 is over (median of --moves moves)
  events_page_s  from clicking "Events" until its table of the first matching events is drawn and the run is over
Targets from the issue (on the 50,000-request trace): first page <= 3 s, a slider move <= 0.5 s.
Also, for the whole wait a user sees: server_start_s (from starting `kvscope dashboard` until its health check
answers: the server imports the pages' modules before it listens, kvscope.app.serve) and launch_to_first_page_s (from
starting it until the first page is drawn, the browser's own start included).
A trace with a digest (kvscope.digest, written when its run closed) draws its first page from the digest; its events
are read in the background after that page, so the first slider move may wait for them (slider_s lists every move).

Then, in a fresh process (no dashboard, no browser), what the first page waits for from kvscope itself:
  analysis_s     load_trace and the summary table (kvscope.present.tables.summary_frame, what the Overview shows)
so the dashboard's own share of first_page_s is first_page_s - load_trace_s - summary_s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FIRST_PAGE = ".js-plotly-plot, [data-testid='stTable'], [data-testid='stDataFrame'], [data-testid='stMarkdown'] table"
# The run is over when the app says so (stApp's data-test-script-state). The status widget ("Running...") alone is
# not enough: Streamlit shows it only after a run has lasted 500 ms, so a run that draws its first element sooner
# looked finished while it went on computing (the slider moves of 0.3 s measured before were such runs).
IDLE_JS = (
    "() => { const a = document.querySelector('[data-testid=\"stApp\"]');"
    " return !!a && a.getAttribute('data-test-script-state') === 'notRunning'"
    " && !document.querySelector('[data-testid=\"stStatusWidget\"]'); }"
)
TITLE_JS = (
    "(old) => { const t = document.querySelector('.js-plotly-plot .gtitle'); return t && t.textContent !== old; }"
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(trace: str, port: int, log: Any) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvscope.cli", "dashboard", trace, "--port", str(port), "--address", "127.0.0.1"]
    proc = subprocess.Popen([*cmd, "--no-browser"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_dashboard: the dashboard exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.read() == b"ok":
                    return proc
        except OSError:
            time.sleep(0.5)
    raise SystemExit("bench_dashboard: the dashboard did not answer within 180 s")


def measure(trace: str, moves: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    port = _port()
    with open(os.devnull, "w") as log:
        launched = time.perf_counter()
        proc = _serve(trace, port, log)
        server_start = time.perf_counter() - launched
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1440, "height": 1000})
                page.set_default_timeout(int(os.environ.get("BENCH_TIMEOUT_MS", "300000")))
                t0 = time.perf_counter()
                page.goto(f"http://127.0.0.1:{port}")
                page.wait_for_selector("[data-testid='stApp']")
                page.wait_for_selector(FIRST_PAGE)
                page.wait_for_function(IDLE_JS, polling=50)
                first = time.perf_counter() - t0
                launch_to_first = time.perf_counter() - launched
                t0 = time.perf_counter()
                page.locator("[data-testid='stSidebarNav'] a", has_text="Fragmentation").first.click()
                page.wait_for_selector(".js-plotly-plot .gtitle")
                page.wait_for_function(IDLE_JS, polling=50)
                frag = time.perf_counter() - t0
                slider = page.locator(
                    "[data-testid='stSlider'] input[type='range'], [data-testid='stSlider'] [role='slider']"
                ).first
                times = []
                for _ in range(moves):
                    before = page.locator(".js-plotly-plot .gtitle").first.text_content()
                    slider.focus()
                    t0 = time.perf_counter()
                    page.keyboard.press("ArrowRight")
                    page.wait_for_function(TITLE_JS, arg=before, polling=50)
                    page.wait_for_function(IDLE_JS, polling=50)
                    times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                page.locator("[data-testid='stSidebarNav'] a", has_text="Events").first.click()
                page.wait_for_selector("[data-testid='stDataFrame']")
                page.wait_for_function(IDLE_JS, polling=50)
                events = time.perf_counter() - t0
                browser.close()
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
    return {
        "server_start_s": round(server_start, 2),
        "launch_to_first_page_s": round(launch_to_first, 2),
        "first_page_s": round(first, 2),
        "frag_page_s": round(frag, 2),
        "slider_s": [round(t, 2) for t in times],
        "slider_median_s": round(statistics.median(times), 2),
        "events_page_s": round(events, 2),
    }


ANALYSIS_SPLIT = """
import json, sys, time
t0 = time.perf_counter()
from kvscope.present.tables import summary_frame
from kvscope.trace import load_trace
t1 = time.perf_counter()
trace = load_trace(sys.argv[1])
t2 = time.perf_counter()
summary_frame([trace], [trace.label])
t3 = time.perf_counter()
print(json.dumps({"import_s": round(t1 - t0, 2), "load_trace_s": round(t2 - t1, 2), "summary_s": round(t3 - t2, 2)}))
"""


def analysis_split(trace: str) -> dict[str, float]:
    """Seconds kvscope itself takes for what the first page shows (in a child process: a cold start, like the
    dashboard's server)."""
    out = subprocess.run([sys.executable, "-c", ANALYSIS_SPLIT, trace], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--moves", type=int, default=5)
    ap.add_argument("--out", help="JSON results")
    args = ap.parse_args(argv)
    load = os.getloadavg()
    result = measure(args.trace, args.moves)
    result["analysis_s"] = analysis_split(args.trace)
    result.update(
        trace=args.trace,
        trace_bytes=Path(args.trace).stat().st_size,
        targets={"first_page_s": 3.0, "slider_s": 0.5},
        machine={
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        date=time.strftime("%Y-%m-%d"),
    )
    print(
        f"server start {result['server_start_s']} s, launch to first page {result['launch_to_first_page_s']} s, "
        f"first page {result['first_page_s']} s, fragmentation page {result['frag_page_s']} s, "
        f"slider move median {result['slider_median_s']} s ({result['slider_s']}), events page "
        f"{result['events_page_s']} s; kvscope alone: "
        f"load {result['analysis_s']['load_trace_s']} s + summary {result['analysis_s']['summary_s']} s"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
