"""The prefix cache as an imported KV-event stream shows it (vLLM's BlockStored / BlockRemoved / AllBlocksCleared,
as the KV_* rows of kvscope.events): pure functions, Trace -> DataFrame.

One pass over the rows (cached on the trace) replays the cache: every medium (GPU, CPU, ...) holds a multiset of
nodes (a node is one (group, hash) pair; two blocks stored under one hash are two copies of one node). From it:

- cached_blocks(trace): blocks cached per medium after every row that changes them (the peak is over these)
- cache_rates(trace, bin_s): blocks stored and removed per bin of vLLM's clock, per medium
- cache_tree(trace): the prefix tree rebuilt from the hash chain (each stored block names its parent's hash)
- restored_blocks(trace): stores of a node some earlier BlockRemoved took out of that medium: prefixes the cache
  evicted and vLLM computed again (or brought back from another tier)
- block_lifetimes(trace): one row per stored copy, from its store to its removal, the clear, or the trace's end.
  Events do not say which copy of a hash a removal took; copies are matched first in, first out
- cache_summary(trace): the figures `kvscope summary` gives such a trace

What the events cannot see (block ids, never-hashed blocks, requests, hits) is in meta["kv_events"]["cannot_see"]
and is not made up here. Time `t_s` is vLLM's batch ts minus the trace's origin (seconds); `step` is the message's
sequence number.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis._events import cached, column, count, kind_codes, mask
from kvscope.events import Kind
from kvscope.importers.codec import bytes_from_chunks, hash_u64, i64_to_u64, name_from_chunks

KV_KINDS = (
    Kind.KV_BATCH,
    Kind.KV_NAME,
    Kind.KV_HASH,
    Kind.KV_STORE,
    Kind.KV_STORED,
    Kind.KV_REMOVED,
    Kind.KV_CLEARED,
    Kind.KV_GAP,
)
NO_MEDIUM = "(none)"  # a BlockStored / BlockRemoved with medium null


def has_kv_events(trace) -> bool:
    """The trace holds an imported KV-event stream: KV_BATCH rows, or the importer's meta["kv_events"] (a
    listener that has not received anything yet)."""
    return isinstance(trace.meta.get("kv_events"), dict) or count(trace, Kind.KV_BATCH) > 0


@dataclass
class _Node:
    group: int  # -1 when the events carry no group_idx
    hash: int | bytes
    parent: int = -1  # node id; -1: the chain starts here (or its parent is not known yet)
    tokens: int = 0  # tokens of this block (from its BlockStored)
    stores: int = 0
    removals: int = 0
    restores: int = 0
    first_step: int = -1
    first_t_s: float = math.nan


@dataclass
class _Replay:
    names: dict[int, str]
    nodes: list[_Node]
    points: list[tuple[int, float, str, int, int]]  # step, t_s, medium, cached in it, cached in all
    rates: list[tuple[float, str, int, int]]  # t_s, medium, stored, removed (one row per KV row)
    restores: list[tuple[int, str, int, float, int, float, int]]  # node, medium, step, t_s, removed step/t_s, tokens
    lifetimes: list[tuple[int, str, int, float, int, float, str]]  # node, medium, store step/t, end step/t, how
    batches: int = 0
    store_events: int = 0
    events: int = 0
    cleared: int = 0
    stored: int = 0
    removed: int = 0
    removed_unseen: int = 0  # removals of a copy stored before the trace began (joined a running vLLM)
    peak: int = 0
    gaps: int = 0
    missing: int = 0
    replayed: int = 0
    first_seq: int = -1
    last_seq: int = -1
    end_step: int = -1
    end_t_s: float = 0.0
    mediums: list[str] = field(default_factory=list)


def _replay(trace) -> _Replay:
    def build() -> _Replay:
        m = mask(trace, *KV_KINDS)
        codes = kind_codes(trace)[m].tolist()
        cols = {c: column(trace, c)[m].tolist() for c in ("step", "t_ns", "seq", "block", "n", "addr", "aux")}
        r = _Replay({}, [], [], [], [], [])
        name_parts: dict[int, list[int]] = defaultdict(list)
        name_len: dict[int, int] = {}
        hash_parts: dict[int, list[int]] = defaultdict(list)
        hash_len: dict[int, int] = {}
        copies: dict[tuple[str, int], deque[tuple[int, float]]] = defaultdict(deque)
        removed_at: dict[tuple[str, int], tuple[int, float]] = {}
        per_medium: dict[str, int] = defaultdict(int)
        total = 0

        def medium(name_id: int) -> str:
            return NO_MEDIUM if name_id < 0 else r.names.get(name_id, f"name {name_id}")

        def node(ident: int) -> _Node:
            while len(r.nodes) <= ident:  # declared by KV_HASH before use; a damaged trace still replays
                r.nodes.append(_Node(-1, 0))
            return r.nodes[ident]

        for i, code in enumerate(codes):
            step, t_s = cols["step"][i], cols["t_ns"][i] / 1e9
            b, n, addr, aux = cols["block"][i], cols["n"][i], cols["addr"][i], cols["aux"][i]
            if code == Kind.KV_BATCH:
                r.batches += 1
                r.events += n
                r.replayed += addr == 1
                r.first_seq = step if r.first_seq < 0 else r.first_seq
                r.last_seq, r.end_step, r.end_t_s = step, step, t_s
            elif code == Kind.KV_NAME:
                name_parts[b].append(aux)
                name_len[b] = n
                if len(name_parts[b]) * 8 >= n:
                    r.names[b] = name_from_chunks(name_parts.pop(b), n)
            elif code == Kind.KV_HASH:
                nd = node(b)
                nd.group = addr
                if n == 0:
                    nd.hash = i64_to_u64(aux)
                else:
                    hash_parts[b].append(aux)
                    hash_len[b] = n
                    nd.hash = bytes_from_chunks(hash_parts[b], n)
            elif code == Kind.KV_STORE:
                r.store_events += 1
            elif code == Kind.KV_STORED:
                med = medium(addr)
                nd = node(b)
                if nd.stores == 0:
                    nd.parent, nd.tokens, nd.first_step, nd.first_t_s = aux, n, step, t_s
                nd.stores += 1
                r.stored += 1
                key = (med, b)
                copies[key].append((step, t_s))
                if key in removed_at:
                    nd.restores += 1
                    rs, rt = removed_at[key]
                    r.restores.append((b, med, step, t_s, rs, rt, n))
                per_medium[med] += 1
                total += 1
                r.peak = max(r.peak, total)
                r.points.append((step, t_s, med, per_medium[med], total))
                r.rates.append((t_s, med, 1, 0))
            elif code == Kind.KV_REMOVED:
                med = medium(addr)
                nd = node(b)
                nd.removals += 1
                r.removed += 1
                key = (med, b)
                removed_at[key] = (step, t_s)
                r.rates.append((t_s, med, 0, 1))
                if copies[key]:
                    s0, t0 = copies[key].popleft()
                    r.lifetimes.append((b, med, s0, t0, step, t_s, "removed"))
                    per_medium[med] -= 1
                    total -= 1
                    r.points.append((step, t_s, med, per_medium[med], total))
                else:
                    r.removed_unseen += 1
            elif code == Kind.KV_CLEARED:
                r.cleared += 1
                for (med, b2), q in copies.items():
                    r.lifetimes.extend((b2, med, s0, t0, step, t_s, "cleared") for s0, t0 in q)
                    q.clear()
                for med in list(per_medium):
                    if per_medium[med]:
                        per_medium[med] = 0
                        r.points.append((step, t_s, med, 0, 0))
                total = 0
            elif code == Kind.KV_GAP:
                r.gaps += 1
                r.missing += n - aux
        for (med, b2), q in copies.items():  # still cached when the trace ends: lifetimes cut there
            r.lifetimes.extend((b2, med, s0, t0, r.end_step, r.end_t_s, "cached at end") for s0, t0 in q)
        r.mediums = sorted(per_medium)
        return r

    return cached(trace, "kv_cache_replay", build)


# ---- frames -----------------------------------------------------------------------------------------------------
def cached_blocks(trace) -> pd.DataFrame:
    """One row per change: step, t_s, medium, cached (blocks cached in that medium after it), total (in every
    medium). A clear gives every medium a row at 0."""
    r = _replay(trace)
    frame = pd.DataFrame(r.points, columns=["step", "t_s", "medium", "cached", "total"])
    return frame.astype({"step": "int64", "t_s": "float64", "cached": "int64", "total": "int64"})


def cache_rates(trace, bin_s: float | None = None) -> pd.DataFrame:
    """Blocks stored and removed per bin of vLLM's clock: t_s (bin start), medium, stored, removed, bin_s,
    stored_per_s, removed_per_s. bin_s None: 1 s, or the least of 1, 2, 5 x 10^k s giving at most 1000 bins."""
    r = _replay(trace)
    columns = ["t_s", "medium", "stored", "removed", "bin_s", "stored_per_s", "removed_per_s"]
    if not r.rates:
        return pd.DataFrame({c: pd.Series([], dtype="object" if c == "medium" else "float64") for c in columns})
    raw = pd.DataFrame(r.rates, columns=["t_s", "medium", "stored", "removed"])
    width = bin_s if bin_s is not None else _bin_width(float(raw["t_s"].max() - raw["t_s"].min()))
    if not width > 0:
        raise ValueError(f"bin_s {bin_s}: must be positive")
    raw["t_s"] = np.floor(raw["t_s"] / width) * width
    frame = raw.groupby(["t_s", "medium"], as_index=False)[["stored", "removed"]].sum()
    frame["bin_s"] = width
    frame["stored_per_s"] = frame["stored"] / width
    frame["removed_per_s"] = frame["removed"] / width
    return frame[columns]


def _bin_width(span: float, max_bins: int = 1000) -> float:
    width = 1.0
    while span / width > max_bins:
        for step in (2.0, 2.5, 2.0):  # 1 -> 2 -> 5 -> 10 -> ...
            width *= step
            if span / width <= max_bins:
                break
    return width


TREE_COLUMNS = ["node", "parent", "depth", "tokens", "group", "hash", "stores", "removals", "restores", "cached"]


def cache_tree(trace) -> pd.DataFrame:
    """The prefix tree from the hash chain, one row per node: node, parent (-1: a chain's first block, or a
    parent the trace never met), depth (blocks from the chain's start as far as the trace knows), tokens (the
    prefix's tokens up to and including this block), group (-1 none), hash (uint64: an integer hash itself, for a
    bytes hash vLLM's int form of it), hash_hex (the full hash), stores, removals, restores, cached (copies cached
    at the end), first_step, first_t_s, stored (False: only met as a parent). Also the columns viz's tree reads."""
    r = _replay(trace)
    cached_now: dict[int, int] = defaultdict(int)
    for b, _med, _s0, _t0, _s1, _t1, how in r.lifetimes:
        cached_now[b] += how == "cached at end"
    depth: dict[int, int] = {}
    tokens: dict[int, int] = {}
    for ident in range(len(r.nodes)):  # iterative: chains can be thousands of blocks long
        path = []
        cur = ident
        while cur >= 0 and cur not in depth and cur < len(r.nodes) and cur not in path:
            path.append(cur)
            cur = r.nodes[cur].parent
        base_d = depth.get(cur, 0) if cur >= 0 else 0
        base_t = tokens.get(cur, 0) if cur >= 0 else 0
        for p in reversed(path):
            base_d, base_t = base_d + 1, base_t + r.nodes[p].tokens
            depth[p], tokens[p] = base_d, base_t
    nodes = r.nodes
    frame = pd.DataFrame(
        {
            "node": np.arange(len(nodes), dtype=np.int64),
            "parent": np.array([nd.parent for nd in nodes], np.int64),
            "depth": np.array([depth.get(i, 1) for i in range(len(nodes))], np.int64),
            "tokens": np.array([tokens.get(i, 0) for i in range(len(nodes))], np.int64),
            "group": np.array([nd.group for nd in nodes], np.int64),
            "hash": np.array([hash_u64(nd.hash) for nd in nodes], np.uint64),
            "hash_hex": [nd.hash.hex() if isinstance(nd.hash, bytes) else f"{nd.hash:016x}" for nd in nodes],
            "stores": np.array([nd.stores for nd in nodes], np.int64),
            "removals": np.array([nd.removals for nd in nodes], np.int64),
            "restores": np.array([nd.restores for nd in nodes], np.int64),
            "cached": np.array([cached_now[i] for i in range(len(nodes))], np.int64),
            "first_step": np.array([nd.first_step for nd in nodes], np.int64),
            "first_t_s": np.array([nd.first_t_s for nd in nodes], np.float64),
            "stored": np.array([nd.stores > 0 for nd in nodes], bool),
        }
    )
    return frame


