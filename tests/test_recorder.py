"""Recorder: events staged in memory before `open(path, meta)` reach the file first, under the completed metadata;
`update_meta` completes the metadata of an in-memory recorder."""

from __future__ import annotations

import pytest

from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.trace import load_trace, trace_from_recorder


def test_open_writes_staged_batches_first_under_the_completed_meta(tmp_path):
    rec = Recorder(None, {"allocator": "vmm"}, flush_events=2)
    for i in range(3):  # one full batch staged in memory, one event still buffered
        rec.emit(Kind.PAGE_CREATE, block=i, bytes=4096)
    rec.open(tmp_path / "run" / "t.kvtrace", {"allocator_config": {"page_size": 4096}})
    rec.emit(Kind.APPEND, seq=0, n=5, aux=5)
    rec.close(steps=1)
    trace = load_trace(tmp_path / "run" / "t.kvtrace")
    assert trace.meta["allocator"] == "vmm" and trace.meta["allocator_config"] == {"page_size": 4096}
    assert list(trace.events["kind"]) == ["page_create"] * 3 + ["append", "run_end"]
    assert list(trace.events["block"][:3]) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="already"):
        rec.update_meta({"model": "x"})


def test_open_twice_is_refused(tmp_path):
    rec = Recorder(tmp_path / "a.kvtrace")
    with pytest.raises(RuntimeError, match="already writes to"):
        rec.open(tmp_path / "b.kvtrace")
    rec.close()


def test_update_meta_of_an_in_memory_recorder_reaches_earlier_batches():
    rec = Recorder(None, {"allocator": "paged"}, flush_events=1)
    rec.emit(Kind.BLOCK_ALLOC, block=3, seq=0, addr=0, bytes=64)
    rec.update_meta({"model": "tiny"})
    rec.emit(Kind.APPEND, seq=0, n=1, aux=1)
    trace = trace_from_recorder(rec)
    assert trace.meta["allocator"] == "paged" and trace.meta["model"] == "tiny"
    assert list(trace.events["kind"]) == ["block_alloc", "append"]


def test_emit_usage_writes_one_sample_per_field_in_acct_fields_order():
    from kvscope.alloc.base import Usage, emit_usage
    from kvscope.events import ACCT_FIELDS

    usage = Usage(capacity=100, reserved=60, used=30, logical=45, internal=10, reservation=15, mapped_idle=5,
                  cached_idle=20, free=20)  # fmt: skip
    rec = Recorder(None)
    emit_usage(rec, usage)
    events = rec.to_table().to_pandas()
    assert list(events["kind"]) == [k.name.lower() for k in ACCT_FIELDS]
    assert list(events["bytes"]) == [getattr(usage, f) for f in ACCT_FIELDS.values()]
