"""Block tables at a step: for every sequence, its logical blocks (or pages) in order and the physical unit each maps
to, marked own, shared or copied-on-write; and the groups sequences share memory in (fork families, shared
prefixes).

block_tables(trace, step) -> one row per (sequence, logical index) at the end of `step`:
    seq, root (the request's seq: a fork family), request_id
    index         logical position: the index in the sequence's block table (blocks), or the page's position in
                  the sequence's slot of buffer 0 (pages: every buffer of a slot maps the same number of pages,
                  so buffer 0, the first layer's K, stands for all)
    unit          the physical block or page id
    kind          own (held by this sequence alone), shared (ref count > 1: forked samples, beams, prefix-cache
                  hits) or cow (a private copy the sequence made by copy-on-write of a shared partial block; held
                  alone)
    ref_count, fill, capacity_tokens (tokens held / slots of the unit), cow_source (the block a cow copy was copied
                  from; -1 otherwise)
    group         the sharing group (below), group_size (sequences in it)
Row-addressed (static) arenas have no tables: an empty frame. Ordered by group, root, seq, index.

Groups: sequences whose table starts with the same shared block share a prompt prefix (prefix-cache hits, or the
samples of one request): group "prefix@<block>"; a sequence whose first block is its own is grouped with its fork
family: "family <root>".
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from kvscope.analysis._events import codes, config_value, count, end_of_step, rows, values
from kvscope.analysis.fragmentation import block_states
from kvscope.analysis.replay import ReplayError, addressing
from kvscope.analysis.replay.pages import LEGACY_PAGE_SIZE
from kvscope.analysis.requests import request_lifetimes
from kvscope.events import Kind

TABLE_COLUMNS = [
    "seq",
    "root",
    "request_id",
    "index",
    "unit",
    "kind",
    "ref_count",
    "fill",
    "capacity_tokens",
    "cow_source",
    "group",
    "group_size",
]
KINDS = ("own", "shared", "cow")


def has_block_tables(trace) -> bool:
    """The trace maps logical blocks to physical ones: block-addressed (BLOCK_ALLOC) or page-addressed (PAGE_MAP)."""
    try:
        family = addressing(trace)
    except ReplayError:
        return False
    kind = Kind.BLOCK_ALLOC if family == "blocks" else Kind.PAGE_MAP if family == "pages" else None
    return kind is not None and count(trace, kind) > 0


AT_STEP_TABLES = "analysis.at_step.block_tables"  # trace._cache: step -> block_tables frame, seeded by a digest


def block_tables(trace, step: int) -> pd.DataFrame:
    """One row per (sequence, logical block) at the end of `step`: see the module docstring."""
    seeded = trace._cache.get(AT_STEP_TABLES, {}).get(int(step))  # from the trace's digest (kvscope.digest)
    if seeded is not None:
        return seeded.copy()
    if not has_block_tables(trace):
        return _empty()
    states = block_states(trace, int(step))
    held = states[states["seqs"].astype(str) != ""]
    if held.empty:
        return _empty()
    frame = _blocks(trace, int(step), held) if addressing(trace) == "blocks" else _pages(trace, held)
    if frame.empty:
        return _empty()
    lt = request_lifetimes(trace).set_index("seq")
    frame["root"] = lt["root"].reindex(frame["seq"]).fillna(frame["seq"]).astype("int64").to_numpy()
    frame["request_id"] = lt["request_id"].reindex(frame["seq"]).astype(object).fillna("").to_numpy()
    frame = frame.sort_values(["seq", "index"], kind="stable").reset_index(drop=True)
    first = frame.groupby("seq").first()
    group = np.where(
        first["kind"] == "shared", "prefix@" + first["unit"].astype(str), "family " + first["root"].astype(str)
    )
    group_of = pd.Series(group, index=first.index)
    frame["group"] = group_of.reindex(frame["seq"]).to_numpy(object)
    sizes = group_of.value_counts()
    frame["group_size"] = sizes.reindex(frame["group"]).to_numpy(np.int64)
    # Largest groups first; groups of one size in the order of their first request; then families, seqs, blocks.
    frame["_first"] = frame.groupby("group")["root"].transform("min")
    order = ["group_size", "_first", "group", "root", "seq", "index"]
    frame = frame.sort_values(order, ascending=[False, True, True, True, True, True], kind="stable")
    return frame.reset_index(drop=True)[TABLE_COLUMNS]


def _blocks(trace, step: int, held: pd.DataFrame) -> pd.DataFrame:
    holders = held["seqs"].astype(str).str.split(",")
    counts = holders.str.len().to_numpy()
    frame = pd.DataFrame(
        {
            "seq": np.concatenate([np.array(h, dtype=np.int64) for h in holders]),
            "index": np.repeat(held["table_index"].to_numpy(np.int64), counts),
            "unit": np.repeat(held["unit"].to_numpy(np.int64), counts),
            "ref_count": np.repeat(held["ref_count"].to_numpy(np.int64), counts),
            "fill": np.repeat(held["fill"].to_numpy(np.int64), counts),
            "capacity_tokens": np.repeat(held["capacity_tokens"].to_numpy(np.int64), counts),
        }
    )
    # The last allocation of each block before the end of the step says whether it is a copy-on-write copy.
    pos = end_of_step(trace, step)
    # only the rows of these two kinds are read (the store holds them apart), those before the end of the step
    kinds = (Kind.BLOCK_ALLOC, Kind.BLOCK_COW)
    before = rows(trace, *kinds) < pos
    last = pd.DataFrame(
        {
            "unit": values(trace, "block", *kinds)[before],
            "cow": codes(trace, *kinds)[before] == int(Kind.BLOCK_COW),
            "source": values(trace, "aux", *kinds)[before],
        }
    ).drop_duplicates("unit", keep="last")
    last = last.set_index("unit")
    is_cow = last["cow"].reindex(frame["unit"]).fillna(False).to_numpy(bool)
    shared = frame["ref_count"].to_numpy() > 1
    frame["kind"] = np.where(shared, "shared", np.where(is_cow, "cow", "own"))
    frame["cow_source"] = np.where(is_cow & ~shared, last["source"].reindex(frame["unit"]).fillna(-1), -1).astype(
        np.int64
    )
    return frame


def _pages(trace, held: pd.DataFrame) -> pd.DataFrame:
    page = int(config_value(trace, "page_size", LEGACY_PAGE_SIZE) or LEGACY_PAGE_SIZE)
    held = held[(held["buffer"] == 0) & (held["offset"] >= 0)]
    holders = held["seqs"].astype(str).str.split(",")  # a page mapped for forked samples has several
    counts = holders.str.len().to_numpy()
    ref = np.repeat(np.maximum(held["ref_count"].to_numpy(np.int64), counts), counts)
    return pd.DataFrame(
        {
            "seq": np.concatenate([np.array(h, dtype=np.int64) for h in holders]) if len(held) else [],
            "index": np.repeat(held["offset"].to_numpy(np.int64) // page, counts),
            "unit": np.repeat(held["unit"].to_numpy(np.int64), counts),
            "ref_count": ref,
            "fill": np.repeat(held["fill"].to_numpy(np.int64), counts),
            "capacity_tokens": np.repeat(held["capacity_tokens"].to_numpy(np.int64), counts),
            "kind": np.where(ref > 1, "shared", "own"),
            "cow_source": -1,
        }
    )


def _empty() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series([], dtype="int64") for c in TABLE_COLUMNS})
    for c in ("request_id", "kind", "group"):
        frame[c] = frame[c].astype(object)
    return frame
