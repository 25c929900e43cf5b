"""Listen to a running vLLM's KV-event publisher (ZMQ) and write its batches into a trace as they arrive.

vLLM's ZmqEventPublisher (vllm/distributed/kv_events.py) binds a PUB socket and sends every KVEventBatch as three
frames, `[topic, sequence number (8 bytes, big-endian), msgpack payload]`, numbering messages 0, 1, 2, ... It
keeps the last messages (10,000 by default) for a ROUTER "replay" socket: a client sends the first sequence number
it wants as 8 big-endian bytes and gets back every buffered message from there on as `[seq, payload]`, then
`[-1 as 8 signed bytes, b""]`. We talk to it from a DEALER socket (a REQ socket would accept only the first reply),
sending `[b"", start]` so that the ROUTER sees the `[identity, b"", start]` a REQ client would send.

Gaps: a message whose number is past the next one expected means messages were dropped (a PUB socket drops
when a subscriber is slow). With a replay endpoint the missing ones are asked for at once and written, in order,
before the message that revealed the gap; whatever does not come back (outside the publisher's buffer, or the
replay timed out) is recorded as missing in a KV_GAP row and counted in the result. Messages numbered below the
next expected are duplicates (a replay overlapping the stream) and are skipped; a stream that starts again from 0
is a restarted publisher, which ends the recording with a one-line error (a new trace is needed: its numbers
would repeat).

The trace is written incrementally: rows reach the file at least every `flush_seconds` (and the Recorder writes
whole Arrow batches only), so a killed listener leaves a trace that loads up to its last flush, read as cut off.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvscope.errors import UserError
from kvscope.importers.kv_trace import KVTraceWriter, trace_meta
from kvscope.importers.vllm_events import Batch, EventFormatError, decode_payload
from kvscope.recorder import Recorder

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # the replay socket's end-of-replay marker
_POLL_MS = 100  # how often the loop wakes to check the clock, the stop flag and the flush timer


@dataclass(frozen=True)
class ListenConfig:
    endpoint: str  # the publisher's PUB address, e.g. tcp://127.0.0.1:5557
    replay: str | None = None  # its replay (ROUTER) address, e.g. tcp://127.0.0.1:5558
    duration_s: float | None = None  # stop after this long; None: until stopped (Ctrl-C, stop event)
    topic: str = ""  # subscription prefix (vLLM publishes on "" unless configured)
    keep_tokens: bool = False
    max_messages: int | None = None  # stop after this many messages written (tests, sampling)
    replay_timeout_s: float = 2.0  # how long to wait for a replay to end
    flush_seconds: float = 1.0  # the most a killed listener loses


@dataclass
class ListenResult:
    messages: int = 0  # batches written (replayed ones included)
    replayed: int = 0  # of those, recovered through the replay socket
    gaps: int = 0  # times the stream skipped ahead
    missing: int = 0  # messages lost for good
    duplicates: int = 0
    first_seq: int | None = None  # the first message's number (> 0 when vLLM had published before we joined)
    stopped: str = ""  # duration | max_messages | stop | interrupted
    notes: list[str] = field(default_factory=list)


def check_endpoint(endpoint: str, flag: str) -> str:
    """A ZMQ address we can connect to: tcp://HOST:PORT (or ipc://PATH); UserError otherwise."""
    if endpoint.startswith("ipc://") and len(endpoint) > 6:
        return endpoint
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[6:].rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536 and host != "*":
            return endpoint
    raise UserError(f"{flag} {endpoint!r}: expected tcp://HOST:PORT (the address vLLM publishes on) or ipc://PATH")


class _Replayer:
    """The DEALER side of vLLM's replay protocol; a fresh socket per failed request, so late replies to a request
    that timed out never mix into the next one."""

    def __init__(self, ctx, endpoint: str, timeout_s: float) -> None:
        self.ctx, self.endpoint, self.timeout_s = ctx, endpoint, timeout_s
        self.socket: Any = None  # a zmq DEALER once connected

    def fetch(self, start: int, stop: int) -> tuple[list[tuple[int, bytes]], bool]:
        """([(seq, payload)] for start <= seq < stop, in order; whether the replay ended within the timeout)."""
        import zmq

        if self.socket is None:
            self.socket = self.ctx.socket(zmq.DEALER)
            self.socket.setsockopt(zmq.LINGER, 0)
            try:
                self.socket.connect(self.endpoint)
            except zmq.ZMQError:  # the gap is then recorded as unfilled, like a replay that never answers
                self.close()
                return [], False
        self.socket.send_multipart([b"", start.to_bytes(8, "big")])
        got: dict[int, bytes] = {}
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(max(1, int(left * 1000))):
                self.close()
                return [(s, got[s]) for s in sorted(got)], False
            frames = self.socket.recv_multipart()
            if frames and frames[0] == b"":
                frames = frames[1:]  # the delimiter the ROUTER sends back
            if len(frames) != 2 or len(frames[0]) != 8:
                continue  # not a replay message: ignore it, as vLLM ignores bad requests
            if frames[0] == END_SEQ:
                return [(s, got[s]) for s in sorted(got)], True
            seq = int.from_bytes(frames[0], "big")
            if start <= seq < stop:
                got[seq] = frames[1]

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None


