"""In-step peaks: an allocator's high-water marks equal the maxima of its own books (usage()) taken after every
operation, whatever the operations; waste and its split count only while tokens are held; take() restarts them
from the current state."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvscope.alloc.base import HighWater, KVOutOfMemory, Usage
from kvscope.alloc.paged import PagedAllocator
from kvscope.alloc.static import StaticAllocator
from kvscope.alloc.vmm import VMMAllocator
from kvscope.backends.sim import SimMemory
from kvscope.spec import get_spec

SPEC = get_spec("tiny")
BPT = SPEC.bytes_per_token
MAX_LEN = 64


def build(kind: str):
    if kind.startswith("static"):
        return StaticAllocator(SPEC, 256 * BPT, max_len=MAX_LEN, variant=kind.split("-")[1])
    if kind == "paged":
        return PagedAllocator(SPEC, 160 * BPT, block_size=4, enable_prefix_caching=True)
    deferred = kind != "vmm-eager-free"
    return VMMAllocator(
        SPEC,
        64 * 1024,
        backend=SimMemory(granularity=1024),
        max_batch=6,
        max_len=MAX_LEN,
        page_size=1024,
        deferred_reclaim=deferred,
        eager_pages=1 if kind == "vmm-eager-free" else 0,
    )


class Expected:
    """The model: maxima of usage() fields after every operation, with the liveness rule for waste."""

    def __init__(self, u: Usage) -> None:
        self.hw = HighWater()
        self.hw.note_usage(u)

    def see(self, u: Usage) -> None:
        # Written out field by field, not through HighWater.note, so that the model does not share its code.
        h = self.hw
        h.reserved, h.used = max(h.reserved, u.reserved), max(h.used, u.used)
        h.logical, h.cached_idle = max(h.logical, u.logical), max(h.cached_idle, u.cached_idle)
        if u.used > 0:
            h.waste = max(h.waste, u.reserved - u.used)
            h.internal, h.reservation = max(h.internal, u.internal), max(h.reservation, u.reservation)
            h.mapped_idle = max(h.mapped_idle, u.mapped_idle)


OPS = st.lists(
    st.tuples(st.sampled_from(["admit", "append", "append", "append", "fork", "free", "take"]), st.integers(0, 40)),
    max_size=60,
)
KINDS = ["static-max", "static-pow2", "static-oracle", "paged", "vmm", "vmm-eager-free"]


@pytest.mark.parametrize("kind", KINDS)
@given(ops=OPS)
def test_high_water_is_the_max_of_usage_after_every_operation(kind, ops):
    alloc = build(kind)
    expected = Expected(alloc.usage())
    alloc.high_water = HighWater()
    alloc.high_water.note_usage(alloc.usage())
    live: dict[int, int] = {}  # seq -> final length
    next_seq = 0
    for op, x in ops:
        seqs = sorted(live)
        try:
            if op == "admit":
                prompt = 1 + x % 30
                final = min(prompt + x, MAX_LEN)
                if alloc.can_admit(prompt, final):
                    # Repeated prompts, so the paged allocator's prefix cache shares and revives blocks.
                    alloc.admit(next_seq, np.arange(prompt) % 7, final)
                    expected.see(alloc.usage())  # the instant between admission and the prefill append
                    alloc.append(next_seq, np.arange(prompt) % 7)
                    live[next_seq] = final
                    next_seq += 1
            elif op == "append" and seqs:
                seq = seqs[x % len(seqs)]
                n = 1 + x % 5
                if alloc.num_tokens(seq) + n <= live[seq] and alloc.can_append(seq, n):
                    alloc.append(seq, np.full(n, x))
            elif op == "fork" and seqs:
                parent = seqs[x % len(seqs)]
                alloc.fork(parent, next_seq)
                live[next_seq] = live[parent]
                next_seq += 1
            elif op == "free" and seqs:
                seq = seqs[x % len(seqs)]
                alloc.free(seq)
                del live[seq]
            elif op == "take":
                now = alloc.usage()
                expected.see(now)
                got = alloc.high_water.take(now)
                assert got == expected.hw
                expected = Expected(now)
                assert alloc.high_water == expected.hw  # restarted from the current state
                continue
        except KVOutOfMemory:
            pass  # failed operations change nothing, so the maxima stay as they were
        expected.see(alloc.usage())
        assert alloc.high_water == expected.hw, (op, x, alloc.high_water, expected.hw)
    for seq in sorted(live):
        alloc.free(seq)
        expected.see(alloc.usage())
    assert alloc.high_water == expected.hw
    final = alloc.usage()
    assert final.used == 0


def test_waste_is_not_counted_once_nothing_is_held():
    alloc = build("vmm")
    alloc.admit(0, np.arange(5), 10)
    alloc.append(0, np.arange(5))
    peak_live = alloc.high_water.waste
    alloc.free(0)  # deferred reclamation keeps the page-group mapped: reserved stays, used drops to 0
    u = alloc.usage()
    assert u.used == 0 and u.reserved - u.used > peak_live
    assert alloc.high_water.waste == peak_live
    assert alloc.high_water.take(u).waste == peak_live
    assert alloc.high_water.waste == 0  # and the next step starts from a state with nothing live
