"""Events: the raw trace, filtered by kind, sequence and step range (what every other page is computed from)."""

from __future__ import annotations

import streamlit as st
from kvscope.app import state
from kvscope.app.filters import filter_trace, parse_id_list

from kvscope.analysis.summary import event_counts

MAX_ROWS = 5000  # rows sent to the browser; the download has every matching row

st.title("Events")
lt = state.focus_trace()
if lt is None:
    st.stop()
# The rows shown are read from the trace's store, kind by kind: the DataFrame of every event (gigabytes for a big
# trace) is built for nothing here.
st.caption(f"{lt.title}: {lt.trace.num_events:,} events. Column meanings per kind: kvscope/events.py.")

present = event_counts(lt.trace)["kind"].tolist()  # kinds that occur, in the schema's order
col_kind, col_seq = st.columns([3, 2])
kinds = col_kind.multiselect("Kinds", present, default=[], key=f"ev_kinds:{lt.key}", placeholder="all kinds")
seq_text = col_seq.text_input("Sequences", key=f"ev_seqs:{lt.key}", placeholder="e.g. 3, 7-9 (all when empty)")
first, last = state.step_bounds(lt)
steps = None
if last > first:
    steps = st.slider("Steps", min_value=first, max_value=last, value=(first, last), key=f"ev_steps:{lt.key}")

try:
    seqs = parse_id_list(seq_text)
except ValueError as e:
    st.error(str(e))
    st.stop()
matching, shown = filter_trace(lt.trace, kinds=kinds, seqs=seqs, steps=steps, limit=MAX_ROWS)
more = f" (showing the first {MAX_ROWS:,})" if matching > MAX_ROWS else ""
st.caption(f"{matching:,} matching events{more}")
st.dataframe(shown, hide_index=True, key="ev_table")
st.download_button(
    "Download matching events (CSV)",
    # built only when clicked: a big trace's CSV is slow
    lambda: filter_trace(lt.trace, kinds=kinds, seqs=seqs, steps=steps)[1].to_csv(index=False).encode(),
    file_name=f"{lt.name}-events.csv",
    mime="text/csv",
    key="ev_download",
)
