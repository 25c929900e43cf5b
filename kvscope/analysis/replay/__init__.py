"""Replay of the fine-grained events into per-unit state, one module per allocator family, and the choice of replay.

Families (how an allocator addresses KV memory; `allocator_config["addressing"]` in the trace metadata):
    blocks  blocks.BlockReplay  BLOCK_* events; needs block_size, num_blocks            states BlockState
    pages   pages.PageReplay    PAGE_* / SLOT_* events; needs pages, page_size,          states PageState
                                buffer_row_bytes
    rows    rows.RowReplay      STATIC_* events; needs rows                              states RowState

The replay is chosen by the addressing the trace declares, never by the allocator's name, and reads its sizes from the
allocator's config: an allocator kvscope does not know replays like the built-in one of the same family. A trace that
declares no addressing, or one without the sizes it needs, is refused with a ReplayError (one line: the trace, the
allocator and what is missing), never replayed with guessed sizes. The one exception is `LEGACY_ADDRESSING` below.

`timeline(trace)` is the checkpointed Timeline (base.py) of the trace's replay, cached on the Trace; which events move
which state is written next to each handler; the column meanings are kvscope.events'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvscope.analysis._events import acct_last, cached
from kvscope.analysis.replay.base import (
    STATE_COLUMNS,
    Events,
    Replay,
    ReplayError,
    Timeline,
    allocator_name,
    config_int,
    declared_addressing,
    missing_message,
    missing_sizes,
    trace_name,
)
from kvscope.analysis.replay.blocks import LEGACY_BLOCK_SIZE, BlockReplay, BlockSnapshot, BlockState
from kvscope.analysis.replay.pages import LEGACY_PAGE_SIZE, PageReplay, PageSnapshot, PageState
from kvscope.analysis.replay.rows import Reservation, RowReplay, RowSnapshot, RowState, Segment
from kvscope.events import Kind

__all__ = [
    "ADDRESSINGS",
    "LEGACY_ADDRESSING",
    "REPLAYS",
    "STATE_COLUMNS",
    "BlockReplay",
    "BlockSnapshot",
    "BlockState",
    "Events",
    "PageReplay",
    "PageSnapshot",
    "PageState",
    "PoolGeometry",
    "Replay",
    "ReplayError",
    "Reservation",
    "RowReplay",
    "RowSnapshot",
    "RowState",
    "Segment",
    "Timeline",
    "addressing",
    "pool_geometry",
    "replay_class",
    "timeline",
]

REPLAYS: dict[str, type[Replay]] = {"blocks": BlockReplay, "pages": PageReplay, "rows": RowReplay}
ADDRESSINGS = tuple(REPLAYS)

# Traces recorded before allocators declared their addressing in allocator_config carry only the allocator's name,
# and only kvscope's three built-in allocators recorded such traces; their replays keep the defaults those allocators
# always had (16-token blocks, 2 MiB pages) where an old config left a size out. This is the one place analysis names
# an allocator; any other allocator must declare its addressing.
LEGACY_ADDRESSING: dict[str, str] = {"paged": "blocks", "vmm": "pages", "static": "rows"}


def addressing(trace: Any) -> str:
    """The trace's addressing family: the one it declares, else (a legacy trace) its built-in allocator's."""
    declared = declared_addressing(trace)
    if declared is not None:
        if declared not in REPLAYS:
            raise ReplayError(
                f"trace {trace_name(trace)!r}: allocator {allocator_name(trace)!r} declares addressing {declared!r}, "
                f"not one of {', '.join(ADDRESSINGS)}: cannot replay it"
            )
        return declared
    legacy = LEGACY_ADDRESSING.get(allocator_name(trace))
    if legacy is None:
        raise ReplayError(
            f"trace {trace_name(trace)!r}: allocator {allocator_name(trace)!r} is not one kvscope knows and its "
            f"allocator_config declares no addressing ({', '.join(ADDRESSINGS)}): cannot replay its memory states"
        )
    return legacy


def replay_class(trace: Any) -> type[Replay]:
    """The Replay of the trace's addressing; a ReplayError when it cannot be replayed (see the module docstring)."""
    cls = REPLAYS[addressing(trace)]
    if declared_addressing(trace) is not None:
        missing = missing_sizes(trace, cls.sizes)
        if missing:
            raise ReplayError(missing_message(trace, cls.addressing, missing))
    return cls


def timeline(trace: Any) -> Timeline:
    return cached(trace, "replay_timeline", lambda: Timeline(trace, replay_class(trace)))


@dataclass(frozen=True)
class PoolGeometry:
    """What the trace says about its KV pool, for labels: addressing (None when the trace cannot be replayed),
    units (blocks, pages or token rows in the pool; 0 when the config does not say), block_size (tokens per block;
    blocks only, else 0), page_size (bytes per page; pages only, else 0), capacity_bytes (the last capacity sample;
    0 without one)."""

    addressing: str | None
    units: int
    block_size: int
    page_size: int
    capacity_bytes: int


_UNIT_KEYS = {"blocks": "num_blocks", "pages": "pages", "rows": "rows"}


def pool_geometry(trace: Any) -> PoolGeometry:
    """The trace's PoolGeometry; never raises (an unreplayable trace gets addressing None)."""
    capacity = acct_last(trace, Kind.ACCT_CAPACITY)
    try:
        family = addressing(trace)
    except ReplayError:
        return PoolGeometry(None, 0, 0, 0, capacity)
    return PoolGeometry(
        family,
        config_int(trace, _UNIT_KEYS[family]),
        config_int(trace, "block_size", LEGACY_BLOCK_SIZE) if family == "blocks" else 0,
        config_int(trace, "page_size", LEGACY_PAGE_SIZE) if family == "pages" else 0,
        capacity,
    )
