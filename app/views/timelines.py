"""Timelines: memory bands over the run, throughput, request lifetimes and driver-call latency, one tab each."""

from __future__ import annotations

import streamlit as st
from kvscope.app import state

from kvscope.present.views import select

TABS = ["memory", "throughput", "requests", "driver"]  # catalog keys

st.title("Timelines")
lt = state.focus_trace()
if lt is None:
    st.stop()
st.caption(lt.title)

views = select(TABS)
for tab, view in zip(st.tabs([v.label for v in views]), views, strict=True):
    with tab:
        state.show_view(lt, view, key=f"tl_{view.key}")
