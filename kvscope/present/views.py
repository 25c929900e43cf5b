"""The catalog of views: every figure a surface can show of a trace, described once.

A view has a key, a short label (selectors, tabs), a title (the report's heading), a caption saying how to read it,
a builder (kvscope.analysis -> kvscope.viz: the surfaces compute nothing) and a rule saying when it applies to a
trace, decided from what the trace contains (never from the allocator's name), with the sentence surfaces show
when it does not. Stepped views (the block grid, block tables, the sharing view) draw the state at one step: the
report shows them at their snapshot step, the explorer and the dashboard at the step their slider picks.

    from kvscope.present.views import VIEWS, split
    shown, absent = split(trace)
    for view in shown:
        view.heading(trace), view.caption, view.figure(trace)
"""

# This module is longer than 400 lines: it is the one catalog every surface draws from (each view's words, builder
# and rule side by side); split apart, the report, the dashboard and the notebook could list different views.

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

from kvscope import viz
from kvscope.analysis import (
    block_tables,
    cache,
    compare,
    driver,
    fragmentation,
    memory,
    prefix_misses,
    requests,
    sharing,
    summary,
    throughput,
)
from kvscope.events import KIND_NAMES, Kind
from kvscope.trace import Trace
from kvscope.viz import cache as cache_viz

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
    # False: when not asked for by key, left out of a trace it does not apply to without a word (views of another
    # kind of trace: the KV-event views say nothing in every report of kvscope's own runs)
    list_absent: bool = True

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
    return (summary.summarize(trace).get("sharing_saved_bytes_peak") or 0) > 0


def caches_prefixes(trace: Trace) -> bool:
    """Some block entered a prefix cache (BLOCK_CACHE events: the prefix tree's nodes)."""
    return KIND_NAMES[Kind.BLOCK_CACHE] in set(summary.event_counts(trace)["kind"])


def calls_the_driver(trace: Trace) -> bool:
    """The allocator made timed driver / OS calls (mapping physical pages)."""
    return (summary.summarize(trace).get("driver_calls") or 0) > 0


def from_kv_events(trace: Trace) -> bool:
    """The trace is an imported KV-event stream (vLLM's BlockStored / BlockRemoved: KV_BATCH rows)."""
    return cache.has_kv_events(trace)


def records_engine(trace: Trace) -> bool:
    """The trace has what kvscope's own views draw (engine steps, allocator books, requests): every trace but an
    imported KV-event stream, which has none of them."""
    return not cache.has_kv_events(trace)


ENGINE_ABSENT = (
    "An imported KV-event stream has no engine steps, allocator books or requests: vLLM's events only say which "
    "block hashes were stored and removed."
)


# ---- builders ------------------------------------------------------------------------------------------------------
def _memory(trace: Trace, step: int) -> go.Figure:
    return viz.memory_stack_figure(memory.memory_timeline(trace))


def _fragmentation(trace: Trace, step: int) -> go.Figure:
    return fragmentation_map(trace)


def fragmentation_map(trace: Trace, steps: tuple[int, int] | None = None, units: tuple[int, int] | None = None):
    """The fragmentation map, zoomed to `steps` and `units` (inclusive ranges) when given: the surfaces' zoom
    controls re-bin the window at the same resolution, so cells get finer."""
    args = (trace, MAP_MAX_UNITS, MAP_MAX_STEPS)
    return viz.fragmentation_map_figure(
        fragmentation.state_matrix(*args, steps=steps, units=units),
        fragmentation.fill_matrix(*args, steps=steps, units=units),
    )


def _tables(trace: Trace, step: int) -> go.Figure:
    return viz.block_table_figure(block_tables.block_tables(trace, step), step=step)


def has_tables(trace: Trace) -> bool:
    """The trace maps logical blocks to physical blocks or pages (BLOCK_ALLOC or PAGE_MAP events)."""
    return block_tables.has_block_tables(trace)


def _blocks(trace: Trace, step: int) -> go.Figure:
    return viz.block_grid_figure(fragmentation.block_states(trace, step), step=step)


def _throughput(trace: Trace, step: int) -> go.Figure:
    return viz.throughput_figure(throughput.throughput_timeline(trace))


def _requests(trace: Trace, step: int) -> go.Figure:
    return viz.request_lifetimes_figure(requests.request_lifetimes(trace), last_step=summary.last_step(trace))


def _sharing(trace: Trace, step: int) -> go.Figure:
    tables = block_tables.block_tables(trace, step)
    return viz.block_table_figure(tables, step=step, only_sharing=True, title=f"Who shares which blocks at step {step}")


def _prefix(trace: Trace, step: int) -> go.Figure:
    return viz.prefix_icicle_figure(sharing.prefix_tree(trace))


def _misses(trace: Trace, step: int) -> go.Figure:
    return viz.prefix_misses_figure(prefix_misses.request_misses(trace), prefix_misses.missed_blocks(trace))


def _driver(trace: Trace, step: int) -> go.Figure:
    return viz.driver_latency_figure(driver.driver_calls(trace))


