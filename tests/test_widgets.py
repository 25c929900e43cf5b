"""The notebook explorer's model (kvscope.widgets.TraceExplorer, an anywidget): its traits carry the analysis layer's
numbers, a cursor change answers with that step's data, payloads stay small on a big pool, the tree follows the run,
and the summary table matches `kvscope summary`. The front end is tested in tests/test_explorer_browser.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("anywidget")

from sim_runs import record  # noqa: E402

from kvscope.present.explorer import MAX_CELLS, NO_FILL  # noqa: E402
from kvscope.present.tables import summary_frame  # noqa: E402
from kvscope.trace import load_trace  # noqa: E402
from kvscope.widgets import ESM_PATH, TraceExplorer, explore  # noqa: E402


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    d = tmp_path_factory.mktemp("widget-traces")
    return load_trace(record(d / "paged.kvtrace", "-w", "parallel", "-n", "16", "-a", "paged", "--kv-memory", "96MiB"))


def cells(ex: TraceExplorer) -> tuple[np.ndarray, np.ndarray]:
    k = len(ex.meta["states"])
    mix = np.frombuffer(base64.b64decode(ex.step_data["cells"]["mix"]), np.uint8).reshape(-1, k)
    fill = np.frombuffer(base64.b64decode(ex.step_data["cells"]["fill"]), np.uint8)
    return mix, fill


def test_explorer_starts_at_the_peak_with_the_whole_run_sent_once(trace):
    from kvscope.analysis.memory import memory_timeline

    ex = explore(trace)
    assert isinstance(ex, TraceExplorer)
    tl = memory_timeline(trace)
    assert (ex.meta["first"], ex.meta["last"]) == (tl["step"].min(), tl["step"].max())
    assert ex.step == tl.loc[tl["reserved"].idxmax(), "step"] == ex.meta["start"]
    assert ex.step_data["step"] == ex.step
    assert [s["key"] for s in ex.meta["states"]] == ["active", "shared", "cached_idle", "free"]  # palette order
    # The timeline: the memory stack as shares of capacity, bands adding up to the whole pool.
    bands = {b["key"]: np.array(b["y"]) for b in ex.timeline["bands"]}
    assert {"used", "free"} <= set(bands) and np.allclose(sum(bands.values()), 1.0, atol=1e-3)
    assert len(ex.timeline["x"]) == len(tl)  # a short run is not binned
    # The ESM is inline (no CDN): anywidget ships the module text itself.
    assert (
        ex._esm == ESM_PATH.read_text()
        and "export default" in ex._esm
        and "http" not in ex._esm.replace("http://www.w3.org/2000/svg", "")
    )


def test_cursor_change_answers_with_that_steps_data(trace):
    from kvscope.analysis.fragmentation import block_states
    from kvscope.analysis.memory import memory_timeline
    from kvscope.units import format_bytes

    ex = explore(trace, step=2)
    before = dict(ex.step_data)
    seen = []
    ex.observe(lambda change: seen.append(change["new"]["step"]), names="step_data")
    ex.step = 9  # what the front end's slider does
    assert seen == [9] and ex.step_data["step"] == 9
    assert ex.step_data["cells"] != before["cells"] and ex.step_data["readout"] != before["readout"]
    # The map's cells are the analysis layer's block states: one cell per block (a small pool is not binned).
    states = block_states(trace, 9)
    mix, fill = cells(ex)
    assert len(mix) == len(states) == trace.meta["allocator_config"]["num_blocks"] == ex.blocks["cells"]
    keys = [s["key"] for s in ex.meta["states"]]
    got = [keys[i] for i in mix.argmax(axis=1)]
    assert got == states.sort_values("unit")["state"].astype(str).tolist()
    assert (mix.sum(axis=1) == 255).all()
    reserved = states["state"].astype(str).isin(["active", "shared"]).to_numpy()
    assert (fill[~reserved] == NO_FILL).all()
    expect = np.round(states["fill"].to_numpy() / states["capacity_tokens"].to_numpy() * 254)[reserved]
    assert np.array_equal(fill[reserved], expect.astype(np.uint8))
    row = memory_timeline(trace).set_index("step").loc[9]
    assert f"reserved {format_bytes(int(row['reserved']))}" in ex.step_data["readout"]
    # Out of range steps are clamped to the run; the same step asked twice sends nothing.
    ex.step = 10_000
    assert ex.step == ex.meta["last"] == ex.step_data["step"]
    n = len(seen)
    ex.step = ex.meta["last"]
    assert len(seen) == n


def test_a_clicked_cell_says_what_it_holds(trace):
    ex = explore(trace, step=5)
    ex.probe = 0
    assert ex.probe_text.startswith("block 0 at step 5:") and "tokens, ref" in ex.probe_text
    ex.step = 6  # the details follow the cursor
    assert ex.probe_text.startswith("block 0 at step 6:")
    ex.probe = -1
    assert ex.probe_text == ""


def test_fork_families_follow_the_cursor(trace):
    from kvscope.analysis.sharing import fork_tree

    ex = explore(trace, step=5)
    assert ex.meta["tree_kinds"] == [{"key": "forks", "label": "Fork families"}] and ex.tree_kind == "forks"
    assert [x["key"] for x in ex.tree["legend"]] == ["alive", "ended"]
    t = ex.step_data["tree"]
    assert t["kind"] == "forks" and len(t["states"]) == len(t["boxes"]["level"]) > 0
    forked = set(fork_tree(trace)["child"])
    shown = {int(w) for h in t["boxes"]["hover"] for w in h.split(":")[0].removeprefix("seq ").split(" → ")}
    assert shown & forked  # the boxes are the forked sequences (and the requests they came from)
    last = ex.meta["last"]
    ex.step = last  # after the run every sequence has finished: nothing left to show
    assert ex.step_data["tree"]["boxes"]["level"] == [] and "no forked sequence" in ex.step_data["tree"]["note"]
    with pytest.raises(ValueError, match="tree 'prefix' does not apply"):
        explore(trace, tree="prefix")


def test_prefix_tree_states_change_with_the_step():
    sample = Path(__file__).resolve().parent.parent / "sample_runs" / "paged-sharing.kvtrace"
    ex = explore(load_trace(sample), step=0)
    assert ex.tree_kind == "prefix" and ex.tree["boxes"] is not None
    n = len(ex.tree["boxes"]["level"])
    first = ex.step_data["tree"]["states"]
    ex.step = 105
    later = ex.step_data["tree"]["states"]
    assert len(first) == len(later) == n and first != later
    assert 0 in first and 0 not in later[:1]  # prefixes not computed yet at step 0; the system prompt is by 105
    ex.tree_kind = "forks"  # a run with both trees offers both
    assert ex.tree["kind"] == ex.step_data["tree"]["kind"] == "forks"
    ex.tree_kind = "nope"  # an unknown kind falls back to the default
    assert ex.tree_kind == "prefix"


def test_big_pools_are_binned_and_payloads_stay_small(tmp_path):
    # 16 GiB of Llama-3-8B KV in 16-token blocks: 8,192 blocks, binned into MAX_CELLS cells.
    path = record(tmp_path / "big.kvtrace", "-w", "sharegpt", "-n", "64", "-a", "paged", "--kv-memory", "16GiB")
    ex = explore(path)
    assert ex.blocks["cells"] == MAX_CELLS and ex.blocks["binned"] and ex.blocks["units"] == 8192
    mix, fill = cells(ex)
    assert mix.shape == (MAX_CELLS, len(ex.meta["states"]))
    assert len(json.dumps(ex.step_data)) < 20_000  # what travels per cursor move
    assert len(json.dumps(ex.timeline)) < 40_000 and len(json.dumps(ex.blocks)) < 20_000
    assert ex.tree_kind == "" and ex.step_data["tree"] == {"kind": ""}  # nothing shared: no tree


def test_terminal_gets_text_and_notebooks_the_widget(trace, monkeypatch):
    ex = explore(trace)
    monkeypatch.setenv("KVSCOPE_FRONTEND", "text")
    data, _ = ex._repr_mimebundle_()
    assert list(data) == ["text/plain"] and "widgets need a notebook frontend" in data["text/plain"]
    monkeypatch.setenv("KVSCOPE_FRONTEND", "rich")
    data, _ = ex._repr_mimebundle_()
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == ex.model_id
    assert data["text/plain"].startswith(f"kvscope explorer of {trace.name}: step {ex.step:,}:")
    assert repr(ex) == f"<kvscope explorer of {trace.name} at step {ex.step}>"


def test_explorer_accepts_a_path_and_is_exported(trace):
    import kvscope

    ex = kvscope.explore(trace.path, step=3)
    assert ex.trace.name == trace.name and ex.step == 3


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


def test_static_arena_is_a_strip_of_rows(tmp_path):
    static = explore(record(tmp_path / "static.kvtrace", "-w", "alpaca", "-n", "8", "-a", "static"))
    assert static.blocks["unit"] == "row" and static.tree_kind == ""
    assert [s["key"] for s in static.meta["states"]] == ["used", "internal", "reservation", "free"]
    static.probe = 0
    assert static.probe_text.startswith("row") and "rows 0–" in static.probe_text
