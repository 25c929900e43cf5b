"""Figure builders: hand-made DataFrames with exactly the analysis contract's columns in, go.Figure out."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvscope.analysis.requests import PHASE_COLUMNS, lifetime_phases
from kvscope.viz import (
    STATE_COLORS,
    Metric,
    block_grid_figure,
    comparison_figure,
    driver_latency_figure,
    fragmentation_map_figure,
    memory_stack_figure,
    prefix_tree_figure,
    request_lifetimes_figure,
    sharing_graph_figure,
    throughput_figure,
)
from kvscope.viz._common import bin_steps
from kvscope.viz.palette import MEMORY_BANDS, state_label
from kvscope.viz.requests import SWAPPED_LABEL, _occupancy

XSS = "<script>alert(1)</script>"
MiB = 1024**2


# ---- hand-made contract frames ---------------------------------------------------------------------------------
def memory_frame(steps: int = 50) -> pd.DataFrame:
    s = np.arange(steps)
    capacity = np.full(steps, 64 * MiB)
    used = (s * MiB // 2).astype("int64")
    internal = np.full(steps, MiB)
    reservation = np.full(steps, 2 * MiB)
    mapped_idle = np.zeros(steps, dtype="int64")
    cached_idle = np.full(steps, 3 * MiB)
    reserved = used + internal + reservation + mapped_idle
    free = capacity - reserved - cached_idle
    return pd.DataFrame(
        {
            "step": s,
            "t_s": s * 0.01,
            "capacity": capacity,
            "reserved": reserved,
            "used": used,
            "logical": used + MiB,
            "internal": internal,
            "reservation": reservation,
            "mapped_idle": mapped_idle,
            "cached_idle": cached_idle,
            "free": free,
            "waste": reserved - used,
            "waste_frac": (reserved - used) / reserved,
            "block_usage_frac": reserved / capacity,
            "token_usage_frac": used / capacity,
        }
    )


def throughput_frame(steps: int = 40, tbps: bool = True) -> pd.DataFrame:
    s = np.arange(steps)
    return pd.DataFrame(
        {
            "step": s,
            "t_s": s * 0.02,
            "dur_s": np.full(steps, 0.02),
            "batch": np.minimum(s + 1, 8),
            "prefill_tokens": np.where(s % 10 == 0, 512, 0),
            "decode_tokens": np.minimum(s + 1, 8),
            "tokens_per_s": np.minimum(s + 1, 8) / 0.02,
            "kernel_ms": np.full(steps, 15.0),
            "kv_bytes_read": np.full(steps, 10**9),
            "achieved_tbps": np.full(steps, 2.8 if tbps else np.nan),
            "preemptions": np.where(s == 17, 2, 0),
            "driver_ms": np.zeros(steps),
        }
    )


def block_states_frame(n: int = 64, capacity: int = 16) -> pd.DataFrame:
    states = np.array(["free", "active", "shared", "cached_idle"])[np.arange(n) % 4]
    return pd.DataFrame(
        {
            "unit": np.arange(n),
            "state": states,
            "fill": np.where(states == "free", 0, 7),
            "capacity_tokens": capacity,
            "ref_count": np.where(states == "shared", 3, np.where(states == "active", 1, 0)),
            "seqs": np.where(states == "free", "", np.where(states == "shared", "1,2,3", "4")),
            "slot": -1,
        }
    )


def state_matrix_frame(units: int = 8, steps: int = 10) -> pd.DataFrame:
    rows = []
    for sb in range(steps):
        for ub in range(units):
            rows.append((sb * 5, ub * 16, "active", 0.75 if ub % 2 else 0.25))
            rows.append((sb * 5, ub * 16, "free", 0.25 if ub % 2 else 0.75))
    return pd.DataFrame(rows, columns=["step_bin", "unit_bin", "state", "fraction"])


def lifetimes_frame(n: int = 12) -> pd.DataFrame:
    i = np.arange(n)
    return pd.DataFrame(
        {
            "seq": i,
            "request_id": [XSS if k == 0 else f"req-{k}" for k in i],
            "parent": -1,
            "arrival_s": i * 0.1,
            "arrive_step": i,
            "admit_step": i + 2,
            "finish_step": np.where(i == n - 1, -1, i + 20),
            "prompt_len": 100,
            "output_len": 18,
            "preemptions": np.where(i == 3, 1, 0),
            "prefix_hit_tokens": 0,
        }
    )


def figure_json(fig: go.Figure) -> str:
    return fig.to_json()


def trace_colors(fig: go.Figure) -> dict[str, str]:
    """Legend name -> colour of every named trace."""
    out = {}
    for t in fig.data:
        if t.type not in ("scatter", "bar"):
            continue
        color = t.fillcolor if t.type == "scatter" and t.fillcolor else None
        color = color or (t.marker.color if isinstance(t.marker.color, str) else None)
        color = color or (t.line.color if t.type == "scatter" else None)
        if t.name:
            out[t.name] = color
    return out


# ---- memory stack ----------------------------------------------------------------------------------------------
def test_memory_stack_bands_add_up_to_capacity_and_name_both_usage_figures():
    df = memory_frame()
    fig = memory_stack_figure(df)
    bands = [t for t in fig.data if t.stackgroup == "memory"]
    # mapped-idle is zero throughout (not a VMM run): left out rather than drawn as an empty band
    assert [t.name for t in bands] == [state_label(b) for b in MEMORY_BANDS if b != "mapped_idle"]
    total = np.sum([np.asarray(t.y, dtype=float) for t in bands], axis=0)
    assert np.allclose(total, df["capacity"].to_numpy() / MiB)  # 64 MiB capacity -> MiB unit
    assert "MiB" in fig.layout.yaxis.title.text
    names = [t.name for t in fig.data]
    assert any("block usage" in n for n in names) and any("token-slot usage" in n for n in names)
    usage = next(t for t in fig.data if "block usage" in t.name)
    assert np.allclose(usage.y, 100 * df["block_usage_frac"])
    assert any("logical" in n for n in names)  # logical differs from used: sharing is visible
    assert fig.layout.title.text and fig.layout.xaxis.title.text.startswith("engine step")


def test_memory_stack_bins_long_runs_and_says_so():
    df = memory_frame(100_000)
    fig = memory_stack_figure(df, max_points=1000)
    assert all(len(t.x) <= 1000 for t in fig.data)
    assert "bin" in fig.layout.xaxis.title.text
    bands = [t for t in fig.data if t.stackgroup == "memory"]
    total = np.sum([np.asarray(t.y, dtype=float) for t in bands], axis=0)
    assert np.allclose(total, 64)  # means of bands still add up to the capacity


def test_missing_column_is_a_one_line_error_naming_it():
    with pytest.raises(ValueError, match="missing column.*token_usage_frac"):
        memory_stack_figure(memory_frame().drop(columns=["token_usage_frac"]))
    with pytest.raises(ValueError, match="expected a pandas DataFrame"):
        throughput_figure([1, 2, 3])


def test_empty_frames_give_a_figure_that_says_why():
    for fig in (
        memory_stack_figure(memory_frame().iloc[:0]),
        throughput_figure(throughput_frame().iloc[:0]),
        fragmentation_map_figure(state_matrix_frame().iloc[:0]),
        block_grid_figure(block_states_frame().iloc[:0], step=3),
        request_lifetimes_figure(lifetimes_frame().iloc[:0]),
        prefix_tree_figure(pd.DataFrame(columns=["node", "parent", "block", "depth", "hits"])),
        driver_latency_figure(pd.DataFrame(columns=["step", "kind", "dur_us"])),
    ):
        assert len(fig.data) == 0
        assert fig.layout.annotations and fig.layout.annotations[0].text.startswith("no ")


# ---- one palette -------------------------------------------------------------------------------------------------
def test_a_state_has_one_colour_in_every_view():
    mem = trace_colors(memory_stack_figure(memory_frame()))
    grid = block_grid_figure(block_states_frame())
    grid_colors = trace_colors(grid)
    assert mem[state_label("used")] == STATE_COLORS["used"] == grid_colors[state_label("active")]
    assert mem[state_label("cached_idle")] == grid_colors[state_label("cached_idle")] == STATE_COLORS["cached_idle"]
    # the heat map's colour scale uses the same colours as its legend swatches
    scale_colors = {c for _, c in grid.data[0].colorscale}
    assert {STATE_COLORS[s] for s in ("free", "active", "shared", "cached_idle")} <= scale_colors
    fmap = fragmentation_map_figure(state_matrix_frame())
    assert trace_colors(fmap)[state_label("active")] == STATE_COLORS["active"]


# ---- fragmentation ---------------------------------------------------------------------------------------------
def test_fragmentation_map_bands_each_cell_by_its_mix_of_states():
    """Each cell is cut into MAP_BANDS bands shared out by its states' shares (not coloured by the winner)."""
    from kvscope.viz.fragmentation import MAP_BANDS

    fig = fragmentation_map_figure(state_matrix_frame(units=8, steps=10))
    heat = fig.data[0]
    assert heat.type == "heatmap"
    z = np.asarray(heat.z, dtype=float)
    assert z.shape == (8 * MAP_BANDS, 10)
    names = [t.name for t in fig.data[1:] if t.type == "scatter"]
    active, free = names.index(state_label("active")), names.index(state_label("free"))
    cells = z.reshape(8, MAP_BANDS, 10)
    # 75% active -> 4 of 5 bands active; 25% active -> 1 band (largest remainder).
    assert np.all((cells[1::2] == active).sum(axis=1) == 4) and np.all((cells[0::2] == active).sum(axis=1) == 1)
    assert np.all((cells == active) | (cells == free))
    assert "%{customdata[" in heat.hovertemplate


