"""One scheduler over many ranks: the group's allocator, recorder and executor, each fanning out to the ranks'.

A real TP engine has one scheduler (vLLM's runs in the driver process) and every rank runs the same batch; it sizes
every rank's KV cache to the smallest rank's free blocks, so an admission fits everywhere or nowhere. Here the
unchanged kvscope Engine and Scheduler drive `GroupAllocator`, which serves them the KVAllocator protocol over one
real allocator per rank (built by the registry, each with its own recorder and its own trace):

- an admission or an append is allowed only when every rank can take its part (the tightest rank decides);
- a failed append is tried on each rank that refused it, so each records its own OOM, and changes nothing;
- TP: every rank gets every token (its allocator holds the bytes of its own heads); DCP: the tokens of a chunk
  starting at position p are split so that position i lands on DCP rank i mod dcp;
- a fork that fails on one rank is undone on the ranks it reached (their traces show the child freed).

`GroupRecorder` is what the engine and the scheduler emit to: lifecycle and step events go to every rank's trace;
under DCP with each sequence's token counts as that rank holds them (its share), so that a rank's trace agrees with
its allocator's events and its memory replays hold (the step's computed tokens stay the group's).
The engine's ACCT_* / ACCT_PEAK_* samples of the group's summed books are dropped; at each step's end every rank
records its own allocator's books and in-step peaks instead, so each rank's trace is a complete single-allocator
trace that every analysis reads as it reads any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from kvscope.alloc.base import Copy, KVAllocator, KVOutOfMemory, Swappable, Usage, emit_peaks, emit_usage, step_peaks
from kvscope.engine.base import ExecResult, Executor
from kvscope.engine.step import StepPlan
from kvscope.events import ACCT_FIELDS, PEAK_FIELDS, Kind
from kvscope.parallel.layout import RankLayout, first_offset, share, share_of_range
from kvscope.recorder import Recorder

_GROUP_BOOKS = frozenset(int(k) for k in (*ACCT_FIELDS, *PEAK_FIELDS))
# Lifecycle events whose `n` counts tokens a sequence holds (or would hold): under DCP each rank's trace gets its share.
_HELD_N = frozenset(int(k) for k in (Kind.ADMIT, Kind.FORK, Kind.PREEMPT, Kind.FINISH, Kind.REJECT, Kind.PRUNE))


def local_request(prompt_len: int, output_len: int, d: int, dcp: int) -> tuple[int, int]:
    """(prompt, output) of a request as DCP rank d sees it: its share of the prompt, and the output that takes its
    share from there to its share of the final length (P + O - 1)."""
    p = share(prompt_len, d, dcp)
    return p, share(prompt_len + output_len - 1, d, dcp) - p + 1


class GroupRecorder:
    """The recorder the engine and scheduler see: every event to every rank's recorder, except the group's
    accounting samples, which each rank replaces with its own allocator's at `end_step`."""

    def __init__(self, recorders: Sequence[Recorder], allocators: Sequence[KVAllocator], dcp_ranks: Sequence[int] = (),
                 dcp: int = 1) -> None:  # fmt: skip
        self.ranks = list(recorders)
        self.allocators = list(allocators)
        self.dcp = dcp
        self._d = list(dcp_ranks) or [0] * len(self.ranks)
        self._step = -1
        self.peak_reserved = [0] * len(self.ranks)  # per rank, over every instant of the run
        self.peak_used = [0] * len(self.ranks)

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        for rec in self.ranks:
            rec.step = value
        self._step = value

    @property
    def events_written(self) -> int:
        return sum(rec.events_written for rec in self.ranks)

    @property
    def meta(self) -> dict[str, Any]:
        return self.ranks[0].meta

    def emit(self, kind: int, **columns: int) -> None:
        if kind in _GROUP_BOOKS:
            return
        if self.dcp > 1 and (kind in _HELD_N or kind == Kind.ARRIVE):
            self._emit_shares(kind, columns)
            return
        for rec in self.ranks:
            rec.emit(kind, **columns)

    def _emit_shares(self, kind: int, columns: dict[str, int]) -> None:
        """DCP: a lifecycle event's token counts as each rank holds them (ARRIVE: its view of the request)."""
        dcp = self.dcp
        for rec, d in zip(self.ranks, self._d, strict=True):
            cols = dict(columns)
            if kind == Kind.ARRIVE:
                cols["n"], cols["aux"] = local_request(cols.get("n", 0), cols.get("aux", 0), d, dcp)
            else:
                cols["n"] = share(cols.get("n", 0), d, dcp)
            rec.emit(kind, **cols)

    def end_step(self) -> None:
        for r, (rec, alloc) in enumerate(zip(self.ranks, self.allocators, strict=True)):
            usage = alloc.usage()
            emit_usage(rec, usage)
            peaks = step_peaks(alloc, usage)
            emit_peaks(rec, peaks)
            self.peak_reserved[r] = max(self.peak_reserved[r], peaks.reserved)
            self.peak_used[r] = max(self.peak_used[r], peaks.used)
            rec.end_step()

    def close(self, steps: int | None = None) -> None:
        for rec in self.ranks:
            rec.close(steps=steps)

    def abort(self) -> None:
        for rec in self.ranks:
            rec.abort()


