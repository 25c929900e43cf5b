"""Policies: the eviction-policy lab (kvscope.lab) on a workload, its curves, and why each request missed.

The page runs the lab itself (it is fast and needs no trace): pick a workload (a Mooncake trace, a kvscope .jsonl
or a named generator), policies, capacities and prediction errors; the figures come from kvscope.present.lab, the
per-request causes from kvscope.lab.causes, so the page shows what `kvscope lab` prints.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st
from kvscope.app import state

from kvscope.errors import describe
from kvscope.lab.accesses import is_mooncake_file, load_accesses
from kvscope.lab.causes import request_blocks, request_causes
from kvscope.lab.options import parse_capacities, parse_errors
from kvscope.lab.sweep import run_lab, run_one
from kvscope.policies import registry
from kvscope.present.lab import LAB_VIEWS

LAB_WORKLOAD_ENV = "KVSCOPE_LAB_WORKLOAD"  # the workload the page starts with (tests set it)


def _default_workload() -> str:
    given = os.environ.get(LAB_WORKLOAD_ENV)
    if given:
        return given
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mooncake" / "conversation_trace.jsonl"
    return str(shared) if shared.is_file() else "multiturn"


@st.cache_resource(max_entries=4, show_spinner="Reading the workload…")
def _accesses(source: str, block_size: int | None, requests: int | None):
    return load_accesses(source, block_size, requests)


@st.cache_data(max_entries=16, show_spinner="Replaying through the policies…")
def _rows(source, block_size, requests, policies, capacities, errors, cpu_cache=0):
    acc = _accesses(source, block_size, requests)
    return run_lab(acc, list(policies), list(capacities), list(errors), cpu_cache=cpu_cache)


st.title("Policies")
st.caption(
    "Cache-only replay of the workload's prompt blocks through eviction policies (docs/lab.md): requests in arrival "
    "order, hits = the longest cached prefix, capacity in blocks."
)
with st.form("lab"):
    source = st.text_input("Workload (Mooncake trace, .jsonl or a named workload)", _default_workload())
    cols = st.columns(4)
    block_size = cols[0].number_input("Block size (kvscope workloads)", min_value=1, value=16, step=1)
    requests = cols[1].number_input("First N requests (0: all)", min_value=0, value=2000, step=500)
    capacity_text = cols[2].text_input("Capacities (N,N or LO:HI:COUNT)", "100:20000:8")
    cpu_cache = cols[3].number_input("CPU tier (blocks; 0: none)", min_value=0, value=0, step=1000)
    names = registry.names()
    policies = st.multiselect("Policies", names, default=[n for n in ("lru", "belady", "arc", "phase") if n in names])
    error_text = st.text_input("Prediction errors p (discard, phase)", "0,0.25,0.5,1")
    st.form_submit_button("Run the lab")

try:
    capacities = tuple(parse_capacities(capacity_text))
    errors = tuple(parse_errors(error_text))
    size = None if is_mooncake_file(source) else int(block_size)  # a Mooncake trace's blocks are its own (512)
    acc = _accesses(source, size, int(requests) or None)
    rows = _rows(source, size, int(requests) or None, tuple(policies), capacities, errors, int(cpu_cache))
except Exception as e:  # a user mistake is one line on the page, like the CLI's
    failure = describe(e)
    if failure is None:
        raise
    st.error(failure.line)
    st.stop()

workload = acc.describe()
m = st.columns(4)
m[0].metric("requests", f"{workload['requests']:,}")
m[1].metric("prompt blocks", f"{workload['blocks']:,}")
m[2].metric("block size", f"{workload['block_size']} tokens")
m[3].metric("unbounded-cache hit rate", f"{workload['max_hit_rate']:.1%}")
for view in LAB_VIEWS:
    st.subheader(view.label)
    st.caption(view.caption)
    state.show_figure(view.draw(rows, workload), key=f"lab_{view.key}")
st.dataframe(rows, hide_index=True, key="lab_rows")

st.subheader("Why each request missed")
pick = st.columns(3)
policy = pick[0].selectbox("Policy", policies or ["lru"], key="lab_cause_policy")
capacity = pick[1].selectbox("Capacity (blocks)", capacities, index=len(capacities) // 2, key="lab_cause_cap")
p = pick[2].selectbox("p", errors, key="lab_cause_p") if registry.get(policy).predictions else None
_, rep = run_one(acc, policy, int(capacity), p, explain=True, cpu_cache=int(cpu_cache))
per_request = request_causes(acc, rep)
st.caption(
    "Blocks per request: hit (on the GPU or, with a CPU tier, on the CPU), or missed as cold / evicted (from every "
    "tier) / behind a missing block (gap) / deeper than the cache. Pick a request to see which eviction lost each of "
    "its blocks."
)
st.dataframe(per_request, hide_index=True, key="lab_requests")
worst = per_request.sort_values("evicted", ascending=False)["request"].tolist()
chosen = st.selectbox("Request", worst, key="lab_request")
if chosen is not None:
    st.dataframe(request_blocks(acc, rep, acc.request_ids.index(chosen)), hide_index=True, key="lab_blocks")