def test_fragmentation_map_keeps_scattered_allocations_visible():
    """A state holding 3% of a big binned cell still gets a band (a dominant-state map showed it as all free)."""
    rows = [(0, 0, "active", 0.03), (0, 0, "free", 0.97), (0, 64, "free", 1.0)]
    fig = fragmentation_map_figure(pd.DataFrame(rows, columns=["step_bin", "unit_bin", "state", "fraction"]))
    z = np.asarray(fig.data[0].z, dtype=float)
    names = [t.name for t in fig.data[1:] if t.type == "scatter"]
    active = names.index(state_label("active"))
    assert (z[:, 0] == active).sum() == 1  # one band of the first cell, none of the all-free one


def test_fragmentation_map_fill_panel_shows_tokens_per_slot():
    matrix = state_matrix_frame(units=4, steps=3)
    fill = matrix.drop_duplicates(["step_bin", "unit_bin"])[["step_bin", "unit_bin"]].copy()
    fill["fill"] = np.where(fill["unit_bin"] == 16, 0.25, 1.0)
    fig = fragmentation_map_figure(matrix, fill)
    heats = [t for t in fig.data if t.type == "heatmap"]
    assert len(heats) == 2
    z = np.asarray(heats[1].z, dtype=float)
    assert z.shape == (4, 3) and np.allclose(z[1], 25.0) and np.allclose(z[0], 100.0)
    assert "fill" in heats[1].hovertemplate and state_label("active") in heats[1].hovertemplate
    assert any("fill" in (a.text or "") for a in fig.layout.annotations)


