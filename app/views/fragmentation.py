"""Fragmentation: every block / page / arena segment at the chosen step, and the whole run as a units x steps map.

The step slider and the zoom controls each live in a fragment (st.fragment): moving one reruns only its part of
the page, so a step move redraws the grid and the block tables without touching the whole-run map, and a zoom
redraws only the map. Figures come through kvscope.app.memo: the map is cached per trace and window, the stepped
views per step, and the steps next to the one shown are built in the background for the next move.
"""

from __future__ import annotations

import streamlit as st
from kvscope.app import memo, state
from kvscope.app.state import LoadedTrace

from kvscope.analysis.replay import pool_geometry
from kvscope.present.rows import format_value
from kvscope.present.views import VIEWS
from kvscope.units import format_bytes


def step_metrics(lt: LoadedTrace, step: int) -> None:
    """The allocator's books at the end of `step` (kvscope.analysis.memory's timeline row)."""
    row = state.memory_at(lt, step)
    if row is None:
        return
    cols = st.columns(5)
    cols[0].metric("reserved", format_bytes(int(row["reserved"])))
    cols[1].metric("used (token states)", format_bytes(int(row["used"])))
    cols[2].metric(
        "waste",
        format_bytes(int(row["waste"])),
        f"{format_value(row, 'waste_frac', 'pct')} of reserved",
        delta_color="off",
        delta_arrow="off",
    )
    cols[3].metric("cached-idle", format_bytes(int(row["cached_idle"])))
    cols[4].metric("free", format_bytes(int(row["free"])))


@st.fragment
def at_step(lt: LoadedTrace) -> None:
    step = state.step_slider(lt, label="Engine step", key="frag_step")
    step_metrics(lt, step)
    memo.show_stepped(lt, VIEWS["blocks"], "frag_grid", step)
    st.subheader("Block tables at this step")
    memo.show_stepped(lt, VIEWS["tables"], "frag_tables", step)
    memo.prefetch_around(lt, [VIEWS["blocks"], VIEWS["tables"]], step, slider="frag_step")


def _zoomed(value: tuple[int, int], lo: int, hi: int) -> tuple[int, int] | None:
    """A zoom slider's (first, last), None when it spans everything (the unzoomed map: one cache entry)."""
    first, last = int(value[0]), int(value[1])
    return None if (first, last) == (lo, hi) else (first, last)


@st.fragment
def whole_run(lt: LoadedTrace) -> None:
    st.subheader("The whole run")
    view = VIEWS["fragmentation"]
    if not view.applies(lt.trace):
        st.info(view.absent, icon="ℹ️")
        return
    # Zoom: the map re-bins the chosen window at the same resolution, so its cells get finer (drag-zooming a
    # binned picture only enlarges the bins).
    first, last = state.step_bounds(lt)
    units = pool_geometry(lt.trace).units or 1
    zoom_steps, zoom_units = None, None
    with st.expander("Zoom into a step and block range", expanded=False):
        if last > first:
            value = st.slider("steps", first, last, (first, last), key=f"frag_zoom_steps:{lt.key}")
            zoom_steps = _zoomed(value, first, last)
        if units > 1:
            value = st.slider("blocks / pages / rows", 0, units - 1, (0, units - 1), key=f"frag_zoom_units:{lt.key}")
            zoom_units = _zoomed(value, 0, units - 1)
    st.caption(view.caption)
    state.show_figure(memo.fragmentation_map(lt, zoom_steps, zoom_units), key="frag_map")


st.title("Fragmentation")
focus = state.focus_trace()
if focus is None:
    st.stop()
st.caption(f"{focus.title}. Pick a step: the grid shows each block or page at the end of it (hover for holders).")
at_step(focus)
whole_run(focus)