class GroupAllocator:
    """The KVAllocator protocol over one allocator per rank (module docstring). Sequence ids are the scheduler's,
    the same on every rank; `_held` counts each sequence's tokens over the whole group (its length)."""

    def __init__(self, ranks: Sequence[KVAllocator], layout: RankLayout, recorder: Any) -> None:
        if len(ranks) != layout.world_size:
            raise ValueError(f"{len(ranks)} allocators for {layout.world_size} ranks")
        self.ranks = list(ranks)
        self.layout = layout
        self.name = self.ranks[0].name
        self.spec = self.ranks[0].spec
        self.recorder = recorder
        self.pending_copies: list[Copy] = []  # never filled: each rank queues its own copies for its executor
        self.dcp = layout.dcp
        self._d = [layout.dcp_rank(r) for r in range(len(self.ranks))]
        self._held: dict[int, int] = {}

    # ---- the split ----------------------------------------------------------------------------------------------
    def _part(self, d: int, start: int, tokens: np.ndarray) -> np.ndarray:
        """DCP rank d's tokens of a chunk that starts at position `start`."""
        if self.dcp == 1:
            return tokens
        return tokens[first_offset(start, d, self.dcp) :: self.dcp]

    def _count(self, d: int, start: int, n: int) -> int:
        return n if self.dcp == 1 else share_of_range(start, n, d, self.dcp)

    # ---- protocol -----------------------------------------------------------------------------------------------
    def config(self) -> dict:
        cfg = dict(self.ranks[0].config())
        return cfg | {"world_size": len(self.ranks), "tp": self.layout.tp, "dcp": self.dcp}

    def can_admit(self, prompt_len: int, final_len: int) -> bool:
        dcp = self.dcp
        return all(
            a.can_admit(share(prompt_len, d, dcp), share(final_len, d, dcp))
            for a, d in zip(self.ranks, self._d, strict=True)
        )

    def admit(self, seq: int, prompt_tokens: np.ndarray, final_len: int) -> int:
        hits: list[int] = []
        try:
            for a, d in zip(self.ranks, self._d, strict=True):
                hits.append(a.admit(seq, self._part(d, 0, prompt_tokens), share(final_len, d, self.dcp)))
        except BaseException:
            for a in self.ranks[: len(hits)]:
                a.free(seq)
            raise
        if self.dcp == 1:
            hit = hits[0]
            if any(h != hit for h in hits):  # same tokens, same books: the ranks cannot disagree
                raise AssertionError(f"seq {seq}: the ranks' prefix hits differ: {hits}")
        else:
            # Prefix caching is refused with DCP (kvscope.parallel.run): a hit would have to cover the same
            # positions on every rank.
            hit = 0
            if any(hits):
                raise AssertionError(f"seq {seq}: a prefix hit under DCP: {hits}")
        self._held[seq] = hit
        return hit

    def can_append(self, seq: int, n: int = 1) -> bool:
        start = self._held.get(seq, 0)
        for a, d in zip(self.ranks, self._d, strict=True):
            k = self._count(d, start, n)
            if k and not a.can_append(seq, k):
                return False
        return True

    def append(self, seq: int, tokens: np.ndarray) -> None:
        start = self._held.get(seq, 0)
        n = len(tokens)
        parts = []
        refused = []
        for a, d in zip(self.ranks, self._d, strict=True):
            k = self._count(d, start, n)
            if k == 0:
                continue
            part = self._part(d, start, tokens)
            if a.can_append(seq, k):
                parts.append((a, part))
            else:
                refused.append((a, part))
        if refused:
            for a, part in refused:  # each refusing rank records its own OOM; an append that fails changes nothing
                try:
                    a.append(seq, part)
                except KVOutOfMemory:
                    continue
                raise AssertionError(f"seq {seq}: {a.name} refused {len(part)} tokens in can_append, took them")
            raise KVOutOfMemory(f"seq {seq}: {n} tokens do not fit on {len(refused)} of {len(self.ranks)} ranks")
        for a, part in parts:
            a.append(seq, part)
        self._held[seq] = start + n

    def fork(self, parent: int, child: int) -> None:
        done = 0
        try:
            for a in self.ranks:
                a.fork(parent, child)
                done += 1
        except BaseException:
            for a in self.ranks[:done]:
                a.free(child)
            raise
        self._held[child] = self._held.get(parent, 0)

    def free(self, seq: int) -> None:
        for a in self.ranks:
            a.free(seq)
        self._held.pop(seq, None)

    def num_tokens(self, seq: int) -> int:
        return self._held.get(seq, 0)

    def usage(self) -> Usage:
        """The ranks' books summed (what the engine's own statistics see; each rank's trace gets its own)."""
        books = [a.usage() for a in self.ranks]
        return Usage(**{f.name: sum(getattr(u, f.name) for u in books) for f in fields(Usage)})

    def check_invariants(self) -> None:
        for r, a in enumerate(self.ranks):
            a.check_invariants()
            a.usage().check()
            d = self._d[r]
            for seq, held in self._held.items():
                want = held if self.dcp == 1 else share(held, d, self.dcp)
                got = a.num_tokens(seq)
                assert got == want, f"rank {r}: seq {seq} holds {got} tokens, its share of {held} is {want}"


