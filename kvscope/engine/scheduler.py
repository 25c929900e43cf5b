"""Iteration-level continuous batching (vLLM-like): which sequences run in each step, and their memory.

Every step, in this order:
  1. running sequences, in admission order: a decoding one appends its last generated token (1 token of the step's
     token budget); a chunked prefill in progress takes what is left of the budget after all decodes. When an append
     does not fit (the allocator records OOM), the most recently admitted running sequence is preempted (recompute:
     freed and requeued at the front with prompt + generated tokens as its new prompt; swap, Swappable allocators
     (paged): its KV goes to the CPU pool and it waits in the swapped queue) until the append fits or the sequence
     preempted itself.
     A sequence that cannot grow even when it runs alone can never finish: it is rejected (REJECT).
  2. if nothing was preempted in this step: swapped sequences come back first (FIFO), then new requests are admitted
     first-come first-served while the allocator has room (`can_admit`), the batch is below `max_batch` and the
     prompt fits the token budget. Admission stops at the first request that does not fit (no overtaking). Without
     chunked prefill a prompt longer than the whole budget is still admitted when it is the step's first prefill.
     The budget check counts the whole prompt: prefix-cache hits are only known after admission.

Memory semantics (a contract: the analyses' numbers depend on it): a request with prompt P and output O holds P
tokens after its prefill step (which also generates output token 1) and one more after every decode step; it
finishes after O generated tokens holding P + O - 1, and its memory is released at the end of that step (FINISH,
then `allocator.free`).
With n > 1 samples, the first sample's sequence forks n - 1 children at the end of its prefill step (FORK); every
sample then generates O tokens. Fork children get sequence ids after all requests' (len(requests) + counter).

Beam search (a request's `beam` K > 1), vLLM v0's way: the prompt's first K candidates become K beams, forked at the
end of the prefill step as parallel samples are. After every later step in which beams of the request sampled, the
next beam set is chosen among their candidates: each of the k beams that sampled is the parent of some of the k
survivors. A beam with no survivor is pruned (PRUNE, then `allocator.free`: its blocks go back); one with c > 1
survivors continues as one of them and forks c - 1 new beams (FORK with the parent in aux and the tokens it holds in
n, so the events draw the beam tree); the new beams share everything the parent holds and diverge at the token just
sampled, so their first append is a copy-on-write of the shared partial block (page). The width stays K. Prunes come
before forks (vLLM v0 forks first), so that a step never needs more than K sequences' slots for a request: a VMM slot
is a batch row. Which beam gets how many survivors is drawn, deterministically per request, as K draws with
replacement among the k beams (each beam equally likely: no model scores exist to rank candidates); see the README
for what that means against the paper's numbers. Every beam generates O tokens; there is no early stop.

The scheduler emits the lifecycle events (ARRIVE when the clock reaches a request's arrival, ADMIT, FORK, PREEMPT,
FINISH, REJECT); the allocator emits its own.
"""

# This module is longer than 400 lines: admission, preemption, parallel-sampling forks and beam selection all move
# sequences between the same queues in one step, and the order they do it in is the step semantics it documents.

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from functools import partial

import numpy as np

from kvscope.alloc.base import KVAllocator, KVOutOfMemory, Swappable, append_each
from kvscope.engine.step import (
    FINISHED,
    NO_TOKENS,
    PRUNED,
    REJECTED,
    RUNNING,
    SWAPPED,
    WAITING,
    Sequence,
    StepPlan,
    Work,
)
from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.workload import Request, stream_tokens


class _LastTokens:
    """The tokens a run of decodes appends, as `append_decode` takes them: item k is the last generated token of
    seqs[at + k] (a one-token array), sliced only when the allocator asks for it (prefix caching, a slow append)."""

    __slots__ = ("_at", "_n", "_seqs")

    def __init__(self, seqs: list[Sequence], at: int, n: int) -> None:
        self._seqs, self._at, self._n = seqs, at, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < self._n:
            raise IndexError(k)
        s = self._seqs[self._at + k]
        g = s.generated
        return s.output_ids()[g - 1 : g]


