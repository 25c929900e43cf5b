"""`kvscope import vllm-events FILE -o TRACE`: another system's data as a kvscope trace.

vllm-events reads vLLM's KV-cache events (the msgpack KVEventBatch payloads its ZMQ publisher sends, one array of
them or one after another, or their JSON-lines form) into a trace whose views show the prefix cache as vLLM saw it.
(The module is import_.py because `import` is a Python keyword; kvscope.cli maps the command to it.)
"""

from __future__ import annotations

import argparse

SOURCES = ("vllm-events",)


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    v = sub.add_parser(
        "vllm-events",
        help="vLLM KV-cache events (msgpack KVEventBatch payloads or JSON lines) -> a trace",
        description="vLLM KV-cache events (msgpack KVEventBatch payloads or JSON lines) -> a trace",
    )
    v.add_argument("file", metavar="FILE", help="the events: .msgpack (payloads) or .jsonl (one batch a line)")
    v.add_argument("-o", "--output", metavar="TRACE", help="trace to write (default: FILE with .kvtrace)")
    v.add_argument(
        "--format", choices=("auto", "msgpack", "jsonl"), default="auto", help="input form (default: from content)"
    )
    v.add_argument("--tokens", action="store_true", help="keep every block's token ids in the trace (KV_TOKEN rows)")
    v.add_argument(
        "--salvage",
        action="store_true",
        help="import the complete messages before a damaged one (warns) instead of failing",
    )


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from kvscope.commands.outputs import check_output, writing
    from kvscope.errors import UserError
    from kvscope.importers.vllm_file import import_vllm_events
    from kvscope.runmeta import command_line
    from kvscope.trace import TRACE_SUFFIX

    src = Path(args.file)
    if not src.is_file():
        raise UserError(f"{src}: no such file" if not src.exists() else f"{src}: not a file")
    out = check_output(args.output or src.with_suffix(TRACE_SUFFIX), "-o", [src], make_parents=True)
    with writing(out):
        result = import_vllm_events(
            src,
            out,
            form=None if args.format == "auto" else args.format,
            keep_tokens=args.tokens,
            salvage=args.salvage,
            command=command_line(),
        )
    if result.damage:
        print(
            f"kvscope import: warning: {result.damage}; kept the {result.messages} messages before it", file=sys.stderr
        )
    print(
        f"wrote {out}: {result.messages:,} messages, {result.events:,} events, {result.nodes:,} distinct block hashes"
        f" (see: kvscope summary {out})"
    )
    return 0
