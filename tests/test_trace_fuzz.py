"""Fuzzing the trace reader with a real engine trace (sim device, several small batches), damaged one byte at a time
and cut at many lengths.

Every outcome must be one of: an exact load (identical events and metadata: a flip in padding is harmless), a warned
prefix (TruncatedTraceWarning and the first events of the original, nothing changed), or a one-line TraceError naming
the file. Never another exception, a crash or a hang. Cuts are held to more: a file cut after its schema message loads
exactly its complete batches, with the cut-off warning. A handful of damaged files also go through
`kvscope summary --json` in a subprocess, where a crash shows as a signal exit (pyarrow does not validate a batch on
read: a flipped string offset in the kind dictionary used to segfault the summary).
"""

from __future__ import annotations

import bisect
import json
import random
import subprocess
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
from test_analysis_tracegen import make_requests

from kvscope.trace import DamagedTraceWarning, Trace, TraceError, TruncatedTraceWarning, load_trace

N_FLIPS = 240  # spread evenly over the file: one random byte in each of N_FLIPS equal slices
N_DICTIONARY_FLIPS = 24  # extra single-bit flips inside the kind dictionary's message
N_CUTS = 60
N_SUBPROCESS = 20
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Message:
    kind: str  # schema | dictionary | record batch
    start: int
    end: int


@dataclass
class Original:
    path: Path
    data: bytes
    trace: Trace
    messages: list[Message]
    batch_rows: list[int]  # events in the first k batches, k = 0 .. batches

    def rows_before(self, cut: int) -> int:
        """Events in the batches whose messages lie wholly before byte `cut`."""
        ends = [m.end for m in self.messages if m.kind == "record batch"]
        return self.batch_rows[bisect.bisect_right(ends, cut)]


def message_spans(data: bytes) -> list[Message]:
    source = pa.BufferReader(data)
    reader = pa.ipc.MessageReader.open_stream(source)
    spans, start = [], 0
    while True:
        try:
            message = reader.read_next_message()
        except StopIteration:
            return spans
        spans.append(Message(message.type, start, source.tell()))
        start = source.tell()


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Original:
    from kvscope.engine import RunConfig, record_run

    path = tmp_path_factory.mktemp("fuzz") / "paged.kvtrace"

    def small_batches(engine) -> None:
        engine.recorder.flush_events = 24  # a few hundred events -> well over a dozen batches

    cfg = RunConfig(allocator="paged", device="sim", model="tiny", kv_memory=64 * 1024, max_len=128, max_batch=8)
    requests = make_requests(5, seed=3, max_prompt=30, max_output=10)
    record_run(requests, cfg, path=path, command="test", setup=small_batches)
    trace = load_trace(path)
    data = path.read_bytes()
    messages = message_spans(data)
    with pa.OSFile(str(path), "rb") as f:
        rows = [0]
        for batch in pa.ipc.open_stream(f):
            rows.append(rows[-1] + batch.num_rows)
    assert 200 <= len(trace.events) <= 1000 and len(rows) > 10 and not trace.truncated
    return Original(path, data, trace, messages, rows)


