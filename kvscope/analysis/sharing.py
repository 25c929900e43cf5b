"""Sharing: blocks held by several sequences, the fork tree, and the prefix-cache tree with its hit statistics.

Savings from sharing in bytes are in the memory timeline (`sharing_saved` = logical - used); the PagedAttention
paper's saving (1 - units held with sharing / units the same sequences would hold without it, over the run's steps)
is `sharing_saving_mean` here. This module also says who shares what. The prefix tree is rebuilt from BLOCK_CACHE
events (a block became full and got its chained hash) and the sequences' block tables replayed from BLOCK_ALLOC /
BLOCK_SHARE / BLOCK_COW / BLOCK_FREE: the parent of a cached block is the block before it in the table of the
sequence that cached it, i.e. the previous link of its hash chain.
"""

# This module is longer than 400 lines: who shares what (edges, the fork tree, the prefix tree) and how much sharing
# saves (the paper's per-step unit counts) are replays of the same sharing events, kept next to each other.

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis._events import (
    cached,
    column,
    config_value,
    count,
    kind_codes,
    mask,
    requests_meta,
    select,
    step_clock,
    step_cuts,
)
from kvscope.analysis.fragmentation import block_states
from kvscope.analysis.memory import memory_timeline
from kvscope.analysis.replay import ReplayError, addressing
from kvscope.analysis.replay.blocks import LEGACY_BLOCK_SIZE
from kvscope.analysis.requests import request_lifetimes
from kvscope.events import Kind

EDGE_COLUMNS = ["seq", "block", "ref_count", "table_index"]
FORK_COLUMNS = ["child", "parent", "step", "t_s", "tokens", "root", "depth"]
TREE_COLUMNS = [
    "node",
    "parent",
    "block",
    "depth",
    "hits",
    "tokens",
    "hash",
    "stores",
    "evictions",
    "cached",
    "first_step",
]


def sharing_edges(trace, step: int) -> pd.DataFrame:
    """One row per (sequence, shared block) at the end of `step`: seq, block, ref_count (> 1: holders of the block),
    table_index (where the block sits in the sequence's block table). Blocks held by one sequence are left out.
    Only block-addressed traces (kvscope.analysis.replay: paged and the like) share blocks; others give an empty
    frame."""
    if _addressing(trace) != "blocks" or not count(trace, Kind.BLOCK_ALLOC):
        return _empty_edges()
    states = block_states(trace, step)
    shared = states[states["ref_count"] > 1]
    if shared.empty:
        return _empty_edges()
    holders = shared["seqs"].str.split(",")
    edges = pd.DataFrame(
        {
            "seq": np.concatenate([np.array(h, dtype=np.int64) for h in holders]),
            "block": np.repeat(shared["unit"].to_numpy(), holders.str.len().to_numpy()),
            "ref_count": np.repeat(shared["ref_count"].to_numpy(), holders.str.len().to_numpy()),
            "table_index": np.repeat(shared["table_index"].to_numpy(), holders.str.len().to_numpy()),
        }
    )
    return edges.sort_values(["block", "seq"], kind="stable").reset_index(drop=True)[EDGE_COLUMNS]


def _addressing(trace) -> str | None:
    try:
        return addressing(trace)
    except ReplayError:
        return None


def _empty_edges() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype="int64") for c in EDGE_COLUMNS})


def fork_tree(trace) -> pd.DataFrame:
    """One row per forked sequence (parallel sampling, beam search): child, parent, step (when it forked), t_s,
    tokens (it started with), root (the request's seq), depth (1 for a child of a request)."""
    forks = select(trace, Kind.FORK).drop_duplicates("seq", keep="first")
    if forks.empty:
        frame = pd.DataFrame({c: pd.Series([], dtype="int64") for c in FORK_COLUMNS})
        frame["t_s"] = frame["t_s"].astype("float64")
        return frame
    clock = step_clock(trace)
    t_of = dict(zip(clock["step"].tolist(), clock["t_s"].tolist(), strict=True))
    parent_of = dict(zip(forks["seq"].tolist(), forks["aux"].tolist(), strict=True))
    roots, depths = [], []
    for child in forks["seq"].tolist():
        node, depth = child, 0
        while node in parent_of and depth <= len(parent_of):
            node, depth = parent_of[node], depth + 1
        roots.append(node)
        depths.append(depth)
    frame = pd.DataFrame(
        {
            "child": forks["seq"].to_numpy(np.int64),
            "parent": forks["aux"].to_numpy(np.int64),
            "step": forks["step"].to_numpy(np.int64),
            "t_s": [t_of.get(s, np.nan) for s in forks["step"].tolist()],
            "tokens": forks["n"].to_numpy(np.int64),
            "root": np.array(roots, np.int64),
            "depth": np.array(depths, np.int64),
        }
    )
    return frame.reset_index(drop=True)