def restored_blocks(trace) -> pd.DataFrame:
    """One row per store of a node that a BlockRemoved had taken out of the same medium before: node, medium,
    step, t_s, removed_step, removed_t_s (the last removal before it), gap_s, tokens (of the block: recomputed
    unless another tier supplied it)."""
    r = _replay(trace)
    frame = pd.DataFrame(
        r.restores, columns=["node", "medium", "step", "t_s", "removed_step", "removed_t_s", "tokens"]
    ).astype({"node": "int64", "step": "int64", "t_s": "float64", "removed_step": "int64"})
    frame["removed_t_s"] = frame["removed_t_s"].astype("float64")
    frame["gap_s"] = frame["t_s"] - frame["removed_t_s"]
    return frame.astype({"tokens": "int64"})


def block_lifetimes(trace) -> pd.DataFrame:
    """One row per stored copy: node, medium, store_step, store_t_s, end_step, end_t_s, end ('removed',
    'cleared' or 'cached at end': the last is cut at the trace's end), lifetime_s."""
    r = _replay(trace)
    frame = pd.DataFrame(
        r.lifetimes, columns=["node", "medium", "store_step", "store_t_s", "end_step", "end_t_s", "end"]
    ).astype({"node": "int64", "store_step": "int64", "end_step": "int64"})
    frame = frame.astype({"store_t_s": "float64", "end_t_s": "float64"})
    frame["lifetime_s"] = frame["end_t_s"] - frame["store_t_s"]
    return frame.sort_values(["store_step", "node"], kind="stable").reset_index(drop=True)


