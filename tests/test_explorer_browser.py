"""The explorer's front end (kvscope/templates/explorer.js) in headless Chromium: the ES module is loaded into a page
with a tiny fake anywidget model whose save_changes goes to the real Python widget (through Playwright's
expose_function, as a kernel's comm would) and whose answers come back as change events. Moving the cursor (the
slider, the play button, a click on the timeline) redraws the block map, the sharing tree and the timeline; a click on
a cell shows what it holds; the tree switches between the prefix tree and the fork families; nothing is fetched over
the network and the console stays clean.

Run as a script to refresh the README screenshot: `python tests/test_explorer_browser.py [TRACE]`
(default: sample_runs/paged-sharing.kvtrace) -> docs/view-explorer.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_report_browser import CHROMIUM, PageWatch, launch, pytestmark  # noqa: F401  (the browser marks)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_runs" / "paged-sharing.kvtrace"
SCREENSHOT = ROOT / "docs" / "view-explorer.png"
SYNCED = ["meta", "blocks", "timeline", "tree", "tree_kind", "step", "step_data", "probe", "probe_text"]

# A fake of what anywidget hands render(): get / set / on / off / save_changes. set fires change events at once
# (as Backbone does); save_changes sends the dirty traits to Python and applies what Python changed in return.
PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>__KVX_CSS__</style></head>
<body style="margin:8px;background:#fff"><div id="out" style="width:1180px"></div>
<script type="module">
const state = __KVX_STATE__;
const handlers = {};
let dirty = {};
function fire(name) { for (const cb of handlers["change:" + name] || []) cb(); }
const model = {
  get: (k) => state[k],
  set: (k, v) => { state[k] = v; dirty[k] = v; fire(k); },
  on: (ev, cb) => { (handlers[ev] = handlers[ev] || []).push(cb); },
  off: (ev, cb) => { handlers[ev] = (handlers[ev] || []).filter((f) => f !== cb); },
  send: () => {},
  save_changes: () => {
    const changes = dirty; dirty = {};
    window.pySync(JSON.stringify(changes)).then((text) => {
      const back = JSON.parse(text);
      for (const [k, v] of Object.entries(back)) state[k] = v;
      for (const k of Object.keys(back)) fire(k);
    });
  },
};
window.kvxModel = model;
const url = URL.createObjectURL(new Blob([__KVX_ESM__], { type: "text/javascript" }));
const mod = await import(url);
window.kvxCleanup = mod.default.render({ model, el: document.getElementById("out") });
document.body.dataset.rendered = "true";
</script></body></html>"""


def page_html(widget) -> str:
    from kvscope.widgets import CSS_PATH, ESM_PATH

    def script(value) -> str:  # JSON inside a <script>: no "</script>" can end it early
        return json.dumps(value).replace("</", "<\\/")

    state = {name: getattr(widget, name) for name in SYNCED}
    parts = {"__KVX_CSS__": CSS_PATH.read_text(), "__KVX_ESM__": script(ESM_PATH.read_text())}
    html = PAGE.replace("__KVX_STATE__", script(state))
    for key, value in parts.items():
        html = html.replace(key, value)
    return html


