"""Recorder -> trace file -> load_trace: round trip, cut-off files, corrupt and foreign files, plain-pyarrow reading."""

from __future__ import annotations

import json
import pickle
import threading
import warnings
import zlib

import pandas as pd
import pyarrow as pa
import pytest

from kvscope.events import (
    COLUMNS,
    FORMAT_VERSION,
    KIND_NAMES,
    META_CRC_KEY,
    META_KEY,
    VERSION_KEY,
    Kind,
    arrow_schema,
)
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
    good = {META_KEY: b"{}", VERSION_KEY: str(FORMAT_VERSION).encode(), META_CRC_KEY: str(zlib.crc32(b"{}")).encode()}
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


# ---- integrity (format version 2) ------------------------------------------------------------------------------
def test_every_batch_carries_a_checksum_plain_pyarrow_can_recompute(tmp_path):
    """The checksum's definition, re-implemented from its docstring: readers without kvscope can verify it."""
    path = tmp_path / "run.kvtrace"
    record(path, 250, flush_events=100)
    with pa.OSFile(str(path), "rb") as f:
        reader = pa.ipc.open_stream(f)
        md = reader.schema.metadata
        assert int(md[META_CRC_KEY]) == zlib.crc32(md[META_KEY])
        assert int(md[VERSION_KEY]) == FORMAT_VERSION == 3
        seen = 0
        for batch, custom in reader.iter_batches_with_custom_metadata():
            crc = 0
            for column in batch.columns:
                if pa.types.is_dictionary(column.type):
                    crc = zlib.crc32(column.indices.to_numpy().tobytes(), crc)
                    crc = zlib.crc32(b"".join(s.encode() + b"\0" for s in column.dictionary.to_pylist()), crc)
                else:
                    crc = zlib.crc32(column.to_numpy().tobytes(), crc)
            assert int(custom[b"kvscope.crc32"]) == crc
            seen += batch.num_rows
    assert seen == 251


def value_flipped(tmp_path, batch_index: int = 2):
    """An uncompressed trace of 5 batches with one value byte of batch `batch_index` flipped: the batch still
    decodes and validates, only its checksum tells."""
    path = tmp_path / "run.kvtrace"
    rec = Recorder(path, {"allocator": "paged"}, flush_events=100, compression=None)
    for i in range(450):
        rec.emit(Kind.APPEND, seq=1, n=1, aux=1000 + i)
    rec.close()
    data = bytearray(path.read_bytes())
    needle = (1000 + 100 * batch_index + 7).to_bytes(8, "little")  # aux of one event in that batch
    at = data.index(needle)
    data[at] ^= 0x01
    bad = tmp_path / "damaged.kvtrace"
    bad.write_bytes(bytes(data))
    return bad


def test_a_damaged_batch_is_an_error_naming_file_and_batch(tmp_path):
    bad = value_flipped(tmp_path)
    with pytest.raises(TraceError) as err:
        load_trace(bad)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{bad}: ")
    assert "batch 2 is damaged (checksum mismatch)" in message and "salvage" in message


def test_salvage_loads_the_verified_batches_before_the_damage(tmp_path):
    from kvscope.trace import DamagedTraceWarning

    bad = value_flipped(tmp_path)
    with pytest.warns(DamagedTraceWarning, match="batch 2 is damaged"):
        trace = load_trace(bad, salvage=True)
    assert trace.truncated
    assert trace.events["aux"].tolist() == list(range(1000, 1200))