def cache_summary(trace) -> dict[str, Any]:
    """The figures of a KV-event trace (JSON-serializable): source, messages, kv_events (vLLM events), store_events,
    remove_events, cleared (AllBlocksCleared events), blocks_stored, blocks_removed (blocks, not events),
    distinct_hashes (nodes stored), cached_blocks_peak (most blocks cached at once, every medium together, after
    any event), cached_blocks_end, restored_after_eviction (stored blocks whose hash a BlockRemoved took out of
    that medium earlier), restored_tokens, removed_unseen (removals of blocks stored before the trace began),
    mediums, median_block_lifetime_s (of copies removed or cleared), first_seq, last_seq, gaps, messages_missing,
    messages_replayed, ts_span_s (vLLM's clock from the first message to the last)."""
    r = _replay(trace)
    lt = block_lifetimes(trace)
    ended = lt[lt["end"] != "cached at end"]["lifetime_s"]
    batch_t = column(trace, "t_ns")[mask(trace, Kind.KV_BATCH)]
    return {
        "source": str(trace.meta.get("source") or "kv-events"),
        "messages": r.batches,
        "kv_events": r.events,
        "store_events": r.store_events,
        "remove_events": r.events - r.store_events - r.cleared,
        "cleared": r.cleared,
        "blocks_stored": r.stored,
        "blocks_removed": r.removed,
        "distinct_hashes": int(sum(nd.stores > 0 for nd in r.nodes)),
        "cached_blocks_peak": r.peak,
        "cached_blocks_end": int((lt["end"] == "cached at end").sum()),
        "restored_after_eviction": len(r.restores),
        "restored_tokens": int(sum(x[6] for x in r.restores)),
        "removed_unseen": r.removed_unseen,
        "mediums": ", ".join(r.mediums),
        "median_block_lifetime_s": float(ended.median()) if len(ended) else None,
        "first_seq": r.first_seq,
        "last_seq": r.last_seq,
        "gaps": r.gaps,
        "messages_missing": r.missing,
        "messages_replayed": r.replayed,
        "ts_span_s": float((batch_t.max() - batch_t.min()) / 1e9) if len(batch_t) else 0.0,
    }


def cannot_see(trace) -> list[str]:
    """What the trace's source says it cannot see (meta['kv_events']['cannot_see']), for captions."""
    kv = trace.meta.get("kv_events") or {}
    notes = kv.get("cannot_see") if isinstance(kv, dict) else None
    return [str(n) for n in notes] if isinstance(notes, list) else []


def kv_trace_summary(trace) -> dict[str, Any]:
    """What summarize() gives a KV-event trace: the run's identity (allocator, label, allocator_config, truncated,
    events: rows in the trace) and cache_summary's figures. Engine figures (device, model, requests, tokens,
    memory, steps, throughput) are left out: the events do not carry them (meta['kv_events']['cannot_see'])."""
    meta = trace.meta
    return {
        "allocator": str(meta.get("allocator", "unknown")),
        "label": trace.label,
        "allocator_config": dict(meta.get("allocator_config") or {}),
        "truncated": bool(trace.truncated),
        "events": trace.num_events,
        **cache_summary(trace),
    }
