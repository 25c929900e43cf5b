"""The digest (kvscope.digest, format version 3): whole-run results written into a trace when its run closes.

What it must keep: every result read from a digest equals the one computed from the events (the report's HTML
included, byte for byte); a trace with a digest opens without reading its events, and reads them (verified) when
an analysis needs them; damage or a change to the file, or other analysis code, and the digest is ignored (the file
then loads, or fails, exactly as without one); older traces (format version 2) read as before.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from kvscope import digest, digest_write
from kvscope.analysis import block_tables, fragmentation
from kvscope.analysis.summary import event_counts, summarize
from kvscope.engine.api import RunConfig, record_run
from kvscope.events import FORMAT_VERSION
from kvscope.present.views import MAP_MAX_STEPS, MAP_MAX_UNITS
from kvscope.trace import TraceError, load_trace
from kvscope.workload import Request

SAMPLES = Path(__file__).resolve().parent.parent / "sample_runs"


def _requests(n: int = 24) -> list[Request]:
    return [Request(f"r{i}", 0.002 * i, 20 + (7 * i) % 40, 4 + (5 * i) % 20) for i in range(n)]


def _record(path: Path, allocator: str = "paged", **opts) -> Path:
    settings = {"model": "tiny", "kv_memory": 48 * 1024, "max_len": 96, "max_batch": 8, **opts}
    cfg = RunConfig(allocator=allocator, device="sim", **settings)
    record_run(_requests(), cfg, path=path)
    return path


@pytest.fixture(params=["paged", "vmm", "static"])
def digested(request, tmp_path) -> Path:
    opts = {"page_size": 4096} if request.param == "vmm" else {}
    path = _record(tmp_path / f"{request.param}.kvtrace", request.param, **opts)
    assert digest.read_digest(path) is None  # small traces get none from record_run (DIGEST_MIN_BYTES)
    assert digest_write.write_digest(path)
    return path


def _without_digest(path: Path, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv(digest.NO_DIGEST_ENV, "1")
        return load_trace(path)


def test_results_from_the_digest_equal_those_from_the_events(digested, monkeypatch):
    lazy, full = load_trace(digested), _without_digest(digested, monkeypatch)
    assert not lazy.events_loaded and full.events_loaded
    assert lazy.num_events == full.num_events and lazy.truncated is full.truncated is False
    assert summarize(lazy) == summarize(full)
    pd.testing.assert_frame_equal(event_counts(lazy), event_counts(full))
    for module, name in digest_write._FRAMES.values():
        fn = getattr(importlib.import_module(module), name)
        pd.testing.assert_frame_equal(fn(lazy), fn(full))
    for fn in (fragmentation.state_matrix, fragmentation.fill_matrix):
        pd.testing.assert_frame_equal(fn(lazy, MAP_MAX_UNITS, MAP_MAX_STEPS), fn(full, MAP_MAX_UNITS, MAP_MAX_STEPS))
    steps = sorted(lazy._cache[fragmentation.AT_STEP_STATES])
    assert steps
    for step in steps:
        pd.testing.assert_frame_equal(fragmentation.block_states(lazy, step), fragmentation.block_states(full, step))
        pd.testing.assert_frame_equal(block_tables.block_tables(lazy, step), block_tables.block_tables(full, step))
    assert not lazy.events_loaded  # all of it from the digest
    pd.testing.assert_frame_equal(lazy.events, full.events)  # and the events, read when asked, are the trace's


def test_the_report_reads_no_event_and_is_the_same(tmp_path, monkeypatch):
    from kvscope.report import build_report

    path = _record(tmp_path / "paged.kvtrace")
    digest_write.write_digest(path)
    lazy = load_trace(path)
    html = build_report([lazy])
    assert not lazy.events_loaded
    assert html == build_report([_without_digest(path, monkeypatch)])


def test_a_trace_opened_from_its_digest_pickles(digested):
    import pickle

    copy = pickle.loads(pickle.dumps(load_trace(digested)))
    assert not copy.events_loaded and summarize(copy)["events"] == copy.store.count(range(256)) > 0


def test_plain_arrow_readers_see_an_empty_last_batch(digested):
    with pa.OSFile(str(digested), "rb") as f:
        reader = pa.ipc.open_stream(f)
        assert int(reader.schema.metadata[b"kvscope.format_version"]) == FORMAT_VERSION == 3
        batches = list(reader.iter_batches_with_custom_metadata())
    last, custom = batches[-1]
    assert last.num_rows == 0 and digest.DIGEST_KEY in custom
    assert sum(b.num_rows for b, _ in batches) == load_trace(digested).num_events


def test_damage_before_the_digest_is_reported_as_without_one(digested):
    messages = digest._messages(digested, digested.stat().st_size)
    assert messages is not None
    start, length, _ = [m for m in messages if m[2] == 3][0]  # the first record batch (events)
    data = bytearray(digested.read_bytes())
    data[start + length - 64] ^= 0xFF  # inside its body
    digested.write_bytes(bytes(data))
    assert digest.read_digest(digested) is None
    with pytest.raises(TraceError):
        load_trace(digested)


def test_a_file_changed_after_opening_is_refused_when_its_events_are_read(digested, tmp_path):
    trace = load_trace(digested)
    other = _record(tmp_path / "other.kvtrace", max_batch=4)
    shutil.copyfile(other, digested)
    with pytest.raises(TraceError, match="changed on disk"):
        trace.store  # noqa: B018


def test_events_read_later_are_checked_against_the_digest(digested):
    """A byte changed after opening, with the file's size and mtime kept, is still caught: the deferred read checks
    the stream's CRC-32 (in place of the per-batch checksums it skips)."""
    import os

    trace = load_trace(digested)
    st = digested.stat()
    messages = digest._messages(digested, st.st_size)
    assert messages is not None
    start, length, _ = [m for m in messages if m[2] == 3][0]  # events, not the digest
    data = bytearray(digested.read_bytes())
    data[start + length - 64] ^= 0xFF
    digested.write_bytes(bytes(data))
    os.utime(digested, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(TraceError, match="changed on disk"):
        trace.store  # noqa: B018


def test_other_analysis_code_ignores_the_digest_and_a_new_one_replaces_it(digested, monkeypatch):
    size = digested.stat().st_size
    monkeypatch.setattr(digest, "fingerprint", lambda: "other-kvscope")
    assert digest.read_digest(digested) is None
    assert load_trace(digested).events_loaded  # read the ordinary way
    assert digest_write.write_digest(digested)  # in place of the old one, not after it
    assert digest.read_digest(digested) is not None
    assert abs(digested.stat().st_size - size) < 64
    assert not digest_write.write_digest(digested)  # current: left alone


def test_record_run_writes_one_into_big_traces(tmp_path, monkeypatch):
    monkeypatch.setattr(digest, "DIGEST_MIN_BYTES", 0)
    path = _record(tmp_path / "run.kvtrace")
    found = digest.read_digest(path)
    assert found is not None and found.events == load_trace(path).num_events


def test_a_cut_or_unclosed_trace_gets_no_digest(tmp_path):
    path = _record(tmp_path / "run.kvtrace")
    data = path.read_bytes()
    path.write_bytes(data[:-8])  # no end-of-stream marker
    assert not digest_write.write_digest(path)
    assert path.read_bytes() == data[:-8]


def test_a_trace_cut_inside_its_digest_is_cut_off_not_damaged(digested, monkeypatch):
    import warnings

    from kvscope.trace import TruncatedTraceWarning

    size = digested.stat().st_size
    with open(digested, "r+b") as f:
        f.truncate(size - 1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = load_trace(digested)
    assert any(issubclass(w.category, TruncatedTraceWarning) for w in caught)
    assert summarize(trace)["events"] == trace.num_events > 0


def test_older_format_traces_read_as_before(monkeypatch):
    """Format version 2 (the sample runs): no digest, every event read at load, the same results as ever."""
    path = SAMPLES / "paged.kvtrace"
    trace = load_trace(path)
    assert trace.meta["format_version"] == 2 and trace.events_loaded
    assert digest.read_digest(path) is None
    assert summarize(trace) == summarize(_without_digest(path, monkeypatch))


def test_no_digest_env_turns_it_off(digested, monkeypatch):
    monkeypatch.setenv(digest.NO_DIGEST_ENV, "1")
    assert digest.read_digest(digested) is None
    assert not digest_write.write_digest(digested)
