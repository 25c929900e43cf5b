"""Figures: one plotly builder per view, DataFrame (from kvscope.analysis) in, go.Figure out. No metric is computed
here; builders only lay out what analysis returns (and bin it for display past a size cap, saying so in the figure).
Colours per state come from kvscope.viz.palette, the one place they are defined.
"""

from __future__ import annotations

from kvscope.viz.block_tables import block_table_figure
from kvscope.viz.compare import METRICS, Metric, comparison_figure, comparison_timelines_figure
from kvscope.viz.driver import driver_latency_figure
from kvscope.viz.fragmentation import block_grid_figure, fragmentation_map_figure
from kvscope.viz.memory import memory_stack_figure
from kvscope.viz.palette import STATE_COLORS, STATE_LABELS, state_color, state_label
from kvscope.viz.prefix_misses import prefix_misses_figure
from kvscope.viz.requests import request_lifetimes_figure
from kvscope.viz.sharing import prefix_icicle_figure, prefix_tree_figure, sharing_graph_figure
from kvscope.viz.throughput import throughput_figure

__all__ = [
    "METRICS",
    "STATE_COLORS",
    "STATE_LABELS",
    "Metric",
    "block_grid_figure",
    "block_table_figure",
    "comparison_figure",
    "comparison_timelines_figure",
    "driver_latency_figure",
    "fragmentation_map_figure",
    "memory_stack_figure",
    "prefix_icicle_figure",
    "prefix_misses_figure",
    "prefix_tree_figure",
    "request_lifetimes_figure",
    "sharing_graph_figure",
    "state_color",
    "state_label",
    "throughput_figure",
]
