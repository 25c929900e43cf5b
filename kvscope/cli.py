"""`kvscope` command: one module per subcommand in kvscope/commands (each has add_parser and run).

User mistakes (bad files, bad options, bad values) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kvscope import __version__

# name -> module in kvscope.commands. Modules import only argparse at top level; heavy imports happen in run().
COMMANDS = {
    "run": "Run a workload through an allocator and record a trace",
    "summary": "Summarize a trace (a table, or --json)",
    "workload": "Generate a synthetic workload (JSONL)",
    "report": "Write a self-contained HTML report for one or more traces",
    "export": "Export a trace (Perfetto / Chrome trace-event JSON)",
    "dashboard": "Open the Streamlit dashboard",
    "demo": "Run the main demo: one workload on every allocator, then a report",
}


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvscope", description="See where your LLM KV cache memory goes.")
    parser.add_argument("--version", action="version", version=f"kvscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"kvscope.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_parser(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from kvscope.trace import TraceError

    try:
        return int(args._module.run(args) or 0)
    except (UserError, TraceError, ValueError, FileNotFoundError) as e:
        # ValueError covers bad sizes, bad presets and bad workload lines: every one carries its own one-line message.
        print(f"kvscope {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvscope {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` or a pager that closed early: not an error. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