def listen(
    cfg: ListenConfig,
    out: str | os.PathLike,
    *,
    stop: threading.Event | None = None,
    command: str | None = None,
) -> ListenResult:
    """Subscribe to `cfg.endpoint` and write what arrives to `out` until the duration, max_messages, `stop` or a
    Ctrl-C ends it (each closes the trace cleanly). A damaged message, or a restarted publisher, ends it with an
    EventFormatError (one line) after closing the trace: everything before it stays."""
    import zmq

    check_endpoint(cfg.endpoint, "endpoint")
    if cfg.replay is not None:
        check_endpoint(cfg.replay, "--replay")
    origin = time.time()
    meta = trace_meta(input=cfg.endpoint, form="zmq", ts_origin_s=origin, keep_tokens=cfg.keep_tokens, command=command)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta["kv_events"] |= {"replay": cfg.replay, "topic": cfg.topic, "started": started}
    rec = Recorder(Path(out), meta, flush_seconds=cfg.flush_seconds)  # first: an unwritable output opens nothing
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, cfg.topic.encode())
    try:
        sub.connect(cfg.endpoint)
    except zmq.ZMQError as e:
        sub.close(linger=0)
        ctx.term()
        rec.abort()
        raise UserError(f"{cfg.endpoint}: cannot connect ({e})") from None
    replayer = _Replayer(ctx, cfg.replay, cfg.replay_timeout_s) if cfg.replay else None
    writer = KVTraceWriter(rec, origin, keep_tokens=cfg.keep_tokens)
    result = ListenResult()
    loop = _Loop(cfg, writer, result, replayer)
    deadline = None if cfg.duration_s is None else time.monotonic() + cfg.duration_s
    try:
        while not result.stopped:
            if stop is not None and stop.is_set():
                result.stopped = "stop"
                break
            wait = _POLL_MS if deadline is None else max(0, min(_POLL_MS, int((deadline - time.monotonic()) * 1000)))
            if sub.poll(wait):
                loop.receive(sub.recv_multipart())
            else:
                rec.end_step()  # a quiet stream still reaches the file within flush_seconds
            if deadline is not None and time.monotonic() >= deadline:
                result.stopped = result.stopped or "duration"
    except KeyboardInterrupt:
        result.stopped = "interrupted"
    except BaseException:
        writer.abort()  # reads as cut off; every message written before the failure stays
        raise
    finally:
        if replayer is not None:
            replayer.close()
        sub.close(linger=0)
        ctx.term()
    writer.close(time.time())
    return result


class _Loop:
    """What each received message does: in order, a gap (fill and record it), a duplicate, or a restart."""

    def __init__(self, cfg: ListenConfig, writer: KVTraceWriter, result: ListenResult, replayer) -> None:
        self.cfg, self.writer, self.result, self.replayer = cfg, writer, result, replayer
        self.expected: int | None = None

    def receive(self, frames: list[bytes]) -> None:
        where = f"{self.cfg.endpoint}: message"
        if len(frames) != 3 or len(frames[1]) != 8:
            raise EventFormatError(
                f"{where} with {len(frames)} frames (sizes {[len(f) for f in frames][:4]}): expected [topic, "
                "8-byte sequence number, payload], as vLLM's publisher sends"
            )
        seq = int.from_bytes(frames[1], "big")
        where = f"{self.cfg.endpoint}: message {seq}"
        batch = decode_payload(frames[2], where)
        if self.expected is None:
            self.result.first_seq = seq
        elif seq < self.expected:
            if seq == 0:
                raise EventFormatError(
                    f"{where}: the publisher started again from 0 after {self.expected - 1} (vLLM restarted?); "
                    "the trace so far is kept, start a new one"
                )
            self.result.duplicates += 1
            return
        elif seq > self.expected:
            self._gap(self.expected, seq)
        self._write(batch, seq, where, replayed=False)

    def _gap(self, first: int, seq: int) -> None:
        recovered: list[tuple[int, bytes]] = []
        if self.replayer is not None:
            recovered, ended = self.replayer.fetch(first, seq)
            if not ended:
                self.result.notes.append(f"replay from {first} timed out after {self.cfg.replay_timeout_s} s")
        self.writer.gap(first, seq - first, len(recovered))
        self.result.gaps += 1
        self.result.missing += seq - first - len(recovered)
        for s, payload in recovered:
            where = f"{self.cfg.replay}: replayed message {s}"
            self._write(decode_payload(payload, where), s, where, replayed=True)
            self.result.replayed += 1

    def _write(self, batch: Batch, seq: int, where: str, *, replayed: bool) -> None:
        self.writer.write(batch, seq, where, replayed=replayed)
        self.expected = seq + 1
        self.result.messages += 1
        if self.cfg.max_messages is not None and self.result.messages >= self.cfg.max_messages:
            self.result.stopped = "max_messages"
