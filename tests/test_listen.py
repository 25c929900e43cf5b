"""`kvscope listen` against a local publisher: a thread on 127.0.0.1 that replays the streams vLLM published
(tests/data/vllm-kv-events) frame by frame as vLLM's ZmqEventPublisher does ([topic, 8-byte big-endian sequence
number, payload] on PUB; a ROUTER replay socket answering [start] with [seq, payload]... then [-1, b""]), with one
message left out of the live stream. Every loop is bounded by a deadline; only loopback addresses are used."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import zmq

from kvscope import cli
from kvscope.analysis import cache
from kvscope.analysis.summary import summarize
from kvscope.importers.msgpack_frames import payload_spans
from kvscope.importers.vllm_events import EventFormatError
from kvscope.importers.vllm_file import import_vllm_events
from kvscope.importers.vllm_live import END_SEQ, ListenConfig, listen
from kvscope.trace import TruncatedTraceWarning, load_trace

DATA = (
    Path(os.environ["KVSCOPE_DATA"]) / "vllm-kv-events"
    if "KVSCOPE_DATA" in os.environ
    else Path(__file__).resolve().parent / "data" / "vllm-kv-events"
)
ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 20.0  # no test waits longer than this for anything


def payloads(name: str) -> list[bytes]:
    data = (DATA / f"{name}.msgpack").read_bytes()
    return [data[a:b] for a, b in payload_spans(data)]


class Publisher(threading.Thread):
    """vLLM's publisher, as a test double: waits for a subscriber (XPUB sees its subscription, so no message is
    lost to ZMQ's slow-joiner start), sends `messages` numbered from `first`, leaving out those in `drop` (which
    stay in the replay buffer, as a message a slow subscriber lost would), then serves replay requests until
    stopped. `pause_after` holds the stream back after that many messages until `resume` is set."""

    def __init__(self, messages: list[bytes], *, drop=(), first: int = 0, frames=None, pause_after=None) -> None:
        super().__init__(daemon=True)
        self.messages, self.drop, self.first = messages, set(drop), first
        self.frames = frames  # custom frame lists to send instead (bad input tests)
        self.pause_after = pause_after
        self.resume = threading.Event()
        self.stop = threading.Event()
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        rport = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint, self.replay = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{rport}"
        self.replay_requests: list[int] = []
        self.sent = 0

    def run(self) -> None:
        deadline = time.monotonic() + DEADLINE_S
        try:
            if not self.pub.poll(int(DEADLINE_S * 1000)):
                return  # nobody subscribed
            self.pub.recv()  # the subscription
            if self.frames is not None:
                for frames in self.frames:
                    self.pub.send_multipart(frames)
            else:
                for i, payload in enumerate(self.messages):
                    if self.pause_after is not None and i == self.pause_after:
                        while not self.resume.wait(0.01) and time.monotonic() < deadline:
                            self._serve(0)
                    seq = self.first + i
                    if seq not in self.drop:
                        self.pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])
                        self.sent += 1
                    self._serve(0)
            while not self.stop.is_set() and time.monotonic() < deadline:
                self._serve(20)
        finally:
            self.pub.close(linger=0)
            self.router.close(linger=0)
            self.ctx.term()

    def _serve(self, timeout_ms: int) -> None:
        while self.router.poll(timeout_ms):
            frames = self.router.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big")
            self.replay_requests.append(start)
            for i, payload in enumerate(self.messages):
                if self.first + i >= start:
                    self.router.send_multipart([client, b"", (self.first + i).to_bytes(8, "big"), payload])
            self.router.send_multipart([client, b"", END_SEQ, b""])
            timeout_ms = 0


@pytest.fixture
def publisher():
    started: list[Publisher] = []

    def make(*args, **kw) -> Publisher:
        pub = Publisher(*args, **kw)
        pub.start()
        started.append(pub)
        return pub

    yield make
    for pub in started:
        pub.stop.set()
        pub.resume.set()
        pub.join(timeout=5)


def kv_rows(trace):
    """The cache's own rows, for comparing a live recording with the file import (batch rows aside: they say how
    each message arrived)."""
    ev = trace.events.astype({"kind": str})
    ev = ev[ev["kind"].str.startswith("kv_") & ~ev["kind"].isin(["kv_batch", "kv_gap"])]
    return ev.drop(columns=["t_ns"]).reset_index(drop=True)


def file_trace(tmp_path: Path, name: str):
    out = tmp_path / f"{name}-file.kvtrace"
    import_vllm_events(DATA / f"{name}.msgpack", out)
    return load_trace(out)


def test_a_dropped_message_is_filled_through_replay(tmp_path, publisher):
    msgs = payloads("shared-prefix")
    pub = publisher(msgs, drop={37})
    out = tmp_path / "live.kvtrace"
    cfg = ListenConfig(pub.endpoint, replay=pub.replay, duration_s=DEADLINE_S, max_messages=len(msgs))
    result = listen(cfg, out)
    assert result.stopped == "max_messages"
    assert (result.messages, result.replayed, result.gaps, result.missing) == (len(msgs), 1, 1, 0)
    assert pub.replay_requests == [37]
    live = load_trace(out)  # closed cleanly: no cut-off warning
    assert not live.truncated
    assert kv_rows(live).equals(kv_rows(file_trace(tmp_path, "shared-prefix")))  # same cache, row for row
    s = summarize(live)
    assert (s["blocks_stored"], s["blocks_removed"], s["messages_replayed"], s["gaps"]) == (232, 141, 1, 1)
    assert live.meta["kv_events"]["form"] == "zmq"


def test_without_replay_the_gap_is_reported(tmp_path, publisher):
    msgs = payloads("duplicate-hash")
    pub = publisher(msgs, drop={2})
    out = tmp_path / "live.kvtrace"
    result = listen(ListenConfig(pub.endpoint, duration_s=DEADLINE_S, max_messages=len(msgs) - 1), out)
    assert (result.messages, result.gaps, result.missing, result.replayed) == (len(msgs) - 1, 1, 1, 0)
    s = summarize(load_trace(out))
    assert (s["messages"], s["gaps"], s["messages_missing"]) == (len(msgs) - 1, 1, 1)
    # message 2 stored blocks: they are missing from the trace, not invented
    assert s["blocks_stored"] < summarize(file_trace(tmp_path, "duplicate-hash"))["blocks_stored"]


def test_joining_late_is_not_a_gap_and_duplicates_are_skipped(tmp_path, publisher):
    msgs = payloads("duplicate-hash")
    frames = [[b"", seq.to_bytes(8, "big"), msgs[i]] for i, seq in ((0, 100), (1, 101), (1, 101), (2, 102))]
    pub = publisher(msgs, frames=frames)
    result = listen(ListenConfig(pub.endpoint, duration_s=DEADLINE_S, max_messages=3), tmp_path / "late.kvtrace")
    assert (result.first_seq, result.gaps, result.duplicates, result.messages) == (100, 0, 1, 3)
    trace = load_trace(tmp_path / "late.kvtrace")
    assert cache.cache_summary(trace)["first_seq"] == 100


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ([[b"", b"\x00" * 8]], "message with 2 frames"),
        ([[b"", (0).to_bytes(8, "big"), b"\xc1"]], "message 0: not a msgpack KVEventBatch"),
        ([[b"", (0).to_bytes(8, "big"), b"\x92\xcb" + bytes(8) + b"\x91\x07"]], "message 0, event 0: expected"),
    ],
)
def test_damaged_messages_end_with_one_line_and_keep_the_trace(tmp_path, publisher, frames, expected):
    good = payloads("duplicate-hash")
    pub = publisher(good, frames=[[b"", (5).to_bytes(8, "big"), good[0]], *frames])
    out = tmp_path / "bad.kvtrace"
    with pytest.raises(EventFormatError, match=expected):
        listen(ListenConfig(pub.endpoint, duration_s=DEADLINE_S), out)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        trace = load_trace(out)
    assert summarize(trace)["messages"] == 1  # the good message before it stays


def test_a_restarted_publisher_ends_the_recording(tmp_path, publisher):
    msgs = payloads("duplicate-hash")
    frames = [[b"", seq.to_bytes(8, "big"), msgs[i]] for i, seq in ((0, 0), (1, 1), (2, 0))]
    pub = publisher(msgs, frames=frames)
    with pytest.raises(EventFormatError, match="started again from 0"):
        listen(ListenConfig(pub.endpoint, duration_s=DEADLINE_S), tmp_path / "r.kvtrace")


def test_duration_ends_a_quiet_stream_cleanly(tmp_path):
    out = tmp_path / "quiet.kvtrace"
    t0 = time.monotonic()
    result = listen(ListenConfig("tcp://127.0.0.1:9", duration_s=0.3), out)  # nothing publishes there
    assert result.stopped == "duration" and result.messages == 0
    assert time.monotonic() - t0 < 5
    trace = load_trace(out)
    assert not trace.truncated and summarize(trace)["messages"] == 0


def test_a_killed_listener_leaves_a_readable_trace(tmp_path, publisher):
    msgs = payloads("shared-prefix")
    pub = publisher(msgs, pause_after=30)
    out = tmp_path / "killed.kvtrace"
    cmd = [sys.executable, "-m", "kvscope.cli", "listen", pub.endpoint, "-o", str(out), "--flush-seconds", "0.05"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + DEADLINE_S
        seen = 0
        while time.monotonic() < deadline and seen < 30:  # wait for the first 30 messages to reach the file
            time.sleep(0.05)
            if out.exists() and out.stat().st_size:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", TruncatedTraceWarning)
                    try:
                        seen = summarize(load_trace(out))["messages"]
                    except ValueError:
                        seen = 0  # the schema is not written yet
        assert seen == 30, proc.stderr.read1().decode() if proc.poll() is not None else "listener too slow"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = load_trace(out)
    assert any(issubclass(w.category, TruncatedTraceWarning) for w in caught)
    assert summarize(trace)["messages"] == 30


def test_sigint_closes_the_trace_cleanly(tmp_path, publisher):
    msgs = payloads("duplicate-hash")
    pub = publisher(msgs)
    out = tmp_path / "int.kvtrace"
    cmd = [sys.executable, "-m", "kvscope.cli", "listen", pub.endpoint, "-o", str(out), "--replay", pub.replay]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + DEADLINE_S
    while pub.sent < len(msgs) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the last message crosses the socket
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert f"{len(msgs)} messages" in stdout and "stopped: interrupted" in stdout
    trace = load_trace(out)
    assert not trace.truncated and summarize(trace)["blocks_stored"] == 12


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["listen", "localhost:5557", "-o", "x.kvtrace"], "expected tcp://HOST:PORT"),
        (["listen", "tcp://*:5557", "-o", "x.kvtrace"], "expected tcp://HOST:PORT"),
        (["listen", "tcp://127.0.0.1:5557", "-o", "x.kvtrace", "--replay", "5558"], "--replay '5558'"),
        (["listen", "tcp://127.0.0.1:5557", "-o", "x.kvtrace", "--duration", "0"], "--duration 0.0"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "COMMANDS", {"listen": cli.COMMANDS["listen"]})
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not (tmp_path / "x.kvtrace").exists()


def test_dashboard_shows_the_stream_and_can_follow_it(tmp_path, monkeypatch):
    """The dashboard's KV-events page draws an imported stream; the opt-in follow checkbox runs its timer fragment
    without breaking the page (AppTest runs no timers: the rerun on growth itself is Streamlit's)."""
    AppTest = pytest.importorskip("streamlit.testing.v1").AppTest
    from kvscope.app.sources import TRACES_ENV

    out = tmp_path / "sp.kvtrace"
    import_vllm_events(DATA / "shared-prefix.msgpack", out)
    monkeypatch.setenv(TRACES_ENV, str(out))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.run()
    assert not at.exception
    at.switch_page("views/kv_events.py").run()
    assert not at.exception
    assert len(at.tabs) == 5 and len(at.get("plotly_chart")) == 5
    at.sidebar.checkbox(key="kvscope_follow").check().run()
    assert not at.exception and len(at.get("plotly_chart")) == 5