def outcome(path: Path, original: Original) -> tuple[str, int]:
    """('exact' | 'prefix' | 'error', events loaded); anything else fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trace = load_trace(path)
        except TraceError as e:
            message = str(e)
            assert "\n" not in message and message.startswith(f"{path}: "), message
            return "error", 0
    categories = [w.category for w in caught]
    assert all(issubclass(c, TruncatedTraceWarning) for c in categories), categories
    assert not any(issubclass(c, DamagedTraceWarning) for c in categories)  # only with salvage=True
    n = len(trace.events)
    expected = original.trace.events.iloc[:n].reset_index(drop=True)
    assert trace.meta == original.trace.meta
    assert trace.events.equals(expected), f"{path}: loaded events differ from the original's"
    if not categories:
        assert n == len(original.trace.events) and not trace.truncated
        return "exact", n
    assert trace.truncated
    return "prefix", n


def flips(original: Original) -> list[tuple[int, int]]:
    """(position, xor mask): one random byte per slice of the file, then single-bit flips in the kind dictionary."""
    rng = random.Random(7)
    size = len(original.data)
    out = [
        (rng.randrange(i * size // N_FLIPS, (i + 1) * size // N_FLIPS), rng.randrange(1, 256)) for i in range(N_FLIPS)
    ]
    dictionary = next(m for m in original.messages if m.kind == "dictionary")
    for i in range(N_DICTIONARY_FLIPS):
        out.append((dictionary.start + i * (dictionary.end - dictionary.start) // N_DICTIONARY_FLIPS, 1 << (i % 8)))
    return out


def flipped(original: Original, tmp_path: Path, pos: int, mask: int) -> Path:
    data = bytearray(original.data)
    data[pos] ^= mask
    path = tmp_path / f"flip-{pos}-{mask}.kvtrace"
    path.write_bytes(bytes(data))
    return path


def test_single_byte_flips_load_exactly_or_as_a_prefix_or_fail_in_one_line(original, tmp_path, capsys):
    counts: Counter[str] = Counter()
    for pos, mask in flips(original):
        path = flipped(original, tmp_path, pos, mask)
        counts[outcome(path, original)[0]] += 1
        path.unlink()
    with capsys.disabled():
        print(f"\n{sum(counts.values())} flips of a {len(original.data):,}-byte trace: {dict(counts)}")
    assert counts["error"] > len(flips(original)) // 2  # most bytes matter, and damage is caught
    assert counts["exact"] > 0  # padding


def test_cuts_load_the_complete_batches_with_a_warning(original, tmp_path, capsys):
    rng = random.Random(11)
    size = len(original.data)
    schema_end = original.messages[0].end
    boundaries = [m.end for m in original.messages[:6]]
    cuts = sorted({rng.randrange(1, size) for _ in range(N_CUTS - 16)} | {*boundaries, *(b + 1 for b in boundaries)})
    cuts += [size - 8, size - 4, size - 1]  # no end-of-stream marker / part of it
    counts: Counter[str] = Counter()
    for cut in cuts:
        path = tmp_path / f"cut-{cut}.kvtrace"
        path.write_bytes(original.data[:cut])
        if cut < schema_end:
            with pytest.raises(TraceError, match="cut off inside its first message"):
                load_trace(path)
            counts["error (inside the schema)"] += 1
            continue
        kind, n = outcome(path, original)
        counts[kind] += 1
        last_batch_end = original.messages[-1].end
        if cut < last_batch_end:
            assert kind == "prefix" and n == original.rows_before(cut), (cut, kind, n)
        else:  # only the end-of-stream marker is missing, or part of it: every event is there
            assert n == len(original.trace.events)
    with capsys.disabled():
        print(f"\n{len(cuts)} cuts: {dict(counts)}")
    assert counts["prefix"] >= N_CUTS // 2


def test_damaged_files_never_crash_kvscope_summary(original, tmp_path):
    chosen = flips(original)
    # The dictionary's bit flips (where the segfault was) and an even spread of the others.
    picks = chosen[N_FLIPS:][:: max(1, N_DICTIONARY_FLIPS // 10)][:10]
    picks += chosen[: N_FLIPS : N_FLIPS // (N_SUBPROCESS - len(picks))][: N_SUBPROCESS - len(picks)]
    assert len(picks) == N_SUBPROCESS
    codes: Counter[int] = Counter()
    for pos, mask in picks:
        path = flipped(original, tmp_path, pos, mask)
        cmd = [sys.executable, "-m", "kvscope.cli", "summary", "--json", str(path)]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        codes[done.returncode] += 1
        err = done.stderr.strip().splitlines()
        assert done.returncode in (0, 2), (pos, mask, done.returncode, done.stderr[-2000:])
        if done.returncode == 2:
            assert len(err) == 1 and str(path) in err[0] and "Traceback" not in done.stderr, done.stderr
        else:
            assert len(err) <= 1 and json.loads(done.stdout)["events"] > 0
    assert codes[2] > 0
