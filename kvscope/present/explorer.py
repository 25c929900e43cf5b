"""What the notebook explorer (kvscope.widgets) shows of a trace, as small JSON-ready payloads its front end
(kvscope/templates/explorer.js) only draws: the block map at a step, the sharing tree at a step and the memory
timeline of the whole run, on one step cursor.

Everything here comes from kvscope.analysis, binned so that a big run stays small on the wire:

    header()          trace label, step range, the start step, the map's states with their colours and labels
    blocks()          the block map's cells: unit ranges (at most MAX_CELLS cells: big pools are binned)
    timeline()        the memory stack (analysis.memory.memory_timeline) as shares of capacity, at most MAX_POINTS
                      per-bin means, with its tick labels
    tree(kind)        the sharing tree: "prefix" (analysis.sharing.prefix_tree, a fixed icicle layout) or "forks"
                      (analysis.sharing.fork_tree: laid out at each step), its legend and caption
    step(s, kind)     what changes with the cursor (~15 KB for a 2,048-cell map): each cell's mix of states
                      (analysis.fragmentation.state_matrix at the step: one byte per state and cell) and fill
                      (fill_matrix: one byte per cell), the tree's states at the step, and the memory readout
    cell_text(s, c)   what a clicked cell holds at the step (analysis.fragmentation.block_states)

Bytes travel as base64 strings inside JSON, which every widget host (JupyterLab, VS Code, Colab, marimo) carries.
"""

# This module is longer than 400 lines: the explorer's three views are laid out from one trace on one cursor
# (the map's cells, the two kinds of tree and the timeline share the step snapping and the payload format), so
# they are kept in one place; the widget and its front end only move and draw what this module computes.

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kvscope.analysis import fragmentation, memory, sharing
from kvscope.analysis.replay import addressing
from kvscope.present.rows import format_value
from kvscope.present.views import ENGINE_ABSENT, VIEWS, caches_prefixes, records_engine, start_step
from kvscope.trace import Trace
from kvscope.units import format_bytes
from kvscope.viz._common import bin_steps
from kvscope.viz.palette import MEMORY_BANDS, STATE_COLORS, STATE_LABELS, STATE_ORDER
from kvscope.viz.sharing import EVICTED_COLOR

MAX_CELLS = 2048  # block-map cells: pools with more units are binned into this many ranges
MAX_POINTS = 800  # timeline points: longer runs show per-bin means
MAX_BOXES = 400  # tree boxes: past it the most hit prefixes (or the first families) are kept
NO_FILL = 255  # a cell's fill byte when nothing in it is reserved (fill 0..1 is sent as 0..254)
UNIT_WORDS = {"blocks": "block", "pages": "page", "rows": "row"}

# The sharing tree's states, by index (the front end colours box i with legend[state[i]]).
PREFIX_LEGEND = [
    {"key": "later", "label": "not computed yet", "color": "#ffffff"},
    {"key": "in_use", "label": "held by a running sequence", "color": STATE_COLORS["active"]},
    {"key": "cached_idle", "label": "cached idle (ref 0, reusable)", "color": STATE_COLORS["cached_idle"]},
    {"key": "evicted", "label": "evicted", "color": EVICTED_COLOR},
]
FORK_LEGEND = [
    {"key": "alive", "label": "holds KV memory at the step", "color": STATE_COLORS["active"]},
    {"key": "ended", "label": "ended (finished or pruned; its forks may still share its blocks)", "color": "#bdbdbd"},
]
TREE_KINDS = {"prefix": "Prefix-cache tree", "forks": "Fork families"}
TREE_CAPTIONS = {
    "prefix": "Cached prompt prefixes, left to right deeper into a prompt (a chain without branches is one box), "
    "a box's height the prompts below it and its label the admissions served it from the cache over the run; "
    "coloured by the prefix's state at the step.",
    "forks": "The sequences forked from each request (parallel samples, beams) that hold KV memory at the step, "
    "with the ancestors they share blocks with; a box's height is the live sequences below it.",
}


def b64(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=np.uint8).tobytes()).decode("ascii")