# ---- prefix tree ------------------------------------------------------------------------------------------------
@dataclass
class _Node:
    id: int
    parent: int
    depth: int
    block: int
    hash: int
    first_step: int
    hits: int = 0
    stores: int = 0
    evictions: int = 0
    blocks: set[int] = field(default_factory=set)  # blocks carrying this hash now


@dataclass
class _PrefixPass:
    nodes: list[_Node]
    hits_first: dict[int, int]  # seq -> hit tokens at its first admission
    hits_readmit: dict[int, int]  # seq -> hit tokens at re-admissions after a preemption
    peak_cached_blocks: int


def _prefix_pass(trace) -> _PrefixPass:
    """One pass over the paged events: block tables per sequence, hashes per block, a node per distinct hash."""

    def build() -> _PrefixPass:
        bs = int(config_value(trace, "block_size", LEGACY_BLOCK_SIZE) or LEGACY_BLOCK_SIZE)
        kinds = (
            Kind.BLOCK_ALLOC,
            Kind.BLOCK_SHARE,
            Kind.BLOCK_COW,
            Kind.BLOCK_FREE,
            Kind.BLOCK_CACHE,
            Kind.BLOCK_EVICT,
            Kind.PREFIX_HIT,
            Kind.PREEMPT,
            Kind.FORK,
        )
        m = mask(trace, *kinds)
        rows = zip(
            kind_codes(trace)[m].tolist(),
            column(trace, "step")[m].tolist(),
            *(column(trace, c)[m].tolist() for c in ("seq", "block", "n", "addr", "aux")),
            strict=True,
        )
        ALLOC, SHARE, COW, FREE, CACHE, EVICT, HIT, PREEMPT, FORK = (int(k) for k in kinds)
        table: dict[int, dict[int, int]] = {}  # seq -> index -> block
        where: dict[int, dict[int, int]] = {}  # seq -> block -> index
        block_node: dict[int, _Node] = {}  # block -> node of the hash it carries
        by_hash: dict[int, _Node] = {}
        nodes: list[_Node] = []
        preempted: set[int] = set()
        hits_first: dict[int, int] = {}
        hits_readmit: dict[int, int] = {}
        cached_blocks = peak = 0
        for code, step, seq, b, n, addr, aux in rows:
            if code in (ALLOC, SHARE, COW):
                table.setdefault(seq, {})[addr] = b
                where.setdefault(seq, {})[b] = addr
                if code != SHARE and b in block_node:  # a fresh block carries no hash any more
                    block_node.pop(b).blocks.discard(b)
                    cached_blocks -= 1
            elif code == FREE:
                idx = where.get(seq, {}).pop(b, None)
                if idx is not None and table[seq].get(idx) == b:
                    del table[seq][idx]
            elif code == CACHE:
                idx = where.get(seq, {}).get(b, -1)
                parent_block = table.get(seq, {}).get(idx - 1) if idx > 0 else None
                parent = block_node.get(parent_block) if parent_block is not None else None
                node = by_hash.get(aux)
                if node is None:
                    node = _Node(len(nodes), parent.id if parent else -1, idx + 1 if idx >= 0 else 0, b, aux, step)
                    nodes.append(node)
                    by_hash[aux] = node
                node.stores += 1
                node.block = b
                old = block_node.get(b)
                if old is not node:
                    if old is not None:
                        old.blocks.discard(b)
                    else:
                        cached_blocks += 1
                    node.blocks.add(b)
                    block_node[b] = node
                peak = max(peak, cached_blocks)
            elif code == EVICT:
                node = block_node.pop(b, None)
                if node is not None:
                    node.blocks.discard(b)
                    node.evictions += 1
                    cached_blocks -= 1
            elif code == HIT:
                target = hits_readmit if seq in preempted else hits_first
                target[seq] = target.get(seq, 0) + n
                seq_table = table.get(seq, {})
                for i in range(-(-n // bs)):  # a re-admission's n may end inside a block (output after it)
                    node = block_node.get(seq_table.get(i, -1))
                    if node is not None:
                        node.hits += 1
            elif code in (PREEMPT, FORK):  # later hits of this seq serve the request's work again
                preempted.add(seq)
        return _PrefixPass(nodes, hits_first, hits_readmit, peak)

    return cached(trace, "prefix_pass", build)


def prefix_tree(trace) -> pd.DataFrame:
    """One row per distinct cached block hash (a prefix-cache node): node (id, 0..N-1), parent (node id of the
    previous block of the chain, -1 for a first block), block (the last physical block that carried it), depth
    (blocks from the start of the prompt: 1 for a first block), hits (admissions that were served this block from
    the cache; re-admissions after a preemption included), tokens (depth x block size: prompt tokens the chain
    covers), hash (int64 prefix of the chained hash), stores (times a block got this hash: first computation,
    recomputation after an eviction, swap-in), evictions, cached (some block still carries it at the end of the
    trace), first_step. Empty for traces without prefix caching."""
    p = _prefix_pass(trace)
    bs = int(config_value(trace, "block_size", LEGACY_BLOCK_SIZE) or LEGACY_BLOCK_SIZE)
    if not p.nodes:
        frame = pd.DataFrame({c: pd.Series([], dtype="int64") for c in TREE_COLUMNS})
        frame["cached"] = frame["cached"].astype(bool)
        return frame
    frame = pd.DataFrame(
        {
            "node": [n.id for n in p.nodes],
            "parent": [n.parent for n in p.nodes],
            "block": [n.block for n in p.nodes],
            "depth": [n.depth for n in p.nodes],
            "hits": [n.hits for n in p.nodes],
            "tokens": [n.depth * bs for n in p.nodes],
            "hash": [n.hash for n in p.nodes],
            "stores": [n.stores for n in p.nodes],
            "evictions": [n.evictions for n in p.nodes],
            "cached": [bool(n.blocks) for n in p.nodes],
            "first_step": [n.first_step for n in p.nodes],
        }
    ).astype({c: "int64" for c in TREE_COLUMNS if c != "cached"})
    return frame[TREE_COLUMNS]


def prefix_stats(trace) -> dict[str, Any]:
    """Prefix-cache figures (JSON-serializable):

    enabled (the allocator config says prefix caching is on, or the trace has prefix hits); block_size;
    prompt_tokens (prompt tokens of admitted requests, each request once); hit_tokens (tokens served from the cache
    at requests' first admissions); hit_rate (hit_tokens / prompt_tokens); readmission_hit_tokens (served at
    re-admissions after a recompute preemption, or at the late admission of a forked sample that had no memory at
    its fork: tokens the run had already computed for that request, so not counted as hits); requests_with_hits;
    cacheable_tokens (the most a perfect cache could serve at block granularity: floor((P - 1) / B) x B per
    prompt, the last prompt token being always computed); floor_lost_tokens (prompt tokens below that bound:
    (P - 1) mod B per prompt, the partly filled last block no later request can be served from);
    shared_prefix_floor_lost_tokens (when the workload recorded each request's declared shared prefix length L in
    meta['requests']['shared_prefix_len']: over requests that got hits, min(L, P - 1) minus the tokens served,
    the part of a shared prefix the block-size floor kept from being served; else None); nodes, stores,
    evictions, peak_cached_blocks, hit_nodes (nodes hit at least once)."""
    return dict(cached(trace, "prefix_stats", lambda: _prefix_stats(trace)))


def _prefix_stats(trace) -> dict[str, Any]:
    bs = int(config_value(trace, "block_size", LEGACY_BLOCK_SIZE) or LEGACY_BLOCK_SIZE)
    p = _prefix_pass(trace)
    lt = request_lifetimes(trace)
    roots = lt[(lt["parent"] < 0) & (lt["admit_step"] >= 0) & (lt["prompt_len"] > 0)]
    prompt = roots["prompt_len"].to_numpy(np.int64)
    hit_tokens = int(sum(p.hits_first.values()))
    prompt_tokens = int(prompt.sum())
    shared_lost = None
    meta = requests_meta(trace)
    if len(meta) and "shared_prefix_len" in meta.columns:
        shared = pd.to_numeric(meta.set_index("seq")["shared_prefix_len"], errors="coerce").fillna(0)
        got = pd.Series(p.hits_first, dtype="int64")
        got = got[got > 0]
        lengths = shared.reindex(got.index).fillna(0).to_numpy(np.int64)
        prompts = lt.set_index("seq")["prompt_len"].reindex(got.index).to_numpy(np.int64)
        shared_lost = int(np.maximum(np.minimum(lengths, prompts - 1) - got.to_numpy(), 0).sum())
    nodes = p.nodes
    return {
        "enabled": bool(config_value(trace, "prefix_caching", False)) or bool(p.hits_first or p.hits_readmit),
        "block_size": bs,
        "prompt_tokens": prompt_tokens,
        "hit_tokens": hit_tokens,
        "hit_rate": hit_tokens / prompt_tokens if prompt_tokens else 0.0,
        "readmission_hit_tokens": int(sum(p.hits_readmit.values())),
        "requests_with_hits": int(sum(1 for v in p.hits_first.values() if v > 0)),
        "cacheable_tokens": int(((prompt - 1) // bs * bs).sum()),
        "floor_lost_tokens": int(((prompt - 1) % bs).sum()),
        "shared_prefix_floor_lost_tokens": shared_lost,
        "nodes": len(nodes),
        "stores": int(sum(n.stores for n in nodes)),
        "evictions": int(sum(n.evictions for n in nodes)),
        "peak_cached_blocks": int(p.peak_cached_blocks),
        "hit_nodes": int(sum(1 for n in nodes if n.hits)),
    }


# ---- the PagedAttention paper's saving ----------------------------------------------------------------------------
SAVING_COLUMNS = ["step", "units_with", "units_without", "saving"]
# The lifecycle events that say how many tokens each sequence holds in device memory (see _held_units).
_HELD = (Kind.ADMIT, Kind.APPEND, Kind.FORK, Kind.PREEMPT, Kind.SWAP_IN, Kind.FINISH, Kind.REJECT, Kind.PRUNE)
_SWAP_PREEMPTION = 1  # PREEMPT aux: the tokens go to CPU memory (they leave the device pool, not the sequence)


@dataclass(frozen=True)
class SharingUnit:
    """The unit the paper's saving counts in: a block (blocks addressing), a page-group (pages: one page of each
    buffer at one position of a slot) or a token row (rows: static reservations, which never share). `bytes` is
    one unit's device bytes; `tokens_of(t)` the units t tokens need on their own."""

    name: str
    bytes: int
    row_bytes: int  # bytes of one token in one unit's span (blocks, rows: a token; pages: one buffer's row)
    page_bytes: int  # pages: one page; blocks: block_size x row_bytes; rows: row_bytes

    def units(self, tokens: int) -> int:
        return -(-tokens * self.row_bytes // self.page_bytes)


def sharing_unit(trace) -> SharingUnit | None:
    """The trace's SharingUnit, from its addressing and allocator config (None when it cannot be replayed)."""
    family = _addressing(trace)
    bpt = int(trace.bytes_per_token)
    if family == "blocks":
        bs = int(config_value(trace, "block_size", LEGACY_BLOCK_SIZE) or LEGACY_BLOCK_SIZE)
        return SharingUnit("block", bs * bpt, 1, bs)
    if family == "pages":
        page = int(config_value(trace, "page_size", 0) or 0)
        row = int(config_value(trace, "buffer_row_bytes", 0) or 0)
        buffers = int(config_value(trace, "buffers", 0) or 0)
        if page <= 0 or row <= 0 or buffers <= 0:
            return None
        return SharingUnit("page-group", page * buffers, row, page)
    if family == "rows":
        return SharingUnit("token", bpt, 1, 1)
    return None


def sharing_savings(trace) -> pd.DataFrame:
    """The PagedAttention paper's sharing saving, step by step (one row per step whose end finds tokens held):
    step; units_with (the units the allocator holds for live sequences' tokens at the end of the step, a shared
    unit counted once: the ACCT samples' used + internal bytes over the unit's bytes, so neither mapped-ahead or
    mapped-idle pages nor cached-idle blocks count); units_without (the units the same sequences would hold
    without sharing: each sequence's held tokens rounded up to whole units on their own; sequences swapped out to
    CPU memory hold none); saving (1 - units_with / units_without). Units: see SharingUnit (blocks, VMM page-groups
    or token rows). Empty for traces without the samples or an unknown addressing."""

    def build() -> pd.DataFrame:
        unit = sharing_unit(trace)
        tl = memory_timeline(trace)
        if unit is None or tl.empty:
            return _empty_savings()
        steps = tl["step"].to_numpy(np.int64)
        held = (tl["used"] + (tl["internal"] if unit.name != "token" else 0)).to_numpy(np.float64)
        with_units = held / unit.bytes
        without = _held_units(trace, unit, steps)
        keep = without > 0
        frame = pd.DataFrame(
            {
                "step": steps[keep],
                "units_with": with_units[keep],
                "units_without": without[keep].astype(np.float64),
            }
        )
        frame["saving"] = 1.0 - frame["units_with"] / frame["units_without"]
        return frame[SAVING_COLUMNS]

    return cached(trace, "sharing_savings", build).copy()


def sharing_saving_mean(trace) -> float | None:
    """1 - (units held with sharing, summed over the run's steps) / (units the same sequences would hold without
    sharing, summed over the same steps): the paper's saving averaged over the run (see sharing_savings for the
    units and what counts). None when no step ends with tokens held."""
    frame = sharing_savings(trace)
    total = float(frame["units_without"].sum())
    if total <= 0:
        return None
    return 1.0 - float(frame["units_with"].sum()) / total


# _held_units reads the lifecycle events this many at a time: a dozen int64 arrays of a piece are alive at once.
PIECE_ROWS = 1 << 18


def _held_units(trace, unit: SharingUnit, steps: np.ndarray) -> np.ndarray:
    """Per step in `steps`: the sum over sequences in device memory at the step's end of unit.units(tokens held).
    Tokens held follow the scheduler's lifecycle events: ADMIT (aux: prefix-cache hit tokens it starts with),
    APPEND (aux: tokens after), FORK (n: tokens it starts with), a swap preemption (the tokens leave the device
    until SWAP_IN), and FINISH / REJECT / PRUNE / a recompute preemption (nothing left).

    Vectorised over the events in row order, a piece at a time, with each sequence's tokens carried between pieces
    in a table indexed by seq; traces whose seq ids span too wide a range for that table take the event loop
    (_held_units_loop), which defines the same numbers."""
    seq_range = trace.store.value_range("seq", [int(k) for k in _HELD])
    if seq_range is None:
        return np.zeros(len(steps), np.int64)
    lo, hi = seq_range
    if hi - lo > (1 << 26):
        return _held_units_loop(trace, unit, steps)
    step_ids, cuts = step_cuts(trace)
    cut_of = dict(zip(step_ids.tolist(), cuts.tolist(), strict=True))
    ends = np.array([cut_of.get(s, 0) for s in steps.tolist()], np.int64)
    ends = np.maximum.accumulate(ends) if len(ends) else ends
    upto = trace.store.count_before([int(k) for k in _HELD], ends)  # events before each end
    ADMIT, APPEND, FORK, PREEMPT, SWAP_IN = (int(k) for k in _HELD[:5])
    row, page = int(unit.row_bytes), int(unit.page_bytes)

    def cost(tokens: np.ndarray) -> np.ndarray:
        return -(-tokens * row // page)

    tokens = np.zeros(hi - lo + 1, np.int64)  # per seq - lo: tokens held in device memory (carried)
    swapped = np.zeros(hi - lo + 1, np.int64)  # tokens it holds in CPU memory
    has_swapped = np.zeros(hi - lo + 1, bool)
    out = np.zeros(len(steps), np.int64)
    units = 0
    done = 0  # events handled so far
    for piece in trace.store.pieces([int(k) for k in _HELD], ("seq", "n", "aux"), size=PIECE_ROWS):
        code = piece["code"]
        q = piece["seq"].astype(np.int64) - lo
        n, aux = piece["n"].astype(np.int64), piece["aux"].astype(np.int64)
        new = np.where((code == APPEND) | (code == ADMIT), np.maximum(aux, 0), np.where(code == FORK, n, 0))
        # stable, so any integer type gives one order: 16-bit ids sort by radix, several times faster
        order = np.argsort(q.astype(np.uint16) if hi - lo < (1 << 16) else q, kind="stable")
        sq = q[order]
        first = np.r_[True, sq[1:] != sq[:-1]] if len(sq) else np.zeros(0, bool)
        last = np.r_[sq[1:] != sq[:-1], True] if len(sq) else np.zeros(0, bool)
        swap_pre = (code == PREEMPT) & (aux == _SWAP_PREEMPTION)
        swap_in = code == SWAP_IN
        if swap_pre.any() or swap_in.any():
            rel = (swap_pre | swap_in)[order]
            at = np.arange(len(sq))
            group_start = np.maximum.accumulate(np.where(first, at, 0))
            last_incl = np.maximum.accumulate(np.where(rel, at, -1))
            before = np.r_[-1, last_incl[:-1]]
            in_group = before >= group_start
            n_sorted, pre_sorted = n[order], swap_pre[order]
            from_piece = np.where(pre_sorted[np.maximum(before, 0)], n_sorted[np.maximum(before, 0)], 0)
            carried = np.where(has_swapped[sq], swapped[sq], 0)
            value = np.where(in_group, from_piece, carried)
            new_sorted = new[order]
            new_sorted = np.where(swap_in[order], value, new_sorted)
            new[order] = new_sorted
            # the CPU copies each sequence has after the piece: its last swap preemption or swap-in decides
            end_rel = last_incl[last]
            ok = end_rel >= group_start[last]
            seqs_end = sq[last][ok]
            j = end_rel[ok]
            has_swapped[seqs_end] = pre_sorted[j]
            swapped[seqs_end] = np.where(pre_sorted[j], n_sorted[j], 0)
        new_sorted = new[order]
        # each event's units before it: the previous event's of the same seq (sorted by seq, the one before), or
        # the carried tokens' for a seq's first event of the piece
        cost_new = cost(new_sorted)
        cost_prev = np.r_[0, cost_new[:-1]] if len(cost_new) else cost_new
        cost_prev[first] = cost(tokens[sq[first]])
        delta = np.empty(len(q), np.int64)
        delta[order] = cost_new - cost_prev
        tokens[sq[last]] = new_sorted[last]
        after = units + np.cumsum(delta)  # units held after each event of the piece
        hit = (upto > done) & (upto <= done + len(q))
        out[hit] = after[upto[hit] - 1 - done]
        if len(after):
            units = int(after[-1])
        done += len(q)
    out[upto > done] = units
    return out


def _held_units_loop(trace, unit: SharingUnit, steps: np.ndarray) -> np.ndarray:
    """_held_units by an event loop, for traces whose seq ids are too spread out for its table."""
    m = mask(trace, *_HELD)
    codes = kind_codes(trace)[m].tolist()
    seqs = column(trace, "seq")[m].tolist()
    ns = column(trace, "n")[m].tolist()
    auxs = column(trace, "aux")[m].tolist()
    rows = np.flatnonzero(m)
    step_ids, cuts = step_cuts(trace)
    cut_of = dict(zip(step_ids.tolist(), cuts.tolist(), strict=True))
    ADMIT, APPEND, FORK, PREEMPT, SWAP_IN = (int(k) for k in _HELD[:5])
    tokens: dict[int, int] = {}  # seq -> tokens held in device memory
    swapped: dict[int, int] = {}  # seq -> tokens it holds in CPU memory
    units = 0
    out = np.zeros(len(steps), np.int64)
    i = 0
    cost = unit.units
    for j, step in enumerate(steps.tolist()):
        end = cut_of.get(step, 0)
        while i < len(rows) and rows[i] < end:
            code, seq, n, aux = codes[i], seqs[i], ns[i], auxs[i]
            units -= cost(tokens.pop(seq, 0))
            if code in (APPEND, ADMIT):
                tokens[seq] = max(aux, 0)
            elif code == FORK:
                tokens[seq] = n
            elif code == PREEMPT and aux == _SWAP_PREEMPTION:
                swapped[seq] = n
            elif code == SWAP_IN:
                tokens[seq] = swapped.pop(seq, 0)
            units += cost(tokens.get(seq, 0))
            i += 1
        out[j] = units
    return out


def _empty_savings() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series([], dtype="float64") for c in SAVING_COLUMNS})
    frame["step"] = frame["step"].astype("int64")
    return frame
