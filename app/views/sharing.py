"""Sharing: which sequences hold which shared blocks at a step, the prefix-cache tree, and forked samples."""

from __future__ import annotations

import streamlit as st
from kvscope.app import state

from kvscope.analysis.sharing import fork_tree, prefix_stats, prefix_tree, sharing_edges
from kvscope.viz import prefix_tree_figure, sharing_graph_figure

st.title("Sharing")
lt = state.focus_trace()
if lt is None:
    st.stop()
st.caption(
    f"{lt.title}. Blocks shared by forked samples (parallel sampling, beam search) and by prefix-cache hits; "
    "only the paged allocator shares blocks."
)

default = state.peak_step(lt, "sharing_saved") or state.peak_step(lt)
step = state.step_slider(lt, label="Engine step", key="share_step", default=default)
row = state.memory_at(lt, step)
if row is not None:
    from kvscope.units import format_bytes

    st.metric("Saved by sharing at this step (logical - used)", format_bytes(int(row["sharing_saved"])))
state.show_figure(sharing_graph_figure(sharing_edges(lt.trace, step), step=step), key="share_graph")

stats = prefix_stats(lt.trace)
st.subheader("Prefix cache")
if not stats.get("enabled"):
    st.info("Prefix caching was off in this run (or the allocator has none).")
else:
    cols = st.columns(4)
    cols[0].metric("hit tokens", f"{stats['hit_tokens']:,}")
    cols[1].metric("hit rate", f"{100 * stats['hit_rate']:.1f}%")
    cols[2].metric("requests with hits", f"{stats['requests_with_hits']:,}")
    cols[3].metric("evictions", f"{stats.get('evictions', 0):,}")
    block_size = (lt.trace.meta.get("allocator_config") or {}).get("block_size")
    state.show_figure(prefix_tree_figure(prefix_tree(lt.trace), block_size=block_size), key="share_prefix")

forks = fork_tree(lt.trace)
st.subheader("Forked sequences")
if forks.empty:
    st.caption("No sequence was forked in this run.")
else:
    st.dataframe(forks, hide_index=True, key="share_forks")
