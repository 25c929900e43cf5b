"""The choice of replay: by the addressing a trace declares, with its sizes from the allocator's config; legacy traces
of the built-in allocators by their name; anything else refused with one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_analysis_tracegen import BPT, Script, make_requests, record

from kvscope.analysis import replay
from kvscope.analysis.fragmentation import block_states, state_matrix, unit_states
from kvscope.analysis.replay import BlockState, PageState, ReplayError, RowState, pool_geometry
from kvscope.events import Kind


def own_allocator_trace(config: dict, name: str = "custom"):
    """A user's own allocator ("chunky") with 64-token chunks: seq 0 (P=70) holds chunk 0 full and 6 tokens of
    chunk 1 after step 0."""
    s = Script("chunky", config, requests=[(70, 3)])
    s.at(0).emit(Kind.ARRIVE, seq=0, n=70, aux=3).emit(Kind.ADMIT, seq=0, n=70, aux=0)
    s.emit(Kind.BLOCK_ALLOC, seq=0, block=0, addr=0).emit(Kind.BLOCK_ALLOC, seq=0, block=1, addr=1)
    s.emit(Kind.APPEND, seq=0, n=70, aux=70)
    cap = 4 * 64 * BPT
    s.step_end(batch=1, prefill=70, capacity=cap, reserved=cap // 2, used=70 * BPT, logical=70 * BPT, free=cap // 2)
    return dataclasses.replace(s.trace(), path=Path(f"/runs/{name}.kvtrace"))


def test_an_unknown_allocator_that_declares_blocks_replays_with_its_own_block_size():
    trace = own_allocator_trace({"addressing": "blocks", "block_size": 64, "num_blocks": 4})
    states = block_states(trace, 0)
    assert len(states) == 4 and (states["capacity_tokens"] == 64).all()
    assert states["fill"].tolist() == [64, 6, 0, 0]
    assert states["state"].astype(str).tolist() == ["active", "active", "free", "free"]
    assert unit_states(trace) == ["free", "active", "shared", "cached_idle"]
    assert state_matrix(trace, max_units=4).groupby("unit_bin")["fraction"].sum().tolist() == [1.0] * 4
    assert pool_geometry(trace) == replay.PoolGeometry("blocks", 4, 64, 0, 4 * 64 * BPT)


def test_an_unknown_allocator_without_addressing_is_refused_with_one_line():
    trace = own_allocator_trace({"block_size": 64, "num_blocks": 4})
    with pytest.raises(ReplayError) as err:
        block_states(trace, 0)
    message = str(err.value)
    assert "\n" not in message
    assert "'custom'" in message and "'chunky'" in message and "declares no addressing" in message
    assert isinstance(err.value, ValueError)
    with pytest.raises(ReplayError):
        unit_states(trace)
    assert pool_geometry(trace).addressing is None  # labels still work: no sizes, no refusal


@pytest.mark.parametrize(
    "config, missing",
    [
        ({"addressing": "blocks", "num_blocks": 4}, "block_size"),
        ({"addressing": "blocks", "block_size": 0, "num_blocks": 4}, "block_size"),
        ({"addressing": "blocks", "block_size": 64}, "num_blocks"),
        ({"addressing": "pages", "pages": 4, "page_size": 4096}, "buffer_row_bytes"),
        ({"addressing": "rows"}, "rows"),
    ],
)
def test_a_declared_addressing_without_its_sizes_is_refused_naming_them(config, missing):
    trace = own_allocator_trace(config)
    with pytest.raises(ReplayError, match=f"lacks {missing}: cannot replay") as err:
        block_states(trace, 0)
    assert "\n" not in str(err.value) and "'custom'" in str(err.value) and "'chunky'" in str(err.value)


def test_an_addressing_kvscope_does_not_know_is_refused():
    trace = own_allocator_trace({"addressing": "tiles", "block_size": 64, "num_blocks": 4})
    with pytest.raises(ReplayError, match="addressing 'tiles', not one of blocks, pages, rows"):
        replay.replay_class(trace)


@pytest.mark.parametrize("kind", ["paged", "vmm", "static"])
def test_built_in_traces_declare_their_addressing_and_legacy_ones_replay_the_same(kind):
    trace = record(kind, make_requests(10, seed=4, n_max=2))
    cls = replay.replay_class(trace)
    assert trace.meta["allocator_config"]["addressing"] == cls.addressing
    legacy_meta = dict(trace.meta, allocator_config=dict(trace.meta["allocator_config"]))
    del legacy_meta["allocator_config"]["addressing"]
    legacy = dataclasses.replace(trace, meta=legacy_meta, _cache={})
    assert replay.replay_class(legacy) is cls
    for step in (0, 5, 10**6):
        assert block_states(legacy, step).equals(block_states(trace, step))


def test_a_legacy_trace_without_sizes_keeps_the_old_defaults():
    s = Script("paged", {}, requests=[(20, 2)])
    s.at(0).emit(Kind.ARRIVE, seq=0, n=20, aux=2).emit(Kind.ADMIT, seq=0, n=20, aux=0)
    s.emit(Kind.BLOCK_ALLOC, seq=0, block=0, addr=0).emit(Kind.BLOCK_ALLOC, seq=0, block=1, addr=1)
    s.emit(Kind.APPEND, seq=0, n=20, aux=20).step_end(batch=1, prefill=20)
    states = block_states(s.trace(), 0)
    assert states["capacity_tokens"].tolist() == [16, 16] and states["fill"].tolist() == [16, 4]


def test_states_are_named():
    assert [s.name for s in BlockState] == ["FREE", "ACTIVE", "SHARED", "CACHED_IDLE"]
    assert [s.name for s in PageState] == ["POOL", "MAPPED_USED", "MAPPED_IDLE"]
    assert [s.name for s in RowState] == ["FREE", "USED", "RESERVATION", "INTERNAL"]
    assert replay.BlockReplay.states == ("free", "active", "shared", "cached_idle")
    assert set(replay.REPLAYS) == set(replay.ADDRESSINGS) == {"blocks", "pages", "rows"}
