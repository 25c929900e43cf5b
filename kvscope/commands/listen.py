"""`kvscope listen tcp://HOST:PORT -o TRACE [--replay tcp://HOST:PORT] [--duration S]`: record a running vLLM's
KV-cache events (vLLM started with KV events on: `--kv-events-config '{"enable_kv_cache_events": true,
"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5558"}'`) into a trace as they
arrive. Ctrl-C (or --duration) ends it cleanly; a killed listener leaves a trace readable up to its last flush.
"""

from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("endpoint", metavar="ENDPOINT", help="vLLM's KV-event publisher, e.g. tcp://127.0.0.1:5557")
    p.add_argument("-o", "--output", metavar="TRACE", required=True, help="trace to write (.kvtrace)")
    p.add_argument(
        "--replay",
        metavar="ENDPOINT",
        help="vLLM's replay socket (e.g. tcp://127.0.0.1:5558): fills gaps in the stream",
    )
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--topic", default="", help="topic prefix to subscribe to (default: all)")
    p.add_argument("--tokens", action="store_true", help="keep every block's token ids in the trace")
    p.add_argument("--max-messages", type=int, metavar="N", help="stop after N messages")
    p.add_argument(
        "--flush-seconds",
        type=float,
        default=1.0,
        metavar="S",
        help="write buffered rows to the file at least this often (default 1): the most a killed listener loses",
    )


def run(args: argparse.Namespace) -> int:
    import signal
    import sys

    from kvscope.commands.outputs import check_output, writing
    from kvscope.errors import UserError
    from kvscope.importers.vllm_live import ListenConfig, check_endpoint, listen
    from kvscope.runmeta import command_line

    check_endpoint(args.endpoint, "ENDPOINT")
    if args.replay is not None:
        check_endpoint(args.replay, "--replay")
    if args.duration is not None and not args.duration > 0:
        raise UserError(f"--duration {args.duration}: must be a positive number of seconds")
    if args.max_messages is not None and args.max_messages < 1:
        raise UserError(f"--max-messages {args.max_messages}: must be at least 1")
    if not args.flush_seconds > 0:
        raise UserError(f"--flush-seconds {args.flush_seconds}: must be positive")
    out = check_output(args.output, "-o", make_parents=True)
    cfg = ListenConfig(
        args.endpoint,
        replay=args.replay,
        duration_s=args.duration,
        topic=args.topic,
        keep_tokens=args.tokens,
        max_messages=args.max_messages,
        flush_seconds=args.flush_seconds,
    )
    # SIGTERM (a service manager stopping us) ends the recording like Ctrl-C: the trace is closed cleanly.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with writing(out):
            result = listen(cfg, out, command=command_line())
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(
        f"wrote {out}: {result.messages:,} messages ({result.replayed:,} through replay), {result.gaps} gaps, "
        f"{result.missing:,} messages missing, {result.duplicates} duplicates; stopped: {result.stopped}"
    )
    if not result.messages:
        print(
            f"  note: nothing arrived from {args.endpoint} (is vLLM running there with KV events on, "
            'e.g. --kv-events-config \'{"enable_kv_cache_events": true, "publisher": "zmq"}\'?)',
            file=sys.stderr,
        )
    if result.first_seq:
        print(f"  note: the first message was number {result.first_seq} (vLLM published before we joined)")
    for note in result.notes:
        print(f"  note: {note}", file=sys.stderr)
    if result.missing and not args.replay:
        print("  note: give --replay to fill gaps from vLLM's replay buffer", file=sys.stderr)
    return 0
