"""Sharing: which sequences hold which shared blocks at a step, the prefix-cache tree, and forked samples."""

from __future__ import annotations

import streamlit as st
from kvscope.app import memo, state
from kvscope.app.state import LoadedTrace

from kvscope.analysis.sharing import fork_tree, prefix_stats
from kvscope.present.rows import format_value
from kvscope.present.views import VIEWS, View
from kvscope.units import format_bytes


@st.fragment
def at_step(lt: LoadedTrace, graph: View) -> None:
    """The sharing graph at the slider's step: a fragment, so a step move reruns only this part of the page."""
    step = state.step_slider(lt, label="Engine step", key="share_step", default=graph.snapshot_step(lt.trace))
    row = state.memory_at(lt, step)
    if row is not None:
        st.metric("Saved by sharing at this step (logical - used)", format_bytes(int(row["sharing_saved"])))
    memo.show_stepped(lt, graph, "share_graph", step)
    memo.prefetch_around(lt, [graph], step, slider="share_step")


st.title("Sharing")
lt = state.focus_trace()
if lt is None:
    st.stop()
st.caption(lt.title)

graph = VIEWS["sharing"]
if graph.applies(lt.trace):
    at_step(lt, graph)
else:
    st.info(graph.absent, icon="ℹ️")

st.subheader("Prefix cache")
stats = prefix_stats(lt.trace)
if stats.get("enabled"):
    cols = st.columns(4)
    cols[0].metric("hit tokens", format_value(stats, "hit_tokens", "int"))
    cols[1].metric("hit rate", format_value(stats, "hit_rate", "pct"))
    cols[2].metric("requests with hits", format_value(stats, "requests_with_hits", "int"))
    cols[3].metric("evictions", format_value(stats, "evictions", "int"))
state.show_view(lt, VIEWS["prefix"], key="share_prefix")

forks = fork_tree(lt.trace)
st.subheader("Forked sequences")
if forks.empty:
    st.caption("No sequence was forked in this run.")
else:
    st.dataframe(forks, hide_index=True, key="share_forks")
