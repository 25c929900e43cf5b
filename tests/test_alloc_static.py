"""Static reservation (FasterTransformer / Orca): sizes per variant, first fit, accounting and events by hand."""

from __future__ import annotations

import numpy as np
import pytest

from kvscope.alloc.base import Copy, KVAllocator, KVOutOfMemory
from kvscope.alloc.static import StaticAllocator
from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.spec import get_spec

SPEC = get_spec("tiny")
BPT = SPEC.bytes_per_token  # 2 layers x K,V x 2 heads x 16 dims x 4 bytes = 512


def make(variant: str = "max", rows: int = 100, max_len: int = 32) -> StaticAllocator:
    return StaticAllocator(SPEC, rows * BPT + BPT // 2, Recorder(), max_len=max_len, variant=variant)


def events(alloc: StaticAllocator, *kinds: Kind) -> list[dict]:
    df = alloc.recorder.to_table().to_pandas()
    names = {k.name.lower() for k in kinds}
    return df[df["kind"].isin(names)].to_dict("records")


def toks(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def test_bytes_per_token_of_the_test_spec():
    assert BPT == 512


def test_is_a_kv_allocator():
    assert isinstance(make(), KVAllocator)


@pytest.mark.parametrize(
    ("variant", "final_len", "rows"),
    [
        ("max", 10, 32),
        ("max", 32, 32),
        ("pow2", 1, 1),
        ("pow2", 10, 16),
        ("pow2", 16, 16),
        ("pow2", 17, 32),
        ("oracle", 10, 10),
        ("oracle", 1, 1),
    ],
)
def test_reservation_size_per_variant(variant, final_len, rows):
    alloc = make(variant)
    alloc.admit(1, toks(1), final_len)
    assert alloc.reserved_rows(1) == rows
    (ev,) = events(alloc, Kind.STATIC_RESERVE)
    assert (ev["seq"], ev["addr"], ev["n"], ev["bytes"]) == (1, 0, rows, rows * BPT)


def test_pow2_is_capped_at_max_len():
    alloc = make("pow2", max_len=24)
    alloc.admit(1, toks(3), 20)
    assert alloc.reserved_rows(1) == 24


def test_usage_by_hand():
    alloc = make("max")  # 100 rows (the half token of capacity left over is not managed)
    alloc.admit(1, toks(5), final_len=10)
    alloc.append(1, toks(5))
    u = alloc.usage()
    u.check()
    assert u.capacity == 100 * BPT
    assert (u.reserved, u.used, u.logical) == (32 * BPT, 5 * BPT, 5 * BPT)
    assert u.reservation == 5 * BPT  # tokens 6..10 not generated yet
    assert u.internal == 22 * BPT  # rows 11..32: beyond the final length, never filled
    assert (u.mapped_idle, u.cached_idle, u.free) == (0, 0, 68 * BPT)


def test_tokens_past_the_final_length_clamp_reservation_to_zero():
    alloc = make("pow2")
    alloc.admit(1, toks(4), final_len=10)  # 16 rows
    alloc.append(1, toks(12))  # more than the final length, still within the reservation
    u = alloc.usage()
    u.check()
    assert (u.used, u.reservation, u.internal) == (12 * BPT, 0, 4 * BPT)


def test_append_events_and_overflow_is_atomic():
    alloc = make("oracle")
    alloc.admit(3, toks(4), final_len=6)
    alloc.append(3, toks(4))
    alloc.append(3, toks(2))
    assert [(e["seq"], e["n"], e["aux"]) for e in events(alloc, Kind.APPEND)] == [(3, 4, 4), (3, 2, 6)]
    assert not alloc.can_append(3, 1)
    before = alloc.usage()
    with pytest.raises(KVOutOfMemory):
        alloc.append(3, toks(1))
    assert alloc.num_tokens(3) == 6 and alloc.usage() == before
    (oom,) = events(alloc, Kind.OOM)
    assert (oom["seq"], oom["n"], oom["bytes"]) == (3, 1, BPT)


def test_first_fit_shows_external_fragmentation():
    alloc = make("oracle", max_len=100)
    for seq in (1, 2, 3):
        alloc.admit(seq, toks(1), final_len=30)
    assert [alloc.token_base(s) for s in (1, 2, 3)] == [0, 30, 60]
    alloc.free(1)
    alloc.free(3)  # free: rows [0, 30) and [60, 100)
    alloc.admit(4, toks(1), final_len=35)
    assert alloc.token_base(4) == 60  # [0, 30) is too small: first fit goes on
    alloc.check_invariants()
    u = alloc.usage()
    assert u.free == 35 * BPT  # 35 rows free in all ...
    assert alloc.largest_free_range() == 30  # ... but in pieces of 30 and 5
    assert not alloc.can_admit(1, 31)
    with pytest.raises(KVOutOfMemory, match="largest is 30"):
        alloc.admit(5, toks(1), final_len=31)
    assert alloc.usage() == u
    alloc.admit(5, toks(1), final_len=30)
    assert alloc.token_base(5) == 0
    alloc.free(2)
    alloc.free(4)
    alloc.free(5)
    alloc.check_invariants()
    assert alloc.largest_free_range() == 100  # released ranges coalesce back into one


def test_release_events():
    alloc = make("pow2")
    alloc.admit(1, toks(3), final_len=5)
    alloc.admit(2, toks(3), final_len=9)
    alloc.free(1)
    (ev,) = events(alloc, Kind.STATIC_RELEASE)
    assert (ev["seq"], ev["addr"], ev["n"], ev["bytes"]) == (1, 0, 8, 8 * BPT)
    assert alloc.token_base(2) == 8


def test_fork_reserves_the_same_size_and_queues_a_row_copy():
    alloc = make("pow2")
    alloc.admit(1, toks(5), final_len=12)
    alloc.append(1, toks(5))
    alloc.fork(1, 2)
    assert alloc.reserved_rows(2) == 16 and alloc.num_tokens(2) == 5
    assert alloc.pending_copies == [Copy("rows", 0, 16, 5)]
    assert events(alloc, Kind.FORK) == []  # the engine owns FORK; the allocator only reserves (STATIC_RESERVE)
    (reserve,) = [e for e in events(alloc, Kind.STATIC_RESERVE) if e["seq"] == 2]
    assert (reserve["addr"], reserve["n"]) == (16, 16)
    u = alloc.usage()
    u.check()
    assert (u.used, u.logical, u.reserved) == (10 * BPT, 10 * BPT, 32 * BPT)  # no sharing: logical == used


def test_fork_without_room_is_atomic():
    alloc = make("max", rows=40)
    alloc.admit(1, toks(2), final_len=4)
    before = alloc.usage()
    with pytest.raises(KVOutOfMemory):
        alloc.fork(1, 2)
    assert alloc.usage() == before and alloc.live_sequences() == [1] and alloc.pending_copies == []


def test_can_admit_agrees_with_admit():
    alloc = make("max", rows=70)
    assert alloc.can_admit(5, 10)
    alloc.admit(1, toks(5), 10)
    alloc.admit(2, toks(5), 10)
    assert not alloc.can_admit(5, 10)  # 6 rows left, max reserves 32
    assert not alloc.can_admit(5, 33)  # longer than max_len


def test_user_mistakes_are_one_line_value_errors():
    with pytest.raises(ValueError, match="variant 'lru'"):
        make("lru")
    with pytest.raises(ValueError, match="holds no token"):
        StaticAllocator(SPEC, BPT - 1, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        StaticAllocator(SPEC, 10 * BPT, max_len=0)
    alloc = make()
    with pytest.raises(ValueError, match="exceeds max_len=32"):
        alloc.admit(1, toks(5), 33)
    with pytest.raises(ValueError, match="shorter than its prompt"):
        alloc.admit(1, toks(5), 4)
    assert alloc.live_sequences() == []


def test_unknown_and_duplicate_sequences():
    alloc = make()
    alloc.admit(1, toks(1), 4)
    with pytest.raises(KeyError):
        alloc.admit(1, toks(1), 4)
    with pytest.raises(KeyError):
        alloc.append(9, toks(1))
    with pytest.raises(KeyError):
        alloc.fork(1, 1)
    with pytest.raises(KeyError):
        alloc.free(9)


def test_config():
    assert make("oracle").config() == {
        "addressing": "rows",
        "label": "static oracle",
        "variant": "oracle",
        "max_len": 32,
        "rows": 100,
    }
