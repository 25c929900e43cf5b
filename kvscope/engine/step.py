"""What a step is made of: the sequences the scheduler tracks, each one's share of a step (Work), and the step's
plan (StepPlan) that the scheduler hands the executor (kvscope.engine.scheduler makes them; the executors, the
map-ahead thread and the cost model read them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvscope.workload import Request

# Sequence status (PRUNED: a beam that beam search dropped)
WAITING, RUNNING, SWAPPED, FINISHED, REJECTED = "waiting", "running", "swapped", "finished", "rejected"
PRUNED = "pruned"
# The token ids of a sequence that has none: a request rejected on arrival, a sample's outputs before admission or
# after it finished (read-only, shared).
NO_TOKENS = np.zeros(0, dtype=np.int32)
NO_TOKENS.flags.writeable = False


@dataclass(slots=True, eq=False)
class Sequence:
    """One sample (or beam) of one request, as the scheduler tracks it."""

    id: int
    request: Request
    sample: int  # the sample's index; with beam search the beam's number (beams forked later go on from the width)
    prompt: np.ndarray  # tokens to hold before generating: the prompt, plus generated ones after a recompute
    # (NO_TOKENS for a request rejected on arrival)
    final_len: int  # P + O - 1: tokens held when it finishes
    held: int = 0  # tokens whose K/V the allocator holds
    generated: int = 0
    status: str = WAITING
    pending_forks: bool = False  # n > 1 and the children are not forked yet
    # All O generated ids of this sample: drawn on first use (read them through output_ids), dropped once it ends
    output: np.ndarray = field(default_factory=lambda: NO_TOKENS)
    parent: int = -1  # the sequence this one was forked from

    @property
    def in_prefill(self) -> bool:
        return self.held < len(self.prompt)

    def output_ids(self) -> np.ndarray:
        if self.output is NO_TOKENS:
            r = self.request
            if r.beam > 1 and self.sample > 0:
                self.output = r.beam_tokens(self.sample, 0, r.output_len)
            else:
                self.output = r.output_tokens(self.sample, 0, r.output_len)
        return self.output


@dataclass(slots=True)
class Work:
    """One sequence's share of a step: K/V for `tokens` are appended at positions start.. start+len(tokens)-1."""

    seq: Sequence
    start: int
    tokens: np.ndarray
    prefill: bool
    samples: bool  # the step yields a new token for this sequence (a decode, or the last chunk of a prefill)
    hit: int = 0  # prefix-cache hit tokens served at admission (positions 0..hit-1 already hold K/V)
    fresh: bool = False  # the sequence was (re)admitted in this step: it holds nothing but its prefix-cache hits


@dataclass
class StepPlan:
    """A step's batch, in batch order (that of `running`, then resumed, then admitted sequences).

    The decode steady state is kept compact: `decodes` are the running sequences that each append their last
    generated token (one token, sampling) with no Work or token array of their own; every other share of the step
    (prefill chunks, resumed sequences) is a Work in `others`, and `others_at[j]` says how many of `decodes` come
    before others[j] in batch order.

    `work` is the whole batch as one Work each, in batch order: built on first use (by the executors that need token
    ids and positions: cpu, cuda) and kept. A decode's position is its sequence's `held` - 1 and its token
    output[held - 1 - prompt_len], its last generated one: read when `work` is built, which must be before the next
    `schedule()` (that changes `held`, and drops the token ids of sequences that finished)."""

    decodes: list[Sequence] = field(default_factory=list)
    others: list[Work] = field(default_factory=list)
    others_at: list[int] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    kv_tokens_read: int = 0  # context tokens attention reads, over the batch
    attn_pairs: int = 0  # causal (query, key) pairs, over the batch
    preempted: int = 0
    _work: list[Work] | None = field(default=None, repr=False, compare=False)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @property
    def batch_size(self) -> int:
        """Sequences in the batch (len(work), without building it)."""
        return len(self.decodes) + len(self.others)

    def add(self, w: Work) -> None:
        n = len(w.tokens)
        if w.prefill:
            self.prefill_tokens += n
        else:
            self.decode_tokens += n
        end = w.start + n
        self.kv_tokens_read += end
        self.attn_pairs += n * w.start + n * (n + 1) // 2
        self.others.append(w)
        self.others_at.append(len(self.decodes))
        self._work = None

    def sampled(self) -> list[Sequence]:
        """The sequences that yield a new token in this step (every decode, the last chunk of a prefill), in batch
        order."""
        if not self.others:
            return self.decodes
        out: list[Sequence] = []
        decodes = self.decodes
        pos = 0
        for w, at in zip(self.others, self.others_at, strict=True):
            if at > pos:
                out += decodes[pos:at]
                pos = at
            if w.samples:
                out.append(w.seq)
        out += decodes[pos:]
        return out

    @property
    def work(self) -> list[Work]:
        """Every sequence's share of the step, in batch order (built once, on first use)."""
        if self._work is None:
            self._work = self._build_work()
        return self._work

    def _build_work(self) -> list[Work]:
        out: list[Work] = []
        decodes = self.decodes

        def decode_work(lo: int, hi: int) -> None:
            for s in decodes[lo:hi]:
                start = s.held - 1
                g = start - s.request.prompt_len  # its last generated token (held = prompt_len + generated - 1)
                out.append(Work(s, start, s.output_ids()[g : g + 1], False, True))

        pos = 0
        for w, at in zip(self.others, self.others_at, strict=True):
            if at > pos:
                decode_work(pos, at)
                pos = at
            out.append(w)
        decode_work(pos, len(decodes))
        return out
