"""Recorder -> trace file -> load_trace: round trip, cut-off files, corrupt and foreign files, plain-pyarrow reading."""

from __future__ import annotations

import json
import pickle
import threading
import warnings

import pandas as pd
import pyarrow as pa
import pytest

from kvscope.events import COLUMNS, FORMAT_VERSION, KIND_NAMES, META_KEY, VERSION_KEY, Kind, arrow_schema
from kvscope.recorder import Recorder
from kvscope.trace import TraceError, TruncatedTraceWarning, load_trace, trace_from_recorder


def record(path, n_events: int, flush_events: int = 1000, close: bool = True) -> Recorder:
    rec = Recorder(path, {"allocator": "paged", "note": "<script>alert(1)</script>"}, flush_events=flush_events)
    for i in range(n_events):
        rec.step = i // 10
        rec.emit(Kind.APPEND, seq=i % 7, n=1, aux=i, dur_ns=i * 3)
    if close:
        rec.close()
    return rec


def test_round_trip_keeps_every_column_and_the_metadata(tmp_path):
    path = tmp_path / "run.kvtrace"
    record(path, 2500)
    trace = load_trace(path)
    ev = trace.events
    assert list(ev.columns) == COLUMNS
    assert len(ev) == 2501  # + RUN_END
    assert not trace.truncated
    body = ev.iloc[:-1]
    assert (body["kind"] == "append").all() and ev["kind"].iloc[-1] == "run_end"
    assert body["aux"].tolist() == list(range(2500))
    assert body["dur_ns"].tolist() == [3 * i for i in range(2500)]
    assert body["seq"].tolist() == [i % 7 for i in range(2500)]
    assert body["step"].tolist() == [i // 10 for i in range(2500)]
    assert ev["t_ns"].is_monotonic_increasing
    assert ev["t_ns"].dtype == "int64" and ev["step"].dtype == "int32"
    assert list(ev["kind"].cat.categories) == KIND_NAMES
    assert trace.meta["allocator"] == "paged" and trace.meta["format_version"] == FORMAT_VERSION
    assert trace.meta["note"] == "<script>alert(1)</script>"


def test_readable_without_kvscope(tmp_path):
    path = tmp_path / "run.kvtrace"
    record(path, 100)
    with pa.OSFile(str(path), "rb") as f:
        table = pa.ipc.open_stream(f).read_all()
    df = table.to_pandas()
    assert len(df) == 101 and set(COLUMNS) <= set(df.columns)
    assert df["kind"].astype(str).iloc[0] == "append"
    meta = json.loads(table.schema.metadata[META_KEY])
    assert meta["allocator"] == "paged"


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_cut_off_file_loads_complete_batches_and_warns(tmp_path, keep):
    full = tmp_path / "full.kvtrace"
    record(full, 5000, flush_events=500)
    data = full.read_bytes()
    cut = tmp_path / "cut.kvtrace"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.warns(TruncatedTraceWarning, match="cut off"):
        trace = load_trace(cut)
    assert trace.truncated
    n = len(trace.events)
    assert 0 < n < 5001
    assert n % 500 == 0  # whole batches only
    assert trace.events["aux"].tolist() == list(range(n))  # exactly the first n events, in order


def test_run_killed_before_close_is_readable_up_to_its_last_flush(tmp_path):
    path = tmp_path / "killed.kvtrace"
    rec = record(path, 1234, flush_events=100, close=False)
    rec.end_step()  # what the engine calls after a step; flush_seconds has not passed, nothing forced
    # The process dies here: no close(), no RUN_END. Batches flushed so far are on disk.
    with pytest.warns(TruncatedTraceWarning):
        trace = load_trace(path)
    assert len(trace.events) == 1200
    rec.abort()


def test_abort_flushes_everything_but_marks_the_trace_cut_off(tmp_path):
    path = tmp_path / "aborted.kvtrace"
    rec = record(path, 50, close=False)
    rec.abort()
    with pytest.warns(TruncatedTraceWarning):
        trace = load_trace(path)
    assert len(trace.events) == 50


def write_stream(path, schema, batches=()):
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for b in batches:
            writer.write_batch(b)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no such file"),
        ("empty", "empty file"),
        ("directory", "is a directory"),
        ("random", "not a kvscope trace"),
        ("pickle", "not a kvscope trace"),
        ("foreign_arrow", "not a kvscope trace"),
        ("newer", "newer than this kvscope reads"),
        ("bad_json", "metadata is not valid JSON"),
        ("missing_column", "missing column 'bytes'"),
        ("wrong_type", "column 'seq' has type"),
    ],
)
def test_bad_files_get_one_line_naming_file_and_problem(tmp_path, case, expected):
    path = tmp_path / f"{case}.kvtrace"
    good = {META_KEY: b"{}", VERSION_KEY: str(FORMAT_VERSION).encode()}
    if case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    elif case == "random":
        path.write_bytes(bytes(range(256)) * 10)
    elif case == "pickle":
        path.write_bytes(pickle.dumps({"events": [1, 2, 3]}))
    elif case == "foreign_arrow":
        write_stream(path, pa.schema([("x", pa.int64())]))
    elif case == "newer":
        write_stream(path, arrow_schema({META_KEY: b"{}", VERSION_KEY: str(FORMAT_VERSION + 1).encode()}))
    elif case == "bad_json":
        write_stream(path, arrow_schema({META_KEY: b"{not json", VERSION_KEY: b"1"}))
    elif case == "missing_column":
        fields = [f for f in arrow_schema() if f.name != "bytes"]
        write_stream(path, pa.schema(fields, metadata=good))
    elif case == "wrong_type":
        fields = [pa.field("seq", pa.string()) if f.name == "seq" else f for f in arrow_schema()]
        write_stream(path, pa.schema(fields, metadata=good))
    with pytest.raises(TraceError) as err:
        load_trace(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and expected in message


def test_emit_from_two_threads_keeps_rows_aligned():
    rec = Recorder(None, flush_events=777)
    n = 20_000

    def worker(kind: Kind, seq: int) -> None:
        for i in range(n):
            # every column of a row carries the same value, so a torn row would show as a mismatch
            rec.emit(kind, seq=seq, block=i, n=i, bytes=i, addr=i, aux=i, dur_ns=i)

    threads = [
        threading.Thread(target=worker, args=(Kind.PAGE_MAP, 1)),
        threading.Thread(target=worker, args=(Kind.APPEND, 2)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ev = trace_from_recorder(rec).events
    assert len(ev) == 2 * n
    for col in ("n", "bytes", "addr", "aux", "dur_ns"):
        assert (ev[col] == ev["block"]).all()
    assert ((ev["seq"] == 1) == (ev["kind"] == "page_map")).all()
    for seq in (1, 2):
        assert ev.loc[ev["seq"] == seq, "block"].tolist() == list(range(n))


def test_emit_at_keeps_the_given_time():
    rec = Recorder(None)
    rec.emit_at(12345, Kind.MEM_NVML, bytes=7)
    ev = trace_from_recorder(rec).events
    assert ev["t_ns"].tolist() == [12345] and ev["bytes"].tolist() == [7] and ev["seq"].tolist() == [-1]


def test_load_trace_returns_a_plain_dataframe_no_warning_for_complete_runs(tmp_path):
    path = tmp_path / "ok.kvtrace"
    record(path, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace = load_trace(path)
    assert isinstance(trace.events, pd.DataFrame)