def _state_rank(state: str) -> int:
    return STATE_ORDER.index(state) if state in STATE_ORDER else len(STATE_ORDER)


@dataclass(frozen=True)
class Boxes:
    """An icicle's boxes: level (column, 0 = roots), y0 / y1 (shares of the height), label, hover text."""

    level: list[int]
    y0: list[float]
    y1: list[float]
    label: list[str]
    hover: list[str]

    def payload(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "y0": [round(v, 5) for v in self.y0],
            "y1": [round(v, 5) for v in self.y1],
            "label": self.label,
            "hover": self.hover,
            "levels": max(self.level, default=-1) + 1,
        }


def icicle(parent: dict[int, int], order: list[int], weight: dict[int, int]) -> tuple[dict[int, tuple], int]:
    """Lay out a forest as an icicle: `parent` maps each box to its parent box (-1: a root), `order` lists boxes
    parents first, `weight` gives each leaf its height (inner boxes get the sum below them). Returns box ->
    (level, y0, y1) in shares of the whole height, and the number of levels."""
    children: dict[int, list[int]] = {}
    for b in order:
        children.setdefault(parent[b], []).append(b)
    size: dict[int, float] = {}
    for b in reversed(order):
        kids = children.get(b, [])
        size[b] = float(sum(size[k] for k in kids)) if kids else float(max(weight.get(b, 1), 1))
    total = sum(size[r] for r in children.get(-1, [])) or 1.0
    out: dict[int, tuple] = {}
    cursor: dict[int, float] = {}  # where each box starts: right after its previous sibling
    y = 0.0
    for r in children.get(-1, []):
        cursor[r] = y
        y += size[r]
    stack = [(r, 0) for r in reversed(children.get(-1, []))]
    levels = 0
    while stack:
        b, level = stack.pop()
        y0 = cursor[b]
        out[b] = (level, y0 / total, (y0 + size[b]) / total)
        levels = max(levels, level + 1)
        c = y0
        for k in children.get(b, []):
            cursor[k] = c
            c += size[k]
        stack.extend((k, level + 1) for k in reversed(children.get(b, [])))
    return out, levels