def test_block_grid_hover_names_holders_fill_and_ref_count():
    df = block_states_frame(64)
    df.loc[1, "seqs"] = XSS
    fig = block_grid_figure(df, step=12)
    heat = fig.data[0]
    assert "step 12" in fig.layout.title.text
    assert "ref count" in heat.hovertemplate and "fill" in heat.hovertemplate and "slot" not in heat.hovertemplate
    text = np.asarray(heat.text).ravel()
    assert any("seqs 1,2,3" in t for t in text)
    cells = np.asarray(heat.customdata).reshape(-1, 5)
    shared = cells[np.isfinite(cells[:, 0]) & (cells[:, 0] % 4 == 2)]
    assert np.all(shared[:, 3] == 3) and np.all(shared[:, 1] == 7) and np.all(shared[:, 2] == 16)
    assert XSS not in figure_json(fig) and "&lt;script&gt;" in figure_json(fig)


def test_block_grid_aggregates_big_pools_into_ranges():
    fig = block_grid_figure(block_states_frame(100_000), max_cells=4096)
    heat = fig.data[0]
    z = np.asarray(heat.z, dtype=float)
    assert np.isfinite(z).sum() <= 4096
    assert "units per cell" in fig.layout.title.text
    counts = np.asarray(heat.customdata).reshape(-1, 5)[:, 1:]
    assert np.nansum(counts) == 100_000  # every unit counted once


