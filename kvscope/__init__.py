"""kvscope: see where your LLM KV cache memory goes.

Allocators (static, paged, vmm) emit events -> a trace file -> analysis (DataFrames) -> figures -> surfaces
(CLI, HTML report, Streamlit dashboard, %kvscope magic, widgets).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_trace", "KVSpec", "get_spec", "load_ipython_extension", "record", "Kind", "explore"]


def __getattr__(name: str):
    # Lazy: `import kvscope` stays cheap and never pulls torch, plotly or streamlit.
    if name == "load_trace":
        from kvscope.trace import load_trace

        return load_trace
    if name in ("KVSpec", "get_spec"):
        from kvscope import spec

        return getattr(spec, name)
    if name == "record":  # the instrumentation API for your own engine (kvscope.instrument)
        from kvscope.instrument import record

        return record
    if name == "explore":  # the notebook explorer widget (kvscope.widgets)
        from kvscope.widgets import explore

        return explore
    if name == "Kind":
        from kvscope.events import Kind

        return Kind
    raise AttributeError(f"module 'kvscope' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    """`%load_ext kvscope` registers the %kvscope / %%kvscope magics."""
    from kvscope.magic import load_ipython_extension as _load

    _load(ipython)
