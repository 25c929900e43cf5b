"""Timelines: memory bands over the run, throughput, request lifetimes and (VMM) driver-call latency."""

from __future__ import annotations

import streamlit as st
from kvscope.app import state

from kvscope.analysis.memory import memory_timeline
from kvscope.analysis.requests import request_lifetimes
from kvscope.analysis.summary import last_step
from kvscope.analysis.throughput import throughput_timeline
from kvscope.viz import memory_stack_figure, request_lifetimes_figure, throughput_figure

st.title("Timelines")
lt = state.focus_trace()
if lt is None:
    st.stop()
st.caption(lt.title)

tab_memory, tab_throughput, tab_requests, tab_driver = st.tabs(["Memory", "Throughput", "Requests", "Driver calls"])
with tab_memory:
    st.caption(
        "Where every byte of the KV pool is after each step; the bands add up to the capacity. The solid line is "
        "vLLM's kv_cache_usage (blocks taken / capacity), the dashed one the share of token slots holding tokens."
    )
    state.show_figure(memory_stack_figure(memory_timeline(lt.trace)), key="tl_memory")
with tab_throughput:
    state.show_figure(throughput_figure(throughput_timeline(lt.trace)), key="tl_throughput")
with tab_requests:
    state.show_figure(
        request_lifetimes_figure(request_lifetimes(lt.trace), last_step=last_step(lt.trace)), key="tl_requests"
    )
with tab_driver:
    from kvscope.analysis.driver import driver_calls
    from kvscope.viz import driver_latency_figure

    calls = driver_calls(lt.trace)
    if calls.empty:
        st.info("No timed driver calls in this run (only VMM allocators on the cuda or cpu backend make them).")
    else:
        state.show_figure(driver_latency_figure(calls), key="tl_driver")