def test_static_segments_become_a_strip_with_token_widths():
    df = pd.DataFrame(
        {
            "unit": [0, 100, 130, 200],
            "state": ["used", "internal", "reservation", "free"],
            "fill": [100, 0, 0, 0],
            "capacity_tokens": [100, 30, 70, 824],
            "ref_count": [1, 0, 0, 0],
            "seqs": ["5", "5", "5", ""],
            "slot": [0, 0, 0, -1],
        }
    )
    fig = block_grid_figure(df)
    assert all(t.type == "bar" for t in fig.data)
    widths = {t.name: list(t.x) for t in fig.data}
    assert widths[state_label("free")] == [824] and widths[state_label("used")] == [100]
    assert fig.layout.xaxis.title.text == "token slot in the arena"


# ---- sharing ---------------------------------------------------------------------------------------------------
def test_sharing_graph_links_sequences_to_shared_blocks_only():
    edges = pd.DataFrame({"seq": [1, 2, 3, 1, 4], "block": [10, 10, 10, 11, 12], "ref_count": [3, 3, 3, 1, 1]})
    fig = sharing_graph_figure(edges, step=5)
    seqs = next(t for t in fig.data if t.name == "sequence")
    blocks = next(t for t in fig.data if t.name.startswith("shared block"))
    assert sorted(c[0] for c in seqs.customdata) == [1, 2, 3]  # seq 4 holds no shared block
    assert [c[0] for c in blocks.customdata] == [10] and blocks.customdata[0][1] == 3
    assert blocks.marker.color == STATE_COLORS["shared"]
    assert list(blocks.text) == ["1, 2, 3"]


def test_sharing_graph_without_sharing_and_past_the_cap():
    none = sharing_graph_figure(pd.DataFrame({"seq": [1], "block": [2], "ref_count": [1]}), step=0)
    assert "no block is shared" in none.layout.annotations[0].text
    rng = np.random.default_rng(0)
    rows = [(s, b, 2 + b % 5) for b in range(1000) for s in rng.choice(50, 2 + b % 5, replace=False)]
    edges = pd.DataFrame(rows, columns=["seq", "block", "ref_count"])
    fig = sharing_graph_figure(edges, max_blocks=100)
    blocks = next(t for t in fig.data if t.name.startswith("shared block"))
    assert len(blocks.x) == 100 and "100 most shared of 1000" in fig.layout.title.text
    assert {c[1] for c in blocks.customdata} == {6}  # the most shared blocks kept


