"""Fragmentation: every block / page / arena segment at the chosen step, and the whole run as a units x steps map."""

from __future__ import annotations

import streamlit as st
from kvscope.app import state

from kvscope.analysis.replay import pool_geometry
from kvscope.present.rows import format_value
from kvscope.present.views import VIEWS, fragmentation_map
from kvscope.units import format_bytes

st.title("Fragmentation")
lt = state.focus_trace()
if lt is None:
    st.stop()
st.caption(f"{lt.title}. Pick a step: the grid shows each block or page at the end of it (hover for holders).")

step = state.step_slider(lt, label="Engine step", key="frag_step")
row = state.memory_at(lt, step)
if row is not None:
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

state.show_view(lt, VIEWS["blocks"], key="frag_grid", step=step)
st.subheader("Block tables at this step")
state.show_view(lt, VIEWS["tables"], key="frag_tables", step=step)

st.subheader("The whole run")
view = VIEWS["fragmentation"]
if not view.applies(lt.trace):
    st.info(view.absent, icon="ℹ️")
else:
    # Zoom: the map re-bins the chosen window at the same resolution, so its cells get finer (drag-zooming a
    # binned picture only enlarges the bins).
    first, last = state.step_bounds(lt)
    units = pool_geometry(lt.trace).units or 1
    zoom_steps, zoom_units = None, None
    with st.expander("Zoom into a step and block range", expanded=False):
        if last > first:
            zoom_steps = st.slider("steps", first, last, (first, last), key=f"frag_zoom_steps:{lt.key}")
        if units > 1:
            zoom_units = st.slider(
                "blocks / pages / rows", 0, units - 1, (0, units - 1), key=f"frag_zoom_units:{lt.key}"
            )
    st.caption(view.caption)
    state.show_figure(fragmentation_map(lt.trace, zoom_steps, zoom_units), key="frag_map")
