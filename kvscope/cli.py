"""`kvscope` command: one module per subcommand in kvscope/commands (each has add_parser and run).

User mistakes (bad files, bad options, bad values) end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kvscope import __version__
from kvscope.errors import EXIT_INTERRUPTED, UserError, describe

__all__ = ["COMMANDS", "UserError", "build_parser", "main"]  # UserError lives in kvscope.errors; kept importable here

# name -> module in kvscope.commands. Modules import only argparse at top level; heavy imports happen in run().
COMMANDS = {
    "run": "Run a workload through an allocator and record a trace",
    "summary": "Summarize a trace (a table, or --json)",
    "workload": "Generate a synthetic workload (JSONL)",
    "report": "Write a self-contained HTML report for one or more traces",
    "export": "Export a trace (Perfetto / Chrome trace-event JSON)",
    "dashboard": "Open the Streamlit dashboard",
    "demo": "Run the main demo: one workload on every allocator, then a report",
    "import": "Import another system's data as a trace (vLLM KV events)",
    "listen": "Record a running vLLM's KV events (ZMQ) into a trace as they arrive",
    "lab": "Replay a workload's prefix-cache accesses through eviction policies and capacities",
    "sweep": "Run a grid of configurations (simulated) -> a Parquet table and a Pareto/what-if page",
    "plan": "Capacity planning: the KV budget a model leaves on a GPU and the requests it holds",
}
# Commands whose module name differs from the command (`import` is a Python keyword).
_MODULES = {"import": "import_"}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line too: stock argparse prints the whole usage (several lines for `run`)
    before the error; --help still shows it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvscope", description="See where your LLM KV cache memory goes.")
    parser.add_argument("--version", action="version", version=f"kvscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"kvscope.commands.{_MODULES.get(name, name)}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_parser(p)
        p.set_defaults(_module=module, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the subcommand's parser: "kvscope run: error: unrecognized arguments: ..."
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:
        # --help / --version (0), or a usage error _Parser has printed as one line (2): returned, so that callers
        # of main() in-process (tests, notebooks) get the code like any other outcome.
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except BrokenPipeError:
        # Output piped into `head` or a pager that closed early: not an error. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (KeyboardInterrupt, Exception) as e:
        failure = describe(e)
        if failure is None:
            raise  # a bug, not the user's mistake: keep its traceback
        kind = "" if failure.exit_code == EXIT_INTERRUPTED else "error: "
        print(f"kvscope {args.command}: {kind}{failure.line}", file=sys.stderr)
        return failure.exit_code


if __name__ == "__main__":
    sys.exit(main())