def test_prefix_tree_places_children_deeper_and_colours_hits():
    tree = pd.DataFrame(
        {
            "node": [0, 1, 2, 3, 4],
            "parent": [-1, 0, 0, 1, -1],
            "block": [5, 6, 7, 8, 9],
            "depth": [1, 2, 2, 3, 1],
            "hits": [10, 4, 1, 0, 2],
        }
    )
    fig = prefix_tree_figure(tree, block_size=16)
    nodes = fig.data[1]
    x = dict(zip(np.asarray(nodes.customdata)[:, 0].astype(int), nodes.x, strict=True))
    assert x[3] == 48 and x[0] == 16  # depth x block size
    assert "tokens" in fig.layout.xaxis.title.text
    assert np.allclose(np.asarray(nodes.marker.color, dtype=float), np.log10(1 + np.array([10, 4, 1, 0, 2])))
    assert list(nodes.marker.colorbar.ticktext) == ["0", "10", "100"]  # log colour scale labelled in hits
    edge_x = [v for v in fig.data[0].x if v is not None]
    assert len(edge_x) == 3 * 2 * 2  # links 0->1, 0->2, 1->3, each an elbow of 2 segments of 2 points
    big = pd.DataFrame(
        {"node": np.arange(5000), "parent": np.r_[-1, np.arange(4999) // 2], "block": 0, "depth": 0, "hits": 0}
    )
    big["hits"] = np.arange(5000) % 7
    capped = prefix_tree_figure(big, max_nodes=300)
    assert len(capped.data[1].x) <= 300 + 20 and "most hit" in capped.layout.title.text


# ---- throughput, requests, driver, comparison ------------------------------------------------------------------
def test_throughput_rows_and_preemption_markers():
    fig = throughput_figure(throughput_frame())
    names = [t.name for t in fig.data]
    for expected in ("tokens/s", "prefill tokens", "decode tokens", "batch size (sequences)", "preemption(s)"):
        assert expected in names
    pre = fig.data[names.index("preemption(s)")]
    assert list(pre.x) == [17] and list(pre.customdata) == [2]
    assert any("TB/s" in n for n in names)
    axis_titles = [fig.layout[k].title.text for k in fig.layout if k.startswith("yaxis")]
    assert "TB/s" in axis_titles and "tokens/s" in axis_titles and "ms" in axis_titles
    no_tbps = throughput_figure(throughput_frame(tbps=False))
    assert not any("TB/s" in (t.name or "") for t in no_tbps.data)
    binned = throughput_figure(throughput_frame(50_000), max_points=500)
    assert all(len(t.x) <= 500 for t in binned.data)
    marks = next(t for t in binned.data if t.name == "preemption(s)")
    assert sum(marks.customdata) == 2  # preemptions are summed per bin, not averaged away


def test_request_gantt_rows_states_and_escaped_ids():
    lt = lifetimes_frame(12)
    fig = request_lifetimes_figure(lt)
    names = [t.name for t in fig.data]
    assert state_label("waiting") in names and state_label("running") in names
    assert "running, preempted at least once" in names and state_label("unfinished") in names
    running = fig.data[names.index(state_label("running"))]
    # request 1: admitted at step 3, finished at step 21 -> holds KV for steps 3..21 (19 steps)
    k = list(running.y).index(1)
    assert running.base[k] == 3 and running.x[k] == 19
    unfinished = fig.data[names.index(state_label("unfinished"))]
    assert unfinished.base[0] + unfinished.x[0] == 30 + 1  # drawn through the last known step (a finish at 30)
    explicit = request_lifetimes_figure(lt, last_step=99)
    assert explicit.data[names.index(state_label("unfinished"))].x[0] == 100 - 13
    j = figure_json(fig)
    assert XSS not in j and "&lt;script&gt;alert(1)&lt;" in j
    assert list(fig.layout.yaxis.ticktext)[0] == "&lt;script&gt;alert(1)&lt;/script&gt;"


def test_request_lifetimes_aggregate_many_requests():
    n = 5000
    lt = lifetimes_frame(n)
    lt["arrive_step"] = 0
    lt["admit_step"] = 0
    lt["finish_step"] = 99  # everyone holds KV for steps 0..99
    fig = request_lifetimes_figure(lt, max_requests=1000)
    heat = fig.data[0]
    assert heat.type == "heatmap" and "aggregated" in fig.layout.title.text
    z = np.asarray(heat.z, dtype=float)
    assert z.shape[0] <= 120 and z.shape[1] <= 400
    assert np.allclose(z, 1.0)


def test_request_gantt_draws_the_phases_it_is_given():
    lt = lifetimes_frame(4)
    phases = pd.DataFrame(
        [
            (0, "waiting", 0, 2, False),
            (0, "running", 2, 21, False),
            (1, "waiting", 1, 3, False),
            (1, "running", 3, 5, False),
            (1, "swapped", 5, 8, False),
            (1, "running", 8, 22, False),
            (2, "waiting", 2, 4, False),
            (2, "running", 4, 23, False),
            (3, "waiting", 3, 5, False),
            (3, "running", 5, 24, True),
        ],
        columns=PHASE_COLUMNS,
    )
    fig = request_lifetimes_figure(lt, phases)
    by_name = {t.name: t for t in fig.data}
    swapped = by_name[SWAPPED_LABEL]
    assert list(swapped.y) == [1] and list(swapped.base) == [5] and list(swapped.x) == [3]
    running = by_name[state_label("running")]
    assert sorted(running.y) == [0, 1, 1, 2]  # seq 1 runs before and after its swap
    assert list(by_name[state_label("unfinished")].base) == [5]
    assert "running, preempted at least once" not in by_name  # seq 3, the preempted one, is unfinished
    with pytest.raises(ValueError, match="request phases"):
        request_lifetimes_figure(lt, phases.drop(columns="open"))


def test_request_gantt_without_phases_draws_the_lifetime_phases():
    lt = lifetimes_frame(12)
    implied = request_lifetimes_figure(lt, lifetime_phases(lt))
    assert figure_json(request_lifetimes_figure(lt)) == figure_json(implied)


@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(0, 30)), min_size=1, max_size=30),
    st.integers(1, 7),
)
def test_occupancy_matches_counting_steps(intervals, width):
    start = np.array([a for a, _ in intervals], dtype=float)
    stop = start + np.array([d for _, d in intervals], dtype=float)
    edges = np.arange(0, 81 + width, width, dtype=float)
    got = _occupancy(start, stop, edges)
    steps = np.arange(edges[-1])
    covered = ((steps[None, :] >= start[:, None]) & (steps[None, :] < stop[:, None])).sum(axis=0)
    expected = np.add.reduceat(covered, np.arange(0, len(steps), width))
    assert np.allclose(got, expected)