def _kv_cached(trace: Trace, step: int) -> go.Figure:
    return cache_viz.cached_blocks_figure(cache.cached_blocks(trace))


def _kv_rates(trace: Trace, step: int) -> go.Figure:
    return cache_viz.cache_rates_figure(cache.cache_rates(trace))


def _kv_tree(trace: Trace, step: int) -> go.Figure:
    return cache_viz.cache_tree_figure(cache.cache_tree(trace))


def _kv_restored(trace: Trace, step: int) -> go.Figure:
    return cache_viz.restored_figure(cache.restored_blocks(trace))


def _kv_lifetimes(trace: Trace, step: int) -> go.Figure:
    return cache_viz.lifetimes_figure(cache.block_lifetimes(trace))


KV_ABSENT = "Only imported KV-event streams (kvscope import vllm-events, kvscope listen) have this view."


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
        applies=records_engine,
        absent=ENGINE_ABSENT,
    ),
    View(
        "fragmentation",
        "Fragmentation map",
        "Fragmentation map",
        "Every block, page or arena row (vertical) at every step (horizontal). Large pools and long runs are "
        "binned, and each cell shows the mix of states it covers: it is cut into bands shared out by the states' "
        "shares, and any state present gets a band, so scattered allocations stay visible. The lower panel is the "
        "fill of the reserved blocks and pages in each cell (tokens held / token slots): partly filled last "
        "blocks, pages mapped ahead of their tokens and idle mapped pages show as low fill. Drag to zoom; the "
        "dashboard re-bins a chosen step and block range.",
        _fragmentation,
        applies=records_engine,
        absent=ENGINE_ABSENT,
    ),
    View(
        "blocks",
        "Blocks",
        "Blocks when the most tokens were held (step {step})",
        "One cell per block or page (a strip of segments for static arenas); hover for its holders, fill "
        "and ref count.",
        _blocks,
        applies=records_engine,
        absent=ENGINE_ABSENT,
        snapshot=most_used_step,
    ),
    View(
        "tables",
        "Block tables",
        "Block tables when the most tokens were held (step {step})",
        "Each sequence's block table: one row per sequence, one column per logical block, each cell the physical "
        "block or page it maps to (hover). Dark blue blocks are full, light blue ones partly filled (the last "
        "block's internal fragmentation), purple ones shared, green ones copied on write. Pages: buffer 0's, "
        "every buffer of a slot maps the same number.",
        _tables,
        applies=has_tables,
        absent="This run has no block tables (a static arena gives each request one contiguous reservation).",
        snapshot=most_used_step,
    ),
    View(
        "throughput",
        "Throughput",
        "Throughput",
        "Generated tokens per second, the tokens each step computed (prefill and decode) with the batch size, "
        "step time, and achieved KV read bandwidth on real devices; crosses mark preemptions.",
        _throughput,
        applies=records_engine,
        absent=ENGINE_ABSENT,
    ),
    View(
        "requests",
        "Requests",
        "Request lifetimes",
        "When each request waited and when it held KV memory; hatched bars were preempted at least once.",
        _requests,
        applies=records_engine,
        absent=ENGINE_ABSENT,
    ),
    View(
        "sharing",
        "Sharing",
        "Block sharing at its peak (step {step})",
        "One row per sequence that shares or copied a block, one column per logical block of its table: purple "
        "blocks are shared (forked samples, beams, prefix-cache hits), green ones are private copies made by "
        "copy-on-write, blue ones its own. Rows are grouped by the prefix they share (the block their table "
        "starts with) and by fork family (thin rules); hover for the physical block and its ref count.",
        _sharing,
        applies=shares_memory,
        absent="No sequences shared KV memory in this run (an imported KV-event stream cannot show sharing: it "
        "names no requests).",
        snapshot=most_shared_step,
    ),
    View(
        "prefix",
        "Prefix-cache tree",
        "Prefix-cache tree",
        "Chains of cached blocks as an icicle: left to right is deeper into a prompt (a chain without branches "
        "is one box); a box's label counts the admissions served from it (hits), its height the distinct cached "
        "prompts below it; teal prefixes are still cached at the end of the run, grey ones were evicted. Click a "
        "box to zoom into it.",
        _prefix,
        applies=caches_prefixes,
        absent="No block entered a prefix cache in this run (prefix caching off, or an allocator without one; an "
        "imported KV-event stream has its own tree, built from the hash chain).",
    ),
    View(
        "misses",
        "Prompt misses",
        "Why prompts missed the prefix cache",
        "Each request's prompt at its first admission, by outcome: tokens served from the GPU prefix cache or the "
        "CPU tier, and missed tokens that were cold (never cached before: no policy could hit them), evicted "
        "before this reuse (hover: which eviction, how long before), behind a missing block (cached, but the "
        "lookup stops at the first miss), or the block-size floor (the partly filled last block and the last "
        "prompt token, always computed). The parts add up to the prompt.",
        _misses,
        applies=prefix_misses.has_prompt_misses,
        absent="Only runs with prefix caching on blocks say why prompts missed (kvscope run --prefix-caching).",
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
    # ---- imported KV-event streams (kvscope.analysis.cache): what vLLM's events can say, and no more --------
    View(
        "kv_cached",
        "Cached blocks",
        "Cached blocks per medium",
        "Blocks in vLLM's prefix cache after every BlockStored, BlockRemoved and AllBlocksCleared, per medium "
        "(GPU, CPU, ...), on vLLM's clock. These are hashed blocks only: vLLM sends no event for blocks that are "
        "never hashed (partly filled last blocks, running decodes) and none for the pool's free blocks, so this "
        "is not the pool's usage. Two blocks stored under one hash count twice.",
        _kv_cached,
        applies=from_kv_events,
        absent=KV_ABSENT,
        list_absent=False,
    ),
    View(
        "kv_rates",
        "Stores and evictions",
        "Blocks stored and removed per second",
        "Blocks vLLM stored into and removed from its prefix cache per second of its clock (stored above zero, "
        "removed below). A prefix-cache hit stores nothing, so hits do not show here.",
        _kv_rates,
        applies=from_kv_events,
        absent=KV_ABSENT,
        list_absent=False,
    ),
    View(
        "kv_tree",
        "Prefix tree (events)",
        "Prefix tree rebuilt from the hash chain",
        "Every block hash the stream stored, joined to its parent's (each BlockStored names the hash before its "
        "first block): a path from the left is a prompt prefix, its x the tokens it covers. Colour counts stores "
        "(above 1: stored again after an eviction, or two blocks under one hash); hollow markers are still cached "
        "at the end. Hits are not in vLLM's events, so the tree cannot say how often a prefix was reused.",
        _kv_tree,
        applies=from_kv_events,
        absent=KV_ABSENT,
        list_absent=False,
    ),
    View(
        "kv_restored",
        "Stored again",
        "Prefixes evicted and stored again",
        "Each store of a block hash that an earlier BlockRemoved took out of the same medium: the cache evicted "
        "it and vLLM had to compute it again (or fetch it from another tier). x is when it came back, y how long it "
        "had been gone; blocks with no request attached, since the events name none.",
        _kv_restored,
        applies=from_kv_events,
        absent=KV_ABSENT,
        list_absent=False,
    ),
    View(
        "kv_lifetimes",
        "Block lifetimes",
        "Block lifetimes in the cache",
        "How long each stored block stayed cached, by how it left: removed (evicted), cleared (AllBlocksCleared), "
        "or still cached at the end (cut there, so a lower bound). vLLM's events do not say which of two blocks "
        "under one hash a removal took: copies are matched first in, first out.",
        _kv_lifetimes,
        applies=from_kv_events,
        absent=KV_ABSENT,
        list_absent=False,
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
    """(views that apply to the trace, views left out of it), among `keys` (every view when None; then views with
    list_absent False that do not apply are in neither list)."""
    views = select(keys)
    shown = [view for view in views if view.applies(trace)]
    return shown, [view for view in views if view not in shown and (keys is not None or view.list_absent)]


@dataclass(frozen=True)
class Comparison:
    """The view of several runs side by side: the verdict in words (kvscope.analysis.compare.comparison_verdict),
    the headline figures as bars (compare_runs) and the runs' timelines overlaid (compare_timelines). Runs are
    named by their label, or by their file name when two runs share a label (two "paged b16" sample runs)."""

    key: str = "compare"
    title: str = "Runs compared"
    caption: str = (
        "The headline figures of every run side by side, the first run on top; each run keeps its colour in "
        "every panel. Figures equal in every run are listed under the panels instead of drawn."
    )
    verdict_title: str = "Verdict"
    timelines_title: str = "Runs over time"
    timelines_caption: str = (
        "The runs on one time axis (each on its own clock: simulated on sim runs): KV memory reserved and used, "
        "the batch each step ran, and the tokens each step generated per second."
    )

    def named(self, traces: Sequence[Trace]) -> dict[str, Trace]:
        """label -> trace; a label two runs share becomes 'label (file name)' for both."""
        counts: dict[str, int] = {}
        for t in traces:
            counts[t.label] = counts.get(t.label, 0) + 1
        out: dict[str, Trace] = {}
        for t in traces:
            name = t.label if counts[t.label] == 1 else f"{t.label} ({t.name})"
            unique, n = name, 1
            while unique in out:  # the same file name in two directories
                n += 1
                unique = f"{name} [{n}]"
            out[unique] = t
        return out

    def figure(self, traces: Sequence[Trace]) -> go.Figure:
        return viz.comparison_figure(compare.compare_runs(self.named(traces)))

    def timelines(self, traces: Sequence[Trace]) -> go.Figure:
        return viz.comparison_timelines_figure(compare.compare_timelines(self.named(traces)))

    def verdict(self, traces: Sequence[Trace]) -> compare.Verdict:
        return compare.comparison_verdict(self.named(traces))


COMPARISON = Comparison()