def test_summary_cli_exits_2_on_damage_and_salvages_with_the_flag(tmp_path, capsys):
    from kvscope import cli

    bad = value_flipped(tmp_path)
    assert cli.main(["summary", "--json", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "batch 2" in captured.err
    assert cli.main(["summary", "--json", "--salvage", str(bad)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["events"] == 200
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "batch 2 is damaged" in lines[0]
    assert cli.build_parser().parse_args(["report", str(bad), "--salvage"]).salvage


def test_a_flip_in_the_metadata_is_caught_by_its_checksum(tmp_path):
    path = tmp_path / "run.kvtrace"
    record(path, 10)
    data = bytearray(path.read_bytes())
    at = data.index(b'"allocator": "paged"') + len('"allocator": "p')
    data[at] ^= 0x04  # "paged" -> "peged": still valid JSON
    path.write_bytes(bytes(data))
    with pytest.raises(TraceError, match="metadata is damaged"):
        load_trace(path)


def test_data_after_the_end_of_stream_marker_is_damage(tmp_path):
    path = tmp_path / "run.kvtrace"
    record(path, 10)
    path.write_bytes(path.read_bytes() + b"\0" * 64)
    with pytest.raises(TraceError, match="batch 1 is damaged .*before the file does"):
        load_trace(path)


def meta_bytes(meta: dict) -> dict[bytes, bytes]:
    text = json.dumps(meta).encode()
    return {META_KEY: text, VERSION_KEY: str(FORMAT_VERSION).encode(), META_CRC_KEY: str(zlib.crc32(text)).encode()}


def kind_batch(schema: pa.Schema, codes: list[int], names=KIND_NAMES) -> pa.RecordBatch:
    import numpy as np

    n = len(codes)
    arrays = []
    for name in COLUMNS:
        if name == "kind":
            indices = pa.array(np.array(codes, dtype=np.int16))
            arrays.append(pa.DictionaryArray.from_arrays(indices, pa.array(names), safe=False))
        else:
            arrays.append(pa.array(np.zeros(n), schema.field(name).type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def test_out_of_range_kind_indexes_are_damage_even_with_a_good_checksum(tmp_path):
    from kvscope.events import batch_crc32

    schema = arrow_schema(meta_bytes({}))
    batch = kind_batch(schema, [7, 200])
    path = tmp_path / "bad_kind.kvtrace"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(batch, custom_metadata={b"kvscope.crc32": str(batch_crc32(batch)).encode()})
    with pytest.raises(TraceError, match="batch 0 is damaged .*out of bounds"):
        load_trace(path)


def test_version_1_traces_still_load_validated_but_without_checksums(tmp_path):
    schema = arrow_schema({META_KEY: b'{"allocator": "paged"}', VERSION_KEY: b"1"})
    good = tmp_path / "v1.kvtrace"
    write_stream(good, schema, [kind_batch(schema, [7, 7, 80])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace = load_trace(good)
    assert trace.events["kind"].tolist() == ["append", "append", "run_end"] and trace.meta["allocator"] == "paged"
    bad = tmp_path / "v1_bad.kvtrace"
    write_stream(bad, schema, [kind_batch(schema, [7, 7, 80]), kind_batch(schema, [7, 500])])
    with pytest.raises(TraceError, match="batch 1 is damaged .*out of bounds"):
        load_trace(bad)


@pytest.mark.parametrize(
    "meta, expected",
    [
        ({"spec": {"bytes_per_token": "131072"}}, "spec.bytes_per_token should be an integer >= 0, got str"),
        ({"spec": {"bytes_per_token": -1}}, "spec.bytes_per_token should be an integer >= 0"),
        ({"spec": {"bytes_per_token": 10**30}}, "spec.bytes_per_token should be an integer"),
        ({"spec": ["llama"]}, "metadata spec should be an object, got list"),
        ({"allocator_config": [16]}, "metadata allocator_config should be an object, got list"),
        ({"allocator_config": {"block_size": 0}}, "allocator_config.block_size should be an integer >= 1"),
        ({"allocator_config": {"page_size": True}}, "allocator_config.page_size should be an integer >= 1"),
        ({"allocator_config": {"megacache": "yes"}}, "allocator_config.megacache should be true or false"),
        ({"allocator": 3}, "metadata allocator should be a string, got int"),
        ({"requests": {"seq": [0, "1"]}}, "requests.seq[...] should be an integer >= 0, got str"),
        ({"requests": {"seq": [0, 1], "arrival": [0.0]}}, "requests columns have different lengths (1, 2)"),
        ({"requests": {"seq": [0], "arrival": [float("nan")]}}, "requests.arrival[...] should be a finite number"),
        ({"requests": {"seq": 3}}, "requests.seq should be a list"),
    ],
)
def test_wrong_typed_or_absurd_metadata_is_one_line_at_load(tmp_path, meta, expected):
    path = tmp_path / "meta.kvtrace"
    write_stream(path, arrow_schema(meta_bytes(meta)))
    with pytest.raises(TraceError) as err:
        load_trace(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ") and expected in message, message