class ExplorerData:
    """The explorer's payloads for one trace (see the module docstring). A ValueError for a trace the explorer
    cannot show (an imported KV-event stream: no engine steps, no allocator books)."""

    def __init__(self, trace: Trace) -> None:
        if not records_engine(trace):
            raise ValueError(f"explore: {trace.name}: {ENGINE_ABSENT}")
        self.trace = trace
        timeline = memory.memory_timeline(trace)
        if timeline.empty:
            raise ValueError(f"explore: {trace.name}: no memory sample recorded, nothing to step through")
        self._timeline = timeline.sort_values("step").reset_index(drop=True)
        self.steps = self._timeline["step"].to_numpy(np.int64)
        self.first, self.last = int(self.steps[0]), int(self.steps[-1])
        self.start = start_step(trace)
        self.family = addressing(trace)
        self.unit = UNIT_WORDS.get(self.family, "unit")
        self.states = sorted(fragmentation.unit_states(trace), key=_state_rank)
        kinds = []
        if caches_prefixes(trace):
            kinds.append("prefix")
        if not sharing.fork_tree(trace).empty:
            kinds.append("forks")
        self.tree_kinds = kinds
        self._edges: np.ndarray | None = None
        self._prefix_note = ""  # set when the prefix tree is cut to MAX_BOXES
        self._prefix: tuple[Boxes, list[list[int]], pd.DataFrame] | None = None

    # ---- the cursor ------------------------------------------------------------------------------------------
    def snap(self, step: int) -> int:
        """The recorded step at or before `step` (the first one before the run's start)."""
        i = int(np.searchsorted(self.steps, int(step), side="right")) - 1
        return int(self.steps[max(i, 0)])

    def header(self) -> dict[str, Any]:
        return {
            "title": str(self.trace.label),
            "name": str(self.trace.name),
            "first": self.first,
            "last": self.last,
            "start": self.snap(self.start),
            "unit": self.unit,
            "states": [
                {"key": s, "label": STATE_LABELS.get(s, s), "color": STATE_COLORS.get(s, STATE_COLORS["other"])}
                for s in self.states
            ],
            "tree_kinds": [{"key": k, "label": TREE_KINDS[k]} for k in self.tree_kinds],
        }

    # ---- the block map ---------------------------------------------------------------------------------------
    def _matrices(self, step: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        window = (step, step)
        mix = fragmentation.state_matrix(self.trace, MAX_CELLS, 1, steps=window)
        fill = fragmentation.fill_matrix(self.trace, MAX_CELLS, 1, steps=window)
        return mix, fill

    def edges(self) -> np.ndarray:
        """Cell boundaries in unit ids (blocks, pages or arena rows): cell i covers [edges[i], edges[i + 1])."""
        if self._edges is None:
            mix, _ = self._matrices(self.first)
            starts = np.unique(mix["unit_bin"].to_numpy(np.int64))
            end = int(mix["unit_end"].max()) if len(mix) else 0
            self._edges = np.append(starts, end).astype(np.int64)
        return self._edges

    def blocks(self) -> dict[str, Any]:
        edges = self.edges()
        sizes = np.diff(edges)
        return {
            "cells": int(len(sizes)),
            "edges": edges.tolist(),
            "binned": bool(len(sizes) and sizes.max() > 1),
            "units": int(edges[-1] - edges[0]) if len(edges) else 0,
            "unit": self.unit,
        }

    def cells(self, step: int) -> dict[str, Any]:
        """Each cell's share of every state (bytes 0..255, state-major within a cell) and fill (0..254, NO_FILL)."""
        mix, fill = self._matrices(step)
        edges = self.edges()
        n, k = len(edges) - 1, len(self.states)
        shares = np.zeros((n, k), np.float64)
        cell = np.searchsorted(edges, mix["unit_bin"].to_numpy(np.int64), side="right") - 1
        col = pd.Index(self.states).get_indexer(mix["state"].astype(str))
        ok = (cell >= 0) & (cell < n) & (col >= 0)
        np.add.at(shares, (cell[ok], col[ok]), mix["fraction"].to_numpy(np.float64)[ok])
        fills = np.full(n, np.nan)
        fcell = np.searchsorted(edges, fill["unit_bin"].to_numpy(np.int64), side="right") - 1
        fok = (fcell >= 0) & (fcell < n)
        fills[fcell[fok]] = fill["fill"].to_numpy(np.float64)[fok]
        fill_bytes = np.where(np.isnan(fills), NO_FILL, np.clip(np.round(np.nan_to_num(fills) * 254), 0, 254))
        return {
            "mix": b64(np.clip(np.round(shares * 255), 0, 255).ravel()),
            "fill": b64(fill_bytes),
        }

    def cell_text(self, step: int, cell: int, limit: int = 6) -> str:
        """What cell `cell` holds at the end of `step`: one line per unit (at most `limit`), from block_states."""
        edges = self.edges()
        if not 0 <= cell < len(edges) - 1:
            return ""
        a, b = int(edges[cell]), int(edges[cell + 1])
        states = fragmentation.block_states(self.trace, self.snap(step))
        unit = states["unit"].to_numpy(np.int64)
        span = states["capacity_tokens"].to_numpy(np.int64) if self.family == "rows" else np.ones(len(unit), np.int64)
        rows = states[(unit < b) & (unit + np.maximum(span, 1) > a)]
        where = f"{self.unit}s {a:,}–{b - 1:,}" if b - a > 1 else f"{self.unit} {a:,}"
        lines = [f"{where} at step {self.snap(step):,}:"]
        for r in rows.head(limit).itertuples(index=False):
            holders = str(r.seqs)
            if len(holders) > 60:
                holders = holders[:59].rsplit(",", 1)[0] + ",…"
            held = f", held by seq {holders}" if holders else ""
            u = int(r.unit)
            what = f"rows {u:,}–{u + int(r.capacity_tokens) - 1:,}" if self.family == "rows" else f"{self.unit} {u:,}"
            lines.append(
                f"{what}: {r.state}, {int(r.fill):,} / {int(r.capacity_tokens):,} tokens, ref {int(r.ref_count)}{held}"
            )
        if len(rows) > limit:
            lines.append(f"… and {len(rows) - limit:,} more")
        return "\n".join(lines)

    # ---- the timeline ----------------------------------------------------------------------------------------
    def timeline(self) -> dict[str, Any]:
        tl = self._timeline
        bands = [b for b in MEMORY_BANDS if b in tl.columns and (b == "used" or tl[b].max() > 0)]
        binned, width = bin_steps(tl, MAX_POINTS, {"step": "first", "capacity": "max"} | dict.fromkeys(bands, "mean"))
        capacity = float(tl["capacity"].max()) or 1.0
        return {
            "x": binned["step"].astype(int).tolist(),
            "width": int(width),
            "bands": [
                {
                    "key": b,
                    "label": STATE_LABELS.get(b, b),
                    "color": STATE_COLORS[b],
                    "y": np.round(binned[b].to_numpy(np.float64) / capacity, 4).tolist(),
                }
                for b in bands
            ],
            "ticks": [{"y": q, "label": format_bytes(int(q * capacity))} for q in (0.0, 0.25, 0.5, 0.75, 1.0)],
            "note": f"per-bin means of {width} steps" if width > 1 else "",
        }

    def readout(self, step: int) -> str:
        r = memory.memory_at(self.trace, step)
        if r is None:
            return f"step {step:,}: no memory sample"
        parts = [
            f"reserved {format_bytes(int(r['reserved']))}",
            f"used {format_bytes(int(r['used']))}",
            f"waste {format_bytes(int(r['waste']))} ({format_value(r, 'waste_frac', 'pct')} of reserved)",
            f"cached-idle {format_bytes(int(r['cached_idle']))}",
            f"free {format_bytes(int(r['free']))}",
        ]
        if int(r.get("sharing_saved", 0) or 0) > 0:
            parts.append(f"saved by sharing {format_bytes(int(r['sharing_saved']))}")
        return f"step {step:,}: " + " · ".join(parts)

    # ---- the sharing tree ------------------------------------------------------------------------------------
    def tree(self, kind: str) -> dict[str, Any]:
        """The tree's fixed part: title, caption, legend and, for the prefix tree, its boxes (states come with
        each step). kind "" or unknown: no tree (the run shared nothing)."""
        if kind not in self.tree_kinds:
            return {"kind": "", "title": "Sharing", "note": VIEWS["sharing"].absent, "legend": []}
        out: dict[str, Any] = {"kind": kind, "title": TREE_KINDS[kind], "caption": TREE_CAPTIONS[kind]}
        if kind == "prefix":
            boxes, _, _ = self._prefix_boxes()
            out |= {"legend": PREFIX_LEGEND, "boxes": boxes.payload(), "note": self._prefix_note}
        else:
            out |= {"legend": FORK_LEGEND, "boxes": None, "note": ""}
        return out

    def tree_step(self, kind: str, step: int) -> dict[str, Any]:
        if kind == "prefix" and kind in self.tree_kinds:
            return {"kind": kind, "states": self._prefix_states(step)}
        if kind == "forks" and kind in self.tree_kinds:
            return {"kind": kind} | self._forks_at(step)
        return {"kind": ""}

    def _prefix_boxes(self) -> tuple[Boxes, list[list[int]], pd.DataFrame]:
        """The prefix tree as icicle boxes (a branchless chain is one box), the member nodes of each box and the
        tree frame (analysis.sharing.prefix_tree), built once."""
        if self._prefix is not None:
            return self._prefix
        df = sharing.prefix_tree(self.trace).drop_duplicates("node").set_index("node", drop=False)
        total = len(df)
        parent = df["parent"].astype("int64")
        if total > MAX_BOXES:  # the most hit nodes and their ancestors (as the report's icicle does)
            keep: set[int] = set()
            for node in df.sort_values("hits", ascending=False, kind="stable").index:
                if len(keep) >= MAX_BOXES:
                    break
                n = int(node)
                while n in df.index and n not in keep:
                    keep.add(n)
                    n = int(parent.get(n, -1))
            df = df[df.index.isin(keep)]
            self._prefix_note = f"the {len(df):,} most hit of {total:,} prefix blocks, with their ancestors"
        parent_of = {int(n): (int(p) if int(p) in df.index else -1) for n, p in parent.reindex(df.index).items()}
        kids: dict[int, list[int]] = {}
        for n, p in parent_of.items():
            kids.setdefault(p, []).append(n)
        head_of: dict[int, int] = {}
        for n in sorted(parent_of):  # a child's node id is above its parent's (analysis numbers them in order)
            p = parent_of[n]
            head_of[n] = head_of.get(p, p) if p >= 0 and len(kids.get(p, [])) == 1 else n
        heads = [n for n in sorted(parent_of) if head_of[n] == n]
        members: dict[int, list[int]] = {h: [] for h in heads}
        for n in sorted(parent_of):
            members[head_of[n]].append(n)
        box_parent = {h: (head_of[parent_of[h]] if parent_of[h] >= 0 else -1) for h in heads}
        layout, _ = icicle(box_parent, heads, {})
        level, y0, y1, label, hover = [], [], [], [], []
        for h in heads:
            chain = df.loc[members[h]]
            d0, d1 = int(chain["depth"].iloc[0]), int(chain["depth"].iloc[-1])
            hits = int(chain["hits"].iloc[0])
            span = f"block {d0}" if d0 == d1 else f"blocks {d0}–{d1}"
            lv, a, b = layout[h]
            level.append(lv)
            y0.append(a)
            y1.append(b)
            label.append(f"{span} · {hits:,} hits")
            hover.append(
                f"{span} of a prompt ({len(chain)} block(s), the prefix ends after {int(chain['tokens'].iloc[-1]):,} "
                f"tokens): {hits:,} admissions served from the cache, {int(chain['evictions'].sum()):,} evictions, "
                f"first cached at step {int(chain['first_step'].min()):,}"
            )
        self._prefix = (Boxes(level, y0, y1, label, hover), [members[h] for h in heads], df)
        return self._prefix

    def _prefix_states(self, step: int) -> list[int]:
        """Each prefix box's state at the step (an index into PREFIX_LEGEND): held if a block carrying one of its
        hashes is held by a sequence, else cached idle if one is cached, else evicted, or not yet if none of its
        hashes was computed by then."""
        _, members, df = self._prefix_boxes()
        states = fragmentation.block_states(self.trace, self.snap(step))
        held: set[int] = set()
        idle: set[int] = set()
        if "hash" in states.columns and "hashed" in states.columns:
            hashed = states[states["hashed"].astype(bool)]
            in_use = hashed["state"].astype(str).isin(["active", "shared"]).to_numpy()
            hashes = hashed["hash"].to_numpy(np.int64)
            held = set(hashes[in_use].tolist())
            idle = set(hashes[~in_use].tolist())
        hash_of = df["hash"].astype("int64").to_dict()
        first = df["first_step"].astype("int64").to_dict()
        out = []
        for nodes in members:
            hs = [hash_of[n] for n in nodes]
            if any(h in held for h in hs):
                out.append(1)
            elif any(h in idle for h in hs):
                out.append(2)
            elif min(first[n] for n in nodes) > step:
                out.append(0)
            else:
                out.append(3)
        return out

    def _forks_at(self, step: int) -> dict[str, Any]:
        """The fork families with a sequence holding KV memory at the step: those sequences and their ancestors
        (a chain of ended ancestors with one branch is one box), laid out as an icicle."""
        forks = sharing.fork_tree(self.trace)
        forks = forks[forks["step"] <= step]
        holders = fragmentation.block_states(self.trace, self.snap(step))["seqs"].astype(str)
        alive = {int(s) for text in holders[holders != ""].unique() for s in text.split(",") if s}
        parent_of = dict(zip(forks["child"].astype(int), forks["parent"].astype(int), strict=True))
        born = dict(zip(forks["child"].astype(int), forks["step"].astype(int), strict=True))
        root_of = dict(zip(forks["child"].astype(int), forks["root"].astype(int), strict=True))
        roots = sorted(set(root_of.values()))
        live_roots = [r for r in roots if r in alive or any(root_of[c] == r for c in alive if c in root_of)]
        keep: set[int] = set()
        for s in alive:
            n = s
            while (n in parent_of or n in roots) and n not in keep:
                keep.add(n)
                n = parent_of.get(n, -1)
        kids: dict[int, list[int]] = {}
        for n in sorted(keep):
            p = parent_of.get(n, -1)
            kids.setdefault(p if p in keep else -1, []).append(n)
        # A box: an ended sequence with one kept child merges into that child's box (ancestors first).
        head_of: dict[int, int] = {}
        order: list[int] = []
        stack = list(reversed(kids.get(-1, [])))
        shown_roots: list[int] = []
        while stack:
            n = stack.pop()
            p = parent_of.get(n, -1)
            merge = p in keep and p not in alive and len(kids.get(p, [])) == 1
            head_of[n] = head_of[p] if merge else n
            if not merge:
                order.append(n)
            if p not in keep:
                shown_roots.append(n)
            stack.extend(reversed(kids.get(n, [])))
        note = ""
        if len(order) > MAX_BOXES:  # whole families, in order, until the cap
            allowed: set[int] = set()
            count = 0
            for r in shown_roots:
                family = [n for n in order if self._root(n, parent_of, keep) == r]
                if count + len(family) > MAX_BOXES and count:
                    break
                allowed.update(family)
                count += len(family)
            note = f"{len({self._root(n, parent_of, keep) for n in allowed}):,} of {len(live_roots):,} families"
            order = [n for n in order if n in allowed]
        members: dict[int, list[int]] = {h: [] for h in order}
        for n in sorted(head_of, key=lambda x: (born.get(x, -1), x)):
            if head_of[n] in members:
                members[head_of[n]].append(n)
        box_parent = {h: (head_of[parent_of[h]] if parent_of.get(h, -1) in keep else -1) for h in order}
        leaves = {h: 1 for h in order}
        layout, _ = icicle(box_parent, order, leaves)
        level, y0, y1, label, hover, states = [], [], [], [], [], []
        for h in order:
            seqs = members[h]
            last = seqs[-1]
            lv, a, b = layout[h]
            level.append(lv)
            y0.append(a)
            y1.append(b)
            label.append(f"seq {last}" if len(seqs) == 1 else f"seqs {seqs[0]}…{last} ({len(seqs)})")
            origin = (
                f"forked from seq {parent_of[seqs[0]]} at step {born[seqs[0]]:,}"
                if seqs[0] in parent_of
                else "the request"
            )
            state = "holds KV memory" if last in alive else "ended"
            chain = " → ".join(map(str, seqs))
            hover.append(f"seq {chain}: {origin}; {state} at step {step:,}")
            states.append(0 if last in alive else 1)
        boxes = Boxes(level, y0, y1, label, hover)
        if not order:
            note = f"no forked sequence holds KV memory at step {step:,}"
        return {"boxes": boxes.payload(), "states": states, "note": note}

    @staticmethod
    def _root(n: int, parent_of: dict[int, int], keep: set[int]) -> int:
        while parent_of.get(n, -1) in keep:
            n = parent_of[n]
        return n

    # ---- one step ----------------------------------------------------------------------------------------------
    def step(self, step: int, tree_kind: str) -> dict[str, Any]:
        """Everything that changes with the cursor, for the recorded step at or before `step`."""
        s = self.snap(step)
        return {
            "step": s,
            "readout": self.readout(s),
            "cells": self.cells(s),
            "tree": self.tree_step(tree_kind, s),
        }


def default_tree(data: ExplorerData) -> str:
    return data.tree_kinds[0] if data.tree_kinds else ""


__all__ = ["MAX_BOXES", "MAX_CELLS", "MAX_POINTS", "ExplorerData", "default_tree", "icicle"]
