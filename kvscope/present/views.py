"""The catalog of views: every figure a surface can show of a trace, described once.

A view has a key, a short label (selectors, tabs), a title (the report's heading), a caption saying how to read it,
a builder (kvscope.analysis -> kvscope.viz: the surfaces compute nothing) and a rule saying when it applies to a
trace, decided from what the trace contains (never from the allocator's name), with the sentence surfaces show
when it does not. Stepped views (the block grid, the sharing graph) draw the state at one step: the report shows
them at their snapshot step, the explorer and the dashboard at the step their slider picks.

    from kvscope.present.views import VIEWS, split
    shown, absent = split(trace)
    for view in shown:
        view.heading(trace), view.caption, view.figure(trace)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

from kvscope import viz
from kvscope.analysis import compare, driver, fragmentation, memory, requests, sharing, summary, throughput
from kvscope.events import KIND_NAMES, Kind
from kvscope.trace import Trace

# The fragmentation map's resolution: units x steps cells (the analysis layer bins to this); every surface that
# draws the map draws these cells.
MAP_MAX_UNITS = 128
MAP_MAX_STEPS = 300

Draw = Callable[[Trace, int], go.Figure]  # (trace, step) -> figure; whole-run views ignore the step


def always(trace: Trace) -> bool:
    return True


@dataclass(frozen=True)
class View:
    key: str
    label: str  # short name: the explorer's selector, the dashboard's tabs, lists of views left out
    title: str  # the report's heading; a stepped view's names its snapshot step as {step}
    caption: str
    draw: Draw
    applies: Callable[[Trace], bool] = always
    absent: str = ""  # why the view is left out of a trace it does not apply to (one sentence)
    snapshot: Callable[[Trace], int] | None = None  # stepped views: the step shown when none is chosen

    @property
    def stepped(self) -> bool:
        return self.snapshot is not None

    def snapshot_step(self, trace: Trace) -> int:
        return start_step(trace) if self.snapshot is None else self.snapshot(trace)

    def heading(self, trace: Trace) -> str:
        return self.title.format(step=self.snapshot_step(trace)) if self.stepped else self.title

    def figure(self, trace: Trace, step: int | None = None) -> go.Figure:
        """The figure at `step` (stepped views; their snapshot step when None), or of the whole run."""
        return self.draw(trace, self.snapshot_step(trace) if step is None else int(step))


# ---- steps worth a snapshot ------------------------------------------------------------------------------------
def start_step(trace: Trace) -> int:
    """Where a step slider starts: the step the pool was fullest (most reserved), else the first step."""
    step = memory.peak_step(trace, "reserved")
    return memory.step_range(trace)[0] if step is None else step


def most_used_step(trace: Trace) -> int:
    """The step holding the most tokens (the pool under most pressure), else the first step."""
    step = memory.peak_step(trace, "used")
    return memory.step_range(trace)[0] if step is None else step


def most_shared_step(trace: Trace) -> int:
    """The step where sharing saved the most, else where the slider starts."""
    step = memory.peak_step(trace, "sharing_saved")
    return start_step(trace) if step is None else step


# ---- when a view applies: from what the trace contains ----------------------------------------------------------
def shares_memory(trace: Trace) -> bool:
    """Some sequences held the same KV memory at once (forked samples, prefix-cache hits): logical > used."""
    return summary.summarize(trace)["sharing_saved_bytes_peak"] > 0


def caches_prefixes(trace: Trace) -> bool:
    """Some block entered a prefix cache (BLOCK_CACHE events: the prefix tree's nodes)."""
    return KIND_NAMES[Kind.BLOCK_CACHE] in set(summary.event_counts(trace)["kind"])


def calls_the_driver(trace: Trace) -> bool:
    """The allocator made timed driver / OS calls (mapping physical pages)."""
    return summary.summarize(trace)["driver_calls"] > 0


# ---- builders ------------------------------------------------------------------------------------------------------
def _memory(trace: Trace, step: int) -> go.Figure:
    return viz.memory_stack_figure(memory.memory_timeline(trace))


def _fragmentation(trace: Trace, step: int) -> go.Figure:
    return viz.fragmentation_map_figure(fragmentation.state_matrix(trace, MAP_MAX_UNITS, MAP_MAX_STEPS))


def _blocks(trace: Trace, step: int) -> go.Figure:
    return viz.block_grid_figure(fragmentation.block_states(trace, step), step=step)


def _throughput(trace: Trace, step: int) -> go.Figure:
    return viz.throughput_figure(throughput.throughput_timeline(trace))


def _requests(trace: Trace, step: int) -> go.Figure:
    return viz.request_lifetimes_figure(requests.request_lifetimes(trace), last_step=summary.last_step(trace))


def _sharing(trace: Trace, step: int) -> go.Figure:
    return viz.sharing_graph_figure(sharing.sharing_edges(trace, step), step=step)


def _prefix(trace: Trace, step: int) -> go.Figure:
    block_size = (trace.meta.get("allocator_config") or {}).get("block_size")
    return viz.prefix_tree_figure(sharing.prefix_tree(trace), block_size=block_size)


def _driver(trace: Trace, step: int) -> go.Figure:
    return viz.driver_latency_figure(driver.driver_calls(trace))


# ---- the catalog, in the report's order ----------------------------------------------------------------------------
CATALOG: tuple[View, ...] = (
    View(
        "memory",
        "Memory",
        "Memory over time",
        "Where every byte of the KV pool is after each step; the bands add up to the capacity. The solid black "
        "line is what vLLM's kv_cache_usage reports (blocks taken / capacity); the dashed black line is the "
        "share of token slots actually holding tokens. The gap between them is waste.",
        _memory,
    ),
    View(
        "fragmentation",
        "Fragmentation map",
        "Fragmentation map",
        "Every block, page or arena row (vertical) at every step (horizontal), coloured by its state; large "
        "pools and long runs are binned, each cell showing the state most of it was in (hover for the mix).",
        _fragmentation,
    ),
    View(
        "blocks",
        "Blocks",
        "Blocks when the most tokens were held (step {step})",
        "One cell per block or page (a strip of segments for static arenas); hover for its holders, fill "
        "and ref count.",
        _blocks,
        snapshot=most_used_step,
    ),
    View(
        "throughput",
        "Throughput",
        "Throughput",
        "Generated tokens per second, the tokens each step computed (prefill and decode) with the batch size, "
        "step time, and achieved KV read bandwidth on real devices; crosses mark preemptions.",
        _throughput,
    ),
    View(
        "requests",
        "Requests",
        "Request lifetimes",
        "When each request waited and when it held KV memory; hatched bars were preempted at least once.",
        _requests,
    ),
    View(
        "sharing",
        "Sharing graph",
        "Block sharing at its peak (step {step})",
        "Sequences and the blocks they share (forks for parallel sampling or beam search, prefix-cache "
        "hits); thicker edges and bigger squares mean more holders.",
        _sharing,
        applies=shares_memory,
        absent="No sequences shared KV memory in this run.",
        snapshot=most_shared_step,
    ),
    View(
        "prefix",
        "Prefix-cache tree",
        "Prefix-cache tree",
        "Chains of cached blocks: a path from the left is a shared prompt prefix; colour counts the hits.",
        _prefix,
        applies=caches_prefixes,
        absent="No block entered a prefix cache in this run (prefix caching off, or an allocator without one).",
    ),
    View(
        "driver",
        "Driver calls",
        "Driver-call latency",
        "How long each kind of VMM call took (log scale): the price of growing and shrinking by pages.",
        _driver,
        applies=calls_the_driver,
        absent="No driver calls in this run (only allocators that map physical pages, like VMM, make them).",
    ),
)
VIEWS: dict[str, View] = {view.key: view for view in CATALOG}


def select(keys: Iterable[str] | None = None) -> list[View]:
    """The views named by `keys` in catalog order (every view when None); a ValueError names an unknown key."""
    if keys is None:
        return list(CATALOG)
    wanted = list(keys)
    unknown = [k for k in wanted if k not in VIEWS]
    if unknown:
        raise ValueError(f"views: {', '.join(map(repr, unknown))} not among {', '.join(VIEWS)}")
    return [view for view in CATALOG if view.key in wanted]


def split(trace: Trace, keys: Iterable[str] | None = None) -> tuple[list[View], list[View]]:
    """(views that apply to the trace, views left out of it), among `keys` (every view when None)."""
    views = select(keys)
    shown = [view for view in views if view.applies(trace)]
    return shown, [view for view in views if view not in shown]


@dataclass(frozen=True)
class Comparison:
    """The view of several runs side by side (kvscope.analysis.compare.compare_runs)."""

    key: str = "compare"
    title: str = "Runs compared"
    caption: str = "The headline figures of every run side by side; each run keeps its colour in every panel."

    def figure(self, traces: Sequence[Trace]) -> go.Figure:
        return viz.comparison_figure(compare.compare_runs(list(traces)))


COMPARISON = Comparison()
