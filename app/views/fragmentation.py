"""Fragmentation: every block / page / arena segment at the chosen step, and the whole run as a units x steps map."""

from __future__ import annotations

import streamlit as st
from kvscope.app import state

from kvscope.analysis.fragmentation import block_states, state_matrix
from kvscope.report import MAP_MAX_STEPS, MAP_MAX_UNITS  # the report's map resolution: both show the same cells
from kvscope.units import format_bytes
from kvscope.viz import block_grid_figure, fragmentation_map_figure

st.title("Fragmentation")
lt = state.focus_trace()
if lt is None:
    st.stop()
st.caption(f"{lt.title}. Pick a step: the grid shows each block or page at the end of it (hover for holders).")

step = state.step_slider(lt, label="Engine step", key="frag_step", default=state.peak_step(lt))
row = state.memory_at(lt, step)
if row is not None:
    cols = st.columns(5)
    cols[0].metric("reserved", format_bytes(int(row["reserved"])))
    cols[1].metric("used (token states)", format_bytes(int(row["used"])))
    cols[2].metric(
        "waste",
        format_bytes(int(row["waste"])),
        f"{100 * float(row['waste_frac']):.1f}% of reserved",
        delta_color="off",
        delta_arrow="off",
    )
    cols[3].metric("cached-idle", format_bytes(int(row["cached_idle"])))
    cols[4].metric("free", format_bytes(int(row["free"])))

state.show_figure(block_grid_figure(block_states(lt.trace, step), step=step), key="frag_grid")
st.subheader("The whole run")
st.caption("Every unit (vertical) at every step (horizontal), coloured by state; big runs are binned.")
state.show_figure(fragmentation_map_figure(state_matrix(lt.trace, MAP_MAX_UNITS, MAP_MAX_STEPS)), key="frag_map")
