"""kvscope dashboard: `kvscope dashboard [TRACE ...]` runs `streamlit run` on this file.

Traces come from the script arguments (`streamlit run main.py -- A.kvtrace B.kvtrace`), else $KVSCOPE_TRACES, else
the repository's sample_runs/; more can be uploaded from the sidebar. Every page calls kvscope.analysis for its
numbers and kvscope.viz for its figures, so it shows what the report and the notebook show.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from kvscope.app import state

HERE = Path(__file__).resolve().parent
PAGES = [
    ("overview.py", "Overview & comparison", ":material/table_chart:"),
    ("fragmentation.py", "Fragmentation", ":material/grid_view:"),
    ("sharing.py", "Sharing", ":material/hub:"),
    ("timelines.py", "Timelines", ":material/show_chart:"),
    ("events.py", "Events", ":material/list:"),
    ("kv_events.py", "KV events", ":material/account_tree:"),
    ("policies.py", "Policies", ":material/science:"),
]

st.set_page_config(page_title="kvscope", page_icon=":material/memory:", layout="wide")
navigation = st.navigation(
    [
        st.Page(HERE / "views" / file, title=title, icon=icon, default=(i == 0))
        for i, (file, title, icon) in enumerate(PAGES)
    ]
)
traces = state.load_session_traces(state.script_args(__file__))
state.follow_growing_traces(traces)
navigation.run()
state.read_events_later(traces)  # (traces opened from their digests: their events, for the step views)
