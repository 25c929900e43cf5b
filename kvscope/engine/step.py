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
    output: np.ndarray = field(default_factory=lambda: NO_TOKENS)  # all O generated ids of this sample, once admitted
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
    work: list[Work] = field(default_factory=list)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    kv_tokens_read: int = 0  # context tokens attention reads, over the batch
    attn_pairs: int = 0  # causal (query, key) pairs, over the batch
    preempted: int = 0

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    def add(self, w: Work) -> None:
        n = len(w.tokens)
        if w.prefill:
            self.prefill_tokens += n
        else:
            self.decode_tokens += n
        end = w.start + n
        self.kv_tokens_read += end
        self.attn_pairs += n * w.start + n * (n + 1) // 2
        self.work.append(w)