@given(st.integers(1, 5000), st.integers(10, 500))
def test_bin_steps_bounds_rows_and_keeps_sums(rows, max_points):
    df = pd.DataFrame({"step": np.arange(rows), "v": np.ones(rows), "c": np.ones(rows)})
    out, width = bin_steps(df, max_points, {"v": "mean", "c": "sum"})
    assert len(out) <= max_points
    assert out["c"].sum() == rows and np.allclose(out["v"], 1.0)
    assert (width == 1) == (rows <= max_points)


def test_driver_histogram_counts_every_call_per_kind():
    rng = np.random.default_rng(1)
    calls = pd.DataFrame(
        {
            "step": np.arange(3000) % 100,
            "kind": np.repeat(["page_create", "page_map", "page_access"], 1000),
            "dur_us": np.concatenate([rng.lognormal(np.log(m), 0.2, 1000) for m in (11.6, 2.7, 28.0)]),
        }
    )
    fig = driver_latency_figure(calls)
    assert len(fig.data) == 3 and fig.layout.xaxis.type == "log"
    for t in fig.data:
        assert "1,000 calls" in t.name
        assert np.asarray(t.y)[::2].sum() == 1000  # each bin's count appears twice (step outline)
    assert "cuMemMap" in " ".join(t.name for t in fig.data)


def test_comparison_bars_one_colour_per_run_and_escaped_labels():
    runs = pd.DataFrame(
        {
            "label": ["paged b16", "vmm 2 MiB", XSS],
            "peak_reserved_bytes": [3 * 1024**3, 2 * 1024**3, 4 * 1024**3],
            "peak_used_bytes": [2 * 1024**3, 2 * 1024**3, 1024**3],
            "mean_waste_fraction": [0.03, 0.1, 0.6],
            "preemptions": [0, 1, 5],
        }
    )
    fig = comparison_figure(runs)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 4 and all(b.orientation == "h" for b in bars)  # run names on the y axis, once
    reserved = bars[0]
    assert np.allclose(reserved.x, [3, 2, 4])  # GiB
    assert list(reserved.text) == ["3", "2", "4"]  # the value is written on the bar
    assert "GiB" in fig.layout.annotations[0].text
    waste = bars[2]
    assert np.allclose(waste.x, [3, 10, 60])
    assert all(list(b.marker.color) == list(bars[0].marker.color) for b in bars)
    assert fig.layout.yaxis.autorange == "reversed"  # the first run on top, as in the tables
    j = figure_json(fig)
    assert XSS not in j and "&lt;script&gt;" in j
    assert "no runs" in comparison_figure(runs.iloc[:0]).layout.annotations[0].text


def test_every_figure_serializes_to_json_under_a_size_bound():
    figs = [
        memory_stack_figure(memory_frame(200_000)),
        throughput_figure(throughput_frame(200_000)),
        block_grid_figure(block_states_frame(1_000_000)),
        request_lifetimes_figure(lifetimes_frame(100_000)),
    ]
    for fig in figs:
        payload = figure_json(fig)
        json.loads(payload)
        assert len(payload) < 1_500_000, (fig.layout.title.text, len(payload))


def test_forked_samples_sit_under_their_request():
    lt = lifetimes_frame(4)
    # seq 4 and 5 were forked from seq 1 at its admission: no arrival of their own
    forks = lt.iloc[[1, 1]].assign(seq=[4, 5], parent=[1, 1], arrive_step=-1, admit_step=3, request_id="req-1")
    lt = pd.concat([lt.assign(root=lt["seq"]), forks.assign(root=1)], ignore_index=True)
    fig = request_lifetimes_figure(lt)
    running = next(t for t in fig.data if t.name == state_label("running"))
    rows = dict(zip(np.asarray(running.customdata)[:, 0].astype(int), running.y, strict=True))
    assert [s for s, _ in sorted(rows.items(), key=lambda kv: kv[1])] == [0, 1, 4, 5, 2]
    assert "4 requests, 6 sequences" in fig.layout.title.text
    assert "parent seq" in running.hovertemplate