class SwappableGroupAllocator(GroupAllocator):
    """A group whose ranks can swap (Swappable): a sequence swaps out and in on every rank at once."""

    @property
    def num_cpu_blocks(self) -> int:
        return min(a.num_cpu_blocks for a in self._swappers())

    def _swappers(self) -> list[Swappable]:
        return [a for a in self.ranks if isinstance(a, Swappable)]

    def can_swap_out(self, seq: int) -> bool:
        return all(a.can_swap_out(seq) for a in self._swappers())

    def swap_out(self, seq: int) -> None:
        if not self.can_swap_out(seq):
            raise KVOutOfMemory(f"seq {seq}: no room in some rank's CPU swap pool")
        for a in self._swappers():
            a.swap_out(seq)

    def can_swap_in(self, seq: int) -> bool:
        return all(a.can_swap_in(seq) for a in self._swappers())

    def swap_in(self, seq: int) -> None:
        if not self.can_swap_in(seq):
            raise KVOutOfMemory(f"seq {seq}: no room on some rank to swap in")
        for a in self._swappers():
            a.swap_in(seq)

    def is_swapped(self, seq: int) -> bool:
        return self._swappers()[0].is_swapped(seq)


def make_group(ranks: Sequence[KVAllocator], layout: RankLayout, recorder: Any) -> GroupAllocator:
    """The group allocator, with the swap capability when every rank has it (asked by capability, not by name)."""
    if all(isinstance(a, Swappable) for a in ranks):
        return SwappableGroupAllocator(ranks, layout, recorder)
    return GroupAllocator(ranks, layout, recorder)


class GroupExecutor:
    """Every rank's executor runs the step (on sim: each drops its own allocator's queued copies)."""

    def __init__(self, executors: Sequence[Executor]) -> None:
        self.ranks = list(executors)
        self.device = self.ranks[0].device
        self.measured = self.ranks[0].measured

    def execute(self, plan: StepPlan) -> ExecResult:
        results = [ex.execute(plan) for ex in self.ranks]
        return ExecResult(kernel_ns=max(r.kernel_ns for r in results), kv_bytes_read=results[0].kv_bytes_read)

    def after_step(self, forked: list[tuple[int, int]], released: list[int]) -> None:
        for ex in self.ranks:
            ex.after_step(forked, released)

    def device_name(self) -> str:
        return self.ranks[0].device_name()

    def close(self) -> None:
        for ex in self.ranks:
            ex.close()


__all__ = ["GroupAllocator", "GroupExecutor", "GroupRecorder", "SwappableGroupAllocator", "make_group"]
