"""KV events: the prefix cache of an imported or live-recorded vLLM KV-event stream (`kvscope import vllm-events`,
`kvscope listen`), one tab per view of the catalog, with what the events cannot see."""

from __future__ import annotations

import streamlit as st
from kvscope.app import state

from kvscope.analysis.cache import cannot_see
from kvscope.present.views import select

TABS = ["kv_cached", "kv_rates", "kv_tree", "kv_restored", "kv_lifetimes"]  # catalog keys

st.title("KV events")
lt = state.focus_trace()
if lt is None:
    st.stop()
st.caption(lt.title)

views = select(TABS)
if not views[0].applies(lt.trace):
    st.info(views[0].absent, icon="ℹ️")
    st.stop()
for tab, view in zip(st.tabs([v.label for v in views]), views, strict=True):
    with tab:
        state.show_view(lt, view, key=f"kv_{view.key}")
notes = cannot_see(lt.trace)
if notes:
    st.subheader("What these events cannot see")
    st.markdown("\n".join(f"- {state.plain(note)}" for note in notes))