def test_comparison_lists_figures_equal_in_every_run_instead_of_drawing_them():
    runs = pd.DataFrame({"label": ["a", "b"], "peak_reserved_bytes": [1, 2], "finished": [7, 7]})
    fig = comparison_figure(runs)
    titles = [a.text for a in fig.layout.annotations]
    assert "peak KV reserved (B)" in titles and not any(t.startswith("requests finished") for t in titles)
    assert any(t.startswith("Equal in every run: requests finished 7 requests") for t in titles)


def test_comparison_leaves_out_panels_where_every_run_is_zero():
    runs = pd.DataFrame({"label": ["a", "b"], "peak_reserved_bytes": [1, 2], "prefix_hit_tokens": [0, 0]})
    fig = comparison_figure(runs)
    assert [a.text for a in fig.layout.annotations] == ["peak KV reserved (B)"]
    asked = comparison_figure(runs, metrics=[Metric("prefix_hit_tokens", "prefix hits", "tokens")])
    assert [a.text for a in asked.layout.annotations] == ["prefix hits (tokens)"]


def test_memory_stack_draws_in_step_peaks_as_step_lines_binned_by_max():
    df = memory_frame(40)
    df["peak_used"] = df["used"] + 5 * MiB
    df["peak_reserved"] = df["reserved"] + 7 * MiB
    df.loc[13, "peak_reserved"] = 60 * MiB  # one step's spike must survive binning
    fig = memory_stack_figure(df)
    lines = {t.name: t for t in fig.data if t.name and t.name.startswith("in-step peak")}
    assert set(lines) == {"in-step peak reserved", "in-step peak used"}
    assert lines["in-step peak reserved"].line.shape == "hv"
    assert np.allclose(lines["in-step peak used"].y, df["peak_used"] / MiB)
    binned = memory_stack_figure(df, max_points=10)
    spike = next(t for t in binned.data if t.name.startswith("in-step peak reserved"))
    assert np.isclose(np.max(spike.y), 60) and "max of each" in spike.name
    without = memory_stack_figure(memory_frame(40))  # an older trace's timeline: no peak columns, no lines
    assert not any(t.name and t.name.startswith("in-step peak") for t in without.data)


def test_prompt_misses_bars_add_up_to_each_prompt_and_name_the_eviction():
    from kvscope.viz.prefix_misses import OUTCOMES, prefix_misses_figure

    requests = pd.DataFrame(
        {
            "seq": [0, 1],
            "prompt_tokens": [40, 40],
            "hit_gpu": [0, 16],
            "hit_cpu": [0, 8],
            "cold": [32, 0],
            "evicted": [0, 8],
            "gap": [0, 0],
            "floor": [8, 8],
        }
    )
    blocks = pd.DataFrame(
        {
            "seq": [0, 0, 1],
            "position": [0, 1, 2],
            "hash": [1, 2, 2],
            "cause": ["cold", "cold", "evicted"],
            "evicted_step": [-1, -1, 7],
            "evicted_s_before": [0.0, 0.0, 0.25],
        }
    )
    fig = prefix_misses_figure(requests, blocks)
    assert [t.name for t in fig.data] == [label for _, label, _ in OUTCOMES]
    totals = np.sum([np.asarray(t.y) for t in fig.data], axis=0)
    assert totals.tolist() == [40, 40]
    assert "latest eviction at step 7" in fig.data[0].customdata[1] and "evicted" not in fig.data[0].customdata[0]
    many = pd.concat([requests.assign(seq=requests["seq"] + 2 * i) for i in range(2000)], ignore_index=True)
    binned = prefix_misses_figure(many)
    assert len(binned.data[0].x) <= 1500 and np.sum([np.asarray(t.y) for t in binned.data]) == 80 * 2000
    assert "no prompt tokens" in prefix_misses_figure(requests.iloc[:0]).layout.annotations[0].text