# Sequence, Work and StepPlan are kvscope.engine.step's; they are named here too, where the scheduler's users look.
__all__ = ["Scheduler", "SchedulerConfig", "Sequence", "StepPlan", "Work"]


@dataclass(frozen=True)
class SchedulerConfig:
    max_len: int = 2048
    max_batch: int = 256
    max_tokens_per_step: int = 8192
    chunked_prefill: bool = False
    preemption: str = "recompute"  # or "swap" (Swappable allocators)

    def __post_init__(self) -> None:
        for name in ("max_len", "max_batch", "max_tokens_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')}: must be a positive integer, got {getattr(self, name)}")
        if self.preemption not in ("recompute", "swap"):
            raise ValueError(f"preemption: must be recompute or swap, got {self.preemption!r}")


class Scheduler:
    def __init__(
        self, requests: SequenceABC[Request], allocator: KVAllocator, recorder: Recorder, config: SchedulerConfig
    ) -> None:
        self.swapper: Swappable | None = None  # the allocator, when preempting by swap
        if config.preemption == "swap":
            if not isinstance(allocator, Swappable):
                raise ValueError(f"preemption swap: the {allocator.name} allocator cannot swap (use --allocator paged)")
            self.swapper = allocator
        self.requests = list(requests)
        self.alloc = allocator
        self.rec = recorder
        self.cfg = config
        self.sequences: dict[int, Sequence] = {}
        # Requests in arrival order (ties: workload order) with their arrival in ns.
        order = sorted(range(len(self.requests)), key=lambda i: self.requests[i].arrival)
        self._pending = deque((int(round(self.requests[i].arrival * 1e9)), i) for i in order)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self._next_child = len(self.requests)
        # Counters for progress and run stats.
        self.finished_requests = 0  # requests whose every sample finished
        self.rejected = 0  # requests rejected (each counted once)
        self.finished_seqs = 0
        self.preemptions = 0
        self.generated_tokens = 0
        self._samples_left = [r.width for r in self.requests]  # beam search: the K final beams
        self._beam_next = [r.width for r in self.requests]  # the number the request's next forked beam gets
        self._beam_draws = [0] * len(self.requests)  # position in the request's beam-selection stream
        self._rejected_req = [False] * len(self.requests)
        self._req_of: dict[int, int] = {}  # seq id -> request index
        self.released: list[int] = []  # sequences whose memory was freed since the engine last looked
        self._wide = any(r.width > 1 for r in self.requests)  # some request forks (n > 1 or beam search)
        self._spent: list[Sequence] = []  # finished or pruned in the last step: their token ids are dropped next step

    # ---- state -----------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return not (self._pending or self.waiting or self.running or self.swapped)

    @property
    def busy(self) -> bool:
        """Anything arrived and not done?"""
        return bool(self.waiting or self.running or self.swapped)

    def next_arrival_ns(self) -> int | None:
        return self._pending[0][0] if self._pending else None

    @property
    def requests_done(self) -> int:
        return self.finished_requests + self.rejected

    # ---- arrivals --------------------------------------------------------------------------------------------
    def arrive(self, clock_ns: int) -> None:
        """Requests whose arrival time the clock reached: ARRIVE, then wait for admission (or REJECT at once)."""
        pending = self._pending
        while pending and pending[0][0] <= clock_ns:
            _, i = pending.popleft()
            r = self.requests[i]
            self.rec.emit(Kind.ARRIVE, seq=i, n=r.prompt_len, aux=r.output_len)
            final_len = r.prompt_len + r.output_len - 1
            too_long = final_len > self.cfg.max_len  # checked first: a rejected request's ids are never built
            prompt = NO_TOKENS if too_long else r.prompt_tokens()
            s = Sequence(i, r, 0, prompt, final_len, pending_forks=r.width > 1)
            self.sequences[i] = s
            self._req_of[i] = i
            if too_long:
                self._reject(s)
            else:
                self.waiting.append(s)

    # ---- one step --------------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        spent = self._spent
        if spent:  # sequences that finished or were pruned in the last step: their plan's token ids are not needed
            for s in spent:
                s.output = NO_TOKENS
            spent.clear()
        plan = StepPlan()
        alloc = self.alloc
        can_append, append = alloc.can_append, alloc.append
        # BatchAppends, asked with getattr: an isinstance check of a Protocol costs microseconds a step
        append_decode = getattr(alloc, "append_decode", None) or partial(append_each, alloc)
        budget = self.cfg.max_tokens_per_step
        running = self.running
        decodes = plan.decodes
        # The hot loop: every running sequence, every step. Each run of consecutive decodes in `running` appends its
        # tokens in one allocator call (in order, so the events are those of one append each) and joins the plan's
        # compact `decodes` (no Work, no token array each: the allocator reads a token id only when it needs one);
        # a decode that does not fit makes room (OOM event, then PREEMPT from the back of `running`) and the rest of
        # the run is taken again from there. Decode counters are summed locally and added at the end.
        # Which sequences decode (held all of their prompt: their id) and which prefill (-1), read once: within the
        # loop only sequences already taken change, and preemption takes from the back of `running`, so the others
        # keep their place.
        decoding = [r.id if r.held >= len(r.prompt) else -1 for r in running]
        prefill_budget = budget - (len(running) - decoding.count(-1))  # decodes take one token of the budget each
        decode_kv = 0
        i = 0
        while i < len(running):
            s = running[i]
            if decoding[i] >= 0:  # a run of decodes from i: each appends its last generated token
                try:
                    end = decoding.index(-1, i, len(running))
                except ValueError:
                    end = len(running)
                k = end - i
                run = running[i:end]
                done = append_decode(decoding[i:end], _LastTokens(running, i, k))
                if done:
                    if done < k:
                        del run[done:]
                    for r in run:
                        held = r.held + 1
                        r.held = held
                        decode_kv += held
                    decodes += run
                    i += done
                if done == k:
                    continue
                s = running[i]  # did not fit (appends are atomic: nothing changed)
                if not self._make_room(s, 1, plan):
                    continue  # s itself was preempted or rejected (it was the last in `running`)
                g = s.generated
                append(s.id, s.output_ids()[g - 1 : g])
                held = s.held + 1
                decodes.append(s)
                s.held = held
                decode_kv += held
                i += 1
                continue
            held = s.held
            plen = len(s.prompt)
            n = min(plen - held, prefill_budget)  # a chunked prefill in progress
            if n <= 0:
                i += 1
                continue
            if not can_append(s.id, n) and not self._make_room(s, n, plan):
                continue
            tokens = s.prompt[held : held + n]
            append(s.id, tokens)
            plan.add(Work(s, held, tokens, True, samples=held + n == plen))
            s.held = held + n
            prefill_budget -= n
            i += 1
        plan.decode_tokens += len(decodes)
        plan.kv_tokens_read += decode_kv
        plan.attn_pairs += decode_kv  # a decode token's query sees every held token

        if plan.preempted == 0:
            budget_left = budget - plan.tokens
            budget_left = self._resume_swapped(plan, budget_left)
            self._admit_waiting(plan, budget_left)
        return plan

    def _make_room(self, s: Sequence, n: int, plan: StepPlan) -> bool:
        """Preempt from the back of `running` until `s` can append n tokens. False if `s` itself had to go."""
        alloc = self.alloc
        running = self.running
        while not alloc.can_append(s.id, n):
            victim = running.pop()
            if victim is s and not running:
                self._reject(s, admitted=True)  # alone and still no room: it can never reach its final length
                return False
            self._preempt(victim)
            plan.preempted += 1
            if victim is s:
                return False
        return True

    def _resume_swapped(self, plan: StepPlan, budget_left: int) -> int:
        alloc, swapper = self.alloc, self.swapper
        if swapper is None:  # nothing is ever swapped out
            return budget_left
        while self.swapped and len(self.running) < self.cfg.max_batch:
            s = self.swapped[0]
            if not swapper.can_swap_in(s.id):
                if not self.running:  # even an empty GPU cannot take it back
                    self.swapped.popleft()
                    self._reject(s, admitted=True)
                    continue
                break
            self.swapped.popleft()
            swapper.swap_in(s.id)
            s.status = RUNNING
            self.running.append(s)
            # Its step: one decode token, or the next prefill chunk, when the budget and memory allow.
            if s.in_prefill:
                n = min(len(s.prompt) - s.held, budget_left)
                tokens = s.prompt[s.held : s.held + n] if n > 0 else None
            else:
                n = 1
                tokens = s.output_ids()[s.generated - 1 : s.generated] if budget_left > 0 else None
            if tokens is not None and alloc.can_append(s.id, n):
                alloc.append(s.id, tokens)
                prefill = s.in_prefill
                plan.add(Work(s, s.held, tokens, prefill, samples=(not prefill) or s.held + n == len(s.prompt)))
                s.held += n
                budget_left -= n
        return budget_left

    def _admit_waiting(self, plan: StepPlan, budget_left: int) -> None:
        alloc = self.alloc
        cfg = self.cfg
        waiting = self.waiting
        first_prefill = plan.prefill_tokens == 0
        # Samples and beams that running requests will fork at the end of their prefill take batch places too (a
        # VMM slot each): count them, or a step admits max_batch requests that then fork past it.
        forks_due = sum(r.request.width - 1 for r in self.running if r.pending_forks) if self._wide else 0
        while waiting:
            s = waiting[0]
            need = len(s.prompt) - s.held
            width = s.request.width if s.pending_forks else 1
            batch_after = len(self.running) + forks_due + width
            if self.running and batch_after > cfg.max_batch:
                break
            if cfg.chunked_prefill:
                if budget_left <= 0:
                    break
            elif need > budget_left and not (first_prefill and need > cfg.max_tokens_per_step):
                break
            if not alloc.can_admit(len(s.prompt), s.final_len):
                if not self.running and not self.swapped:  # nothing else holds memory: it can never fit
                    waiting.popleft()
                    self._reject(s)
                    continue
                break
            waiting.popleft()
            hit = alloc.admit(s.id, s.prompt, s.final_len)
            self.rec.emit(Kind.ADMIT, seq=s.id, n=len(s.prompt), aux=hit)
            s.held = hit
            n = len(s.prompt) - hit
            if cfg.chunked_prefill:
                n = min(n, budget_left)
            tokens = s.prompt[hit : hit + n]
            if not alloc.can_append(s.id, n):  # only if can_admit was optimistic: undo and wait
                alloc.free(s.id)
                s.held = 0
                waiting.appendleft(s)
                break
            s.status = RUNNING  # its output ids are drawn when first read (output_ids): a sim run never does
            self.running.append(s)
            forks_due += width - 1
            alloc.append(s.id, tokens)
            plan.add(Work(s, hit, tokens, True, samples=hit + n == len(s.prompt), hit=hit, fresh=True))
            s.held = hit + n
            budget_left -= n
            first_prefill = False

    # ---- after the forward pass --------------------------------------------------------------------------------
    def complete(self, plan: StepPlan) -> list[tuple[int, int]]:
        """Count the tokens the step generated, fork new samples, finish sequences that are done (FINISH + free).
        Returns (parent, child) for the sequences forked in this step (data copies, if any, are queued in the
        allocator's pending_copies)."""
        forked: list[Sequence] = []
        beams: dict[int, list[Sequence]] = {}  # request -> its beams that sampled in this step and go on
        any_finished = False
        sampled = plan.sampled()
        generated = len(sampled)
        if not self._wide:  # no request forks (n = 1, no beam search): only counting and finishing
            for s in sampled:
                if s.status != RUNNING:
                    generated -= 1
                    continue
                g = s.generated + 1
                s.generated = g
                if g >= s.request.output_len:
                    self._finish(s)
                    any_finished = True
        else:
            for s in sampled:
                if s.status != RUNNING:
                    generated -= 1
                    continue
                g = s.generated + 1
                s.generated = g
                r = s.request
                if s.pending_forks:
                    s.pending_forks = False
                    forked += self._fork_children(s)
                elif r.beam > 1 and g < r.output_len:
                    beams.setdefault(self._req_of[s.id], []).append(s)
                if g >= r.output_len:
                    self._finish(s)
                    any_finished = True
        self.generated_tokens += generated
        for req, group in beams.items():
            forked += self._select_beams(req, group)
            any_finished = True  # pruned beams leave `running` below
        for c in forked:
            if c.status == RUNNING and c.generated >= c.request.output_len:
                self._finish(c)
                any_finished = True
        if any_finished:
            self.running = [s for s in self.running if s.status == RUNNING]
        return [(c.parent, c.id) for c in forked]

    def _fork_children(self, parent: Sequence) -> list[Sequence]:
        r = parent.request
        children: list[Sequence] = []
        unplaced: list[Sequence] = []
        for sample in range(1, r.width):
            cid = self._next_child
            self._next_child += 1
            c = Sequence(
                cid, r, sample, parent.prompt, parent.final_len, held=parent.held, generated=1, parent=parent.id
            )
            c.output_ids()
            self.generated_tokens += 1  # its first token came out of the parent's prefill step
            self.sequences[cid] = c
            self._req_of[cid] = self._req_of[parent.id]
            try:
                self.alloc.fork(parent.id, cid)
            except KVOutOfMemory:
                # No room for the child's own copy (static and vmm take a new slot): FORK with 0 tokens; it waits at
                # the head of the queue and is prefilled later with its first token, like a recomputed sequence.
                self.rec.emit(Kind.FORK, seq=cid, n=0, aux=parent.id)
                c.held = 0
                if c.generated >= r.output_len:  # O == 1: the sample is complete without memory of its own
                    self.rec.emit(Kind.FINISH, seq=cid, n=0)
                    c.status = FINISHED
                    self._count_finished(c)
                    continue
                c.prompt = np.concatenate([r.prompt_tokens(), c.output[:1]])
                c.status = WAITING
                unplaced.append(c)
                continue
            self.rec.emit(Kind.FORK, seq=cid, n=parent.held, aux=parent.id)
            c.status = RUNNING
            self.running.append(c)
            children.append(c)
        self.waiting.extendleft(reversed(unplaced))
        return children

    # ---- beam search ----------------------------------------------------------------------------------------------
    def _select_beams(self, req: int, group: list[Sequence]) -> list[Sequence]:
        """The next beam set of request `req` among the candidates of its beams in `group` (they sampled in this
        step): prune the beams no survivor comes from, then fork the extra survivors. Returns the forked beams
        that got memory (waiting ones are queued at the head of `waiting`)."""
        k = len(group)
        if k < 2:
            return []  # a lone beam (the others are preempted or waiting) is its own only candidate
        group = sorted(group, key=lambda s: s.id)
        r = group[0].request
        # Stream positions count draws, so a request draws the same parents whatever else the run does.
        draws = stream_tokens(f"beam:{r.id}", self._beam_draws[req], k).astype(np.int64) % k
        self._beam_draws[req] += k
        survivors = np.bincount(draws, minlength=k).tolist()
        for s, c in zip(group, survivors, strict=True):
            if c == 0:
                self._prune(s)
        forked: list[Sequence] = []
        unplaced: list[Sequence] = []
        for s, c in zip(group, survivors, strict=True):
            for _ in range(c - 1):
                child = self._fork_beam(req, s)
                (forked if child.status == RUNNING else unplaced).append(child)
        self.waiting.extendleft(reversed(unplaced))
        return forked

    def _fork_beam(self, req: int, parent: Sequence) -> Sequence:
        """A new beam from `parent`: the parent's tokens so far, then a candidate of its own at the token just
        sampled (output position g - 1), and its own stream after it."""
        r = parent.request
        g = parent.generated
        number = self._beam_next[req]
        self._beam_next[req] += 1
        own = r.beam_tokens(number, g - 1, r.output_len - (g - 1))
        cid = self._next_child
        self._next_child += 1
        c = Sequence(cid, r, number, parent.prompt, parent.final_len, held=parent.held, generated=g, parent=parent.id)
        c.output = np.concatenate([parent.output_ids()[: g - 1], own])
        self.generated_tokens += 1  # its token of this step came out of its parent's forward pass
        self.sequences[cid] = c
        self._req_of[cid] = req
        try:
            self.alloc.fork(parent.id, cid)
        except KVOutOfMemory:
            # As a parallel sample without room at its fork: it waits, then is prefilled with what it generated.
            self.rec.emit(Kind.FORK, seq=cid, n=0, aux=parent.id)
            c.held = 0
            c.prompt = np.concatenate([r.prompt_tokens(), c.output[:g]])
            c.status = WAITING
            return c
        self.rec.emit(Kind.FORK, seq=cid, n=parent.held, aux=parent.id)
        c.status = RUNNING
        self.running.append(c)
        return c

    def _prune(self, s: Sequence) -> None:
        self.rec.emit(Kind.PRUNE, seq=s.id, n=s.held)
        self.alloc.free(s.id)
        self.released.append(s.id)
        s.status = PRUNED
        self._spent.append(s)  # its token ids go at the next schedule(): this step's plan may still read them

    # ---- lifecycle helpers ------------------------------------------------------------------------------------
    def _preempt(self, s: Sequence) -> None:
        self.preemptions += 1
        swapper = self.swapper
        if swapper is not None and swapper.can_swap_out(s.id):
            self.rec.emit(Kind.PREEMPT, seq=s.id, n=s.held, aux=1)
            swapper.swap_out(s.id)
            s.status = SWAPPED
            self.swapped.append(s)
            return
        self.rec.emit(Kind.PREEMPT, seq=s.id, n=s.held, aux=0)
        self.alloc.free(s.id)
        self.released.append(s.id)
        s.held = 0
        if s.generated:
            s.prompt = np.concatenate([s.request.prompt_tokens(), s.output_ids()[: s.generated]])
        s.status = WAITING
        self.waiting.appendleft(s)

    def _finish(self, s: Sequence) -> None:
        self.rec.emit(Kind.FINISH, seq=s.id, n=s.held)
        self.alloc.free(s.id)
        self.released.append(s.id)
        s.status = FINISHED
        self._spent.append(s)  # its token ids go at the next schedule(): this step's plan may still read them
        self._count_finished(s)

    def _count_finished(self, s: Sequence) -> None:
        self.finished_seqs += 1
        req = self._req_of[s.id]
        self._samples_left[req] -= 1
        if self._samples_left[req] == 0 and not self._rejected_req[req]:
            self.finished_requests += 1

    def _reject(self, s: Sequence, *, admitted: bool = False) -> None:
        """The request can never run to completion here (too long for max_len, or for the whole pool)."""
        self.rec.emit(Kind.REJECT, seq=s.id, n=s.final_len)
        if admitted:
            self.alloc.free(s.id)
            self.released.append(s.id)
        s.status = REJECTED
        s.output = NO_TOKENS
        req = self._req_of[s.id]
        if not self._rejected_req[req]:
            self._rejected_req[req] = True
            self.rejected += 1