def open_explorer(browser, widget, tmp: Path, *, width: int = 1200, height: int = 1000):
    """A page showing `widget` through the fake model; returns (page, PageWatch, the list of synced changes)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    watch = PageWatch(page)
    sent: list[dict] = []

    def py_sync(text: str) -> str:
        changes = json.loads(text)
        sent.append(changes)
        back: dict = {}

        def note(change) -> None:
            back[change["name"]] = change["new"]

        widget.observe(note, names=SYNCED)
        try:
            for name, value in changes.items():
                setattr(widget, name, value)
        finally:
            widget.unobserve(note, names=SYNCED)
        for name, value in changes.items():  # what the front end set comes back only when Python changed it
            if back.get(name) == value:
                back.pop(name)
        return json.dumps(back)

    page.expose_function("pySync", py_sync)
    path = tmp / "explorer.html"
    path.write_text(page_html(widget), encoding="utf-8")
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_selector("body[data-rendered='true']", timeout=30_000)
    return page, watch, sent


SNAPSHOT_JS = """() => {
  const c = document.querySelector('.kvx-map');
  const rects = [...document.querySelectorAll('.kvx-tree rect')];
  const cur = document.querySelector('.kvx-timeline .kvx-cursor');
  return {
    root: document.querySelector('.kvx').dataset.step,
    map: c.dataset.step, mapPixels: c.toDataURL(), mapWidth: c.width,
    tree: document.querySelector('.kvx-tree').dataset.step,
    treeFills: rects.map((r) => r.getAttribute('fill')).join(','), treeBoxes: rects.length,
    timeline: document.querySelector('.kvx-timeline').dataset.step, cursorX: cur.getAttribute('x1'),
    bands: document.querySelectorAll('.kvx-timeline .kvx-band').length,
    readout: document.querySelector('.kvx-readout').textContent,
    slider: document.querySelector('.kvx-slider').value,
  };
}"""


def wait_for_step(page, step: int) -> dict:
    page.wait_for_function(
        "(s) => ['.kvx', '.kvx-map', '.kvx-tree', '.kvx-timeline'].every("
        "(q) => document.querySelector(q).dataset.step === String(s))",
        arg=step,
        timeout=30_000,
    )
    return page.evaluate(SNAPSHOT_JS)


@pytest.fixture(scope="module")
def widget():
    from kvscope.trace import load_trace
    from kvscope.widgets import explore

    return explore(load_trace(SAMPLE))


def test_cursor_redraws_all_three_views(widget, tmp_path):
    from playwright.sync_api import sync_playwright

    widget.step = widget.data.start
    start = widget.step
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page, watch, sent = open_explorer(browser, widget, tmp_path)
            before = wait_for_step(page, start)
            assert before["mapWidth"] > 0 and before["treeBoxes"] > 10 and before["bands"] >= 3
            assert before["readout"].startswith(f"step {start:,}:")
            # The slider, moved as a person would: an input event.
            target = 10
            page.evaluate(
                "(v) => { const s = document.querySelector('.kvx-slider'); s.value = v;"
                " s.dispatchEvent(new Event('input')); }",
                target,
            )
            after = wait_for_step(page, target)
            assert widget.step == target and widget.step_data["step"] == target  # Python got the cursor
            assert {"step": target} in sent
            assert after["mapPixels"] != before["mapPixels"]  # the block map redrew, with other states
            assert after["treeFills"] != before["treeFills"]  # prefixes changed state
            assert after["cursorX"] != before["cursorX"]  # the timeline's cursor moved
            assert after["readout"].startswith(f"step {target:,}:") and after["slider"] == str(target)

            # A click on the timeline moves the cursor too.
            box = page.locator(".kvx-timeline").bounding_box()
            assert box is not None
            page.mouse.click(box["x"] + box["width"] * 0.75, box["y"] + box["height"] / 2)
            page.wait_for_function(f"() => document.querySelector('.kvx').dataset.step !== '{target}'")
            page.wait_for_function(
                "() => ['.kvx-map', '.kvx-tree', '.kvx-timeline'].every((q) => "
                "document.querySelector(q).dataset.step === document.querySelector('.kvx').dataset.step)"
            )
            clicked = page.evaluate(SNAPSHOT_JS)
            assert int(clicked["root"]) > target and int(clicked["root"]) == widget.step

            # Play advances the cursor by itself, a step asked at a time; pause stops it.
            page.evaluate("() => { const s = document.querySelector('.kvx-slider'); s.value = 0;"
                          " s.dispatchEvent(new Event('input')); }")  # fmt: skip
            wait_for_step(page, 0)
            n_sent = len(sent)
            page.click(".kvx-play")
            page.wait_for_function("() => Number(document.querySelector('.kvx').dataset.step) >= 20")
            page.click(".kvx-play")
            played = [c["step"] for c in sent[n_sent:] if "step" in c]
            assert len(played) >= 3 and played == sorted(played)

            # A click on a map cell asks Python what it holds.
            page.click(".kvx-map", position={"x": 3, "y": 3})
            page.wait_for_function("() => document.querySelector('.kvx-probe').textContent.includes('block 0')")
            assert widget.probe == 0 and "block 0" in widget.probe_text

            assert watch.console_errors == [] and watch.page_errors == []
            assert watch.remote_requests == []  # nothing fetched: no CDN
        finally:
            browser.close()


def test_tree_switches_between_prefix_tree_and_fork_families(widget, tmp_path):
    from playwright.sync_api import sync_playwright

    assert widget.data.tree_kinds == ["prefix", "forks"]
    widget.tree_kind = "prefix"
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page, watch, _ = open_explorer(browser, widget, tmp_path)
            wait_for_step(page, widget.step)
            assert page.locator(".kvx-kind.kvx-active").inner_text() == "Prefix-cache tree"
            page.click(".kvx-kind[data-kind='forks']")
            page.wait_for_function("() => document.querySelector('.kvx-kind.kvx-active').dataset.kind === 'forks'")
            assert widget.tree_kind == "forks" and widget.tree["title"] == "Fork families"
            page.wait_for_function(
                "(n) => document.querySelectorAll('.kvx-tree rect').length === n",
                arg=len(widget.step_data["tree"]["boxes"]["level"]),
            )
            hovers = page.eval_on_selector_all(".kvx-tree rect title", "els => els.map(e => e.textContent)")
            assert hovers and all(t.startswith("seq ") for t in hovers)  # one box per sequence (or chain of them)
            fills = set(page.eval_on_selector_all(".kvx-tree rect", "els => els.map(e => e.getAttribute('fill'))"))
            assert "#1f77b4" in fills  # sequences holding KV memory at the step
            assert watch.console_errors == [] and watch.page_errors == []
        finally:
            browser.close()


def test_a_run_without_sharing_says_so(tmp_path):
    from playwright.sync_api import sync_playwright

    from kvscope.trace import load_trace
    from kvscope.widgets import explore

    static = explore(load_trace(ROOT / "sample_runs" / "static.kvtrace"))
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page, watch, _ = open_explorer(browser, static, tmp_path)
            wait_for_step(page, static.step)
            assert "No sharing in this run" in page.locator(".kvx-tree").text_content()
            assert page.locator(".kvx-kind").count() == 0
            assert "rows" in page.locator(".kvx-panel-map .kvx-ptitle").inner_text()  # a binned arena
            assert watch.console_errors == [] and watch.page_errors == []
        finally:
            browser.close()


def screenshot(trace_path: Path, out: Path = SCREENSHOT, step: int | None = None) -> Path:
    import tempfile

    from playwright.sync_api import sync_playwright

    from kvscope.widgets import explore

    widget = explore(trace_path, step=step)
    with sync_playwright() as p, tempfile.TemporaryDirectory() as tmp:
        browser = launch(p)
        try:
            page, _, _ = open_explorer(browser, widget, Path(tmp), width=1200, height=900)
            wait_for_step(page, widget.step)
            page.locator(".kvx").screenshot(path=str(out))
        finally:
            browser.close()
    return out


if __name__ == "__main__":  # python tests/test_explorer_browser.py [TRACE] [STEP] -> docs/view-explorer.png
    args = sys.argv[1:]
    print(screenshot(Path(args[0]) if args else SAMPLE, step=int(args[1]) if len(args) > 1 else None))
