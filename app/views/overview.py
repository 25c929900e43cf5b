"""Overview & comparison: the `kvscope summary` table for every loaded trace, the comparison figure, metadata."""

from __future__ import annotations

import streamlit as st
from kvscope.app import state

from kvscope.present.views import COMPARISON

st.title("kvscope: overview & comparison")
traces = state.session_traces()
if not traces:
    state.no_traces_message()
    st.stop()

titles = state.display_titles(traces)
# Traces loaded since the last run (an upload, a new file) join the comparison; ones the user removed stay out.
seen = st.session_state.get("overview_seen", set())
if "overview_runs" in st.session_state:
    kept = [k for k in st.session_state["overview_runs"] if k in titles]
    st.session_state["overview_runs"] = kept + [k for k in titles if k not in seen and k not in kept]
else:
    st.session_state["overview_runs"] = list(titles)
st.session_state["overview_seen"] = set(titles)
chosen_keys = st.multiselect("Runs to compare", list(titles), format_func=titles.__getitem__, key="overview_runs")
chosen = [lt for lt in traces if lt.key in chosen_keys]
if not chosen:
    st.info("Pick at least one run above.")
    st.stop()

st.subheader("Summary")
st.caption("The same rows as `kvscope summary` and the HTML report.")
# height="content": every summary row on the page, no inner scroll.
# The summary reads every event of every chosen run (the first page of a big trace waits on it): say so meanwhile.
with st.spinner(f"Summarising {len(chosen)} run{'s' if len(chosen) > 1 else ''}…"):
    summary = state.summary_frame(chosen)
st.dataframe(summary, height="content", key="overview_summary")

if len(chosen) > 1:
    compared = [lt.trace for lt in chosen]
    verdict = COMPARISON.verdict(compared)
    st.subheader(COMPARISON.verdict_title)
    for warning in verdict.warnings:
        st.warning(state.plain(f"Warning: {warning}"), icon="⚠️")
    for sentence in verdict.sentences:
        st.markdown(state.plain(sentence))
    st.subheader(COMPARISON.title)
    st.caption(COMPARISON.caption)
    state.show_figure(COMPARISON.figure(compared), key="overview_compare")
    st.subheader(COMPARISON.timelines_title)
    st.caption(COMPARISON.timelines_caption)
    state.show_figure(COMPARISON.timelines(compared), key="overview_timelines")

st.subheader("Run metadata")
for lt in chosen:
    with st.expander(lt.title):
        st.dataframe(state.meta_frame(lt), key=f"overview_meta:{lt.key}")
