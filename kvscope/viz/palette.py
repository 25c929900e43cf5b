"""One palette for every view: a state has the same colour in the memory stack, the block grid, the fragmentation
map and the dashboard, so a reader learns it once.

States that mean the same thing in different allocators share a colour: a paged block that is `active`, a VMM page
that is `mapped_used`, a static arena segment that is `used` and the `used` band of the memory stack all hold real
tokens (blue). Waste is warm (internal orange, reservation amber, mapped-idle red); cached-idle prefix blocks are
teal (neither waste nor free); free memory is light grey.
"""

from __future__ import annotations

import plotly.graph_objects as go

BLUE = "#1f77b4"
PURPLE = "#7b4fb8"
ORANGE = "#f28e2b"
AMBER = "#edc948"
RED = "#d62728"
TEAL = "#17a3a3"
GREY = "#d9d9d9"
DARK_GREY = "#7f7f7f"

STATE_COLORS: dict[str, str] = {
    # memory stack bands (analysis.memory.memory_timeline columns)
    "used": BLUE,
    "internal": ORANGE,
    "reservation": AMBER,
    "mapped_idle": RED,
    "cached_idle": TEAL,
    "free": GREY,
    # paged blocks
    "active": BLUE,
    "shared": PURPLE,
    # vmm pages
    "mapped_used": BLUE,
    "pool": GREY,
    # request lifetimes
    "waiting": AMBER,
    "running": BLUE,
    "unfinished": DARK_GREY,
    # anything an allocator adds later that this palette does not know yet
    "other": "#9c755f",
}

STATE_LABELS: dict[str, str] = {
    "used": "used (token states)",
    "internal": "internal fragmentation",
    "reservation": "reservation (future tokens)",
    "mapped_idle": "mapped idle (deferred reclamation)",
    "cached_idle": "cached idle (prefix cache, ref 0)",
    "free": "free",
    "active": "active (one holder)",
    "shared": "shared (ref > 1)",
    "mapped_used": "mapped, in use",
    "pool": "in pool (unmapped)",
    "waiting": "waiting (arrived, not admitted)",
    "running": "running (holds KV)",
    "unfinished": "unfinished at trace end",
    "other": "other",
}

# Order in legends and stacks: tokens first, then waste, then idle, then free.
STATE_ORDER: list[str] = [
    "used",
    "active",
    "mapped_used",
    "shared",
    "internal",
    "reservation",
    "mapped_idle",
    "cached_idle",
    "pool",
    "free",
    "other",
]

# Memory stack bands, bottom to top; they add up to capacity.
MEMORY_BANDS: list[str] = ["used", "internal", "reservation", "mapped_idle", "cached_idle", "free"]

PREFILL_COLOR = "#59a14f"
DECODE_COLOR = BLUE
BATCH_COLOR = DARK_GREY
PREEMPT_COLOR = RED
KERNEL_COLOR = PURPLE
DRIVER_COLOR = ORANGE
TBPS_COLOR = "#e15759"
# Usage lines drawn over the coloured memory bands: black, told apart by dash, so no band hides them.
USAGE_LINE_COLOR = "#111111"
LOGICAL_LINE_COLOR = "#6a3d9a"
PEAK_RESERVED_COLOR = "#b07aa1"  # in-step peak lines over the end-of-step bands
PEAK_USED_COLOR = "#9c755f"
SEQ_COLOR = "#4e79a7"
# Sequential scale for counts (prefix-cache hits, occupancy): white to the "used" blue.
COUNT_SCALE = [[0.0, "#f7fbff"], [1.0, BLUE]]

# Runs in a comparison, and the kinds of timed driver calls, take colours in this order.
QUALITATIVE: list[str] = [
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
]

FONT_FAMILY = "system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, sans-serif"

# A small template of our own: plotly's default template is ~10 KB of JSON repeated in every figure of a report.
TEMPLATE = go.layout.Template(
    layout=dict(
        font=dict(family=FONT_FAMILY, size=12, color="#222"),
        paper_bgcolor="white",
        plot_bgcolor="white",
        colorway=QUALITATIVE,
        hoverlabel=dict(font=dict(family=FONT_FAMILY)),
        xaxis=dict(showgrid=True, gridcolor="#eee", zeroline=False, linecolor="#999", ticks="outside"),
        yaxis=dict(showgrid=True, gridcolor="#eee", zeroline=False, linecolor="#999", ticks="outside"),
        legend=dict(bgcolor="rgba(255,255,255,0.8)", traceorder="normal"),
        margin=dict(l=70, r=30, t=70, b=60),
    )
)


def state_color(state: str) -> str:
    return STATE_COLORS.get(state, STATE_COLORS["other"])


def state_label(state: str) -> str:
    return STATE_LABELS.get(state, state.replace("_", " "))


def ordered_states(states) -> list[str]:
    """Known states in palette order, unknown ones after them alphabetically."""
    present = set(states)
    known = [s for s in STATE_ORDER if s in present]
    return known + sorted(present - set(known))


def series_color(i: int) -> str:
    return QUALITATIVE[i % len(QUALITATIVE)]
