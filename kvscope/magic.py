"""IPython magics: `%load_ext kvscope`, then

    %kvscope run --workload alpaca --requests 40 --allocator paged --device sim -o paged.kvtrace
    %kvscope show paged.kvtrace              summary table + the report's figures
    %kvscope compare paged.kvtrace vmm.kvtrace
    %kvscope report paged.kvtrace -o report.html
    %kvscope explore paged.kvtrace           the explorer widget: map, tree, timeline on one cursor (kvscope.widgets)

    %%kvscope                                records every kvscope allocator built in the cell, then shows it
    alloc = PagedAllocator(get_spec("llama-3-8b"), 64 << 20, block_size=16)
    ...

`run` and `report` take exactly the options of `kvscope run` / `kvscope report`: their parsers are built by the same
`add_parser` functions, so the magic cannot drift from the CLI. A bad option prints the usage and the error and
returns to the prompt (no SystemExit, no traceback); so does a user mistake the CLI would report in one line.

Line magics return a MagicResult (the trace(s) and paths), so `r = %kvscope run ...` keeps the trace at hand.
This module parses and dispatches; what is shown comes from kvscope.present (the notebook display, the catalog of
views) and the cell's allocators are recorded by kvscope.capture.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import FileLink, display

from kvscope.capture import ALLOCATOR_CLASSES, CELL_COMMAND, capture_allocators, traces_from_captured
from kvscope.commands import lab as lab_cmd
from kvscope.commands import report as report_cmd
from kvscope.commands import run as run_cmd
from kvscope.commands.summary import load_traces
from kvscope.errors import EXIT_INTERRUPTED, describe
from kvscope.present.explorer import TREE_KINDS
from kvscope.present.lab import show_lab
from kvscope.present.notebook import compare_traces, show_allocator_state, show_traces
from kvscope.present.views import VIEWS
from kvscope.trace import Trace
from kvscope.widgets import explore

SUBCOMMANDS = {
    "run": "run a workload through an allocator and record a trace (options of `kvscope run`)",
    "show": "summary table and figures of trace(s)",
    "compare": "compare traces side by side",
    "report": "write a self-contained HTML report (options of `kvscope report`)",
    "explore": "explorer widget: block map, sharing tree and memory timeline on one step cursor",
    "lab": "eviction-policy lab: hit rate per policy and capacity (options of `kvscope lab`)",
}
CELL_HELP = (
    "%%kvscope [--no-show] [--name NAME]: run the cell, recording every kvscope allocator "
    f"({', '.join(cls.name for cls in ALLOCATOR_CLASSES)}) it builds or drives; then show each as a trace. "
    "Allocators built without a recorder get an in-memory one."
)
RUN_VIEWS = ["memory", "blocks", "throughput"]  # what `%kvscope run` shows of its run
CELL_VIEWS = ["memory", "blocks", "sharing"]  # what %%kvscope shows of an engine run recorded in the cell


class UsageError(Exception):
    """A bad magic line: argparse's message, shown with the usage instead of raising SystemExit."""

    def __init__(self, message: str, usage: str, prog: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.prog = prog


class _HelpShown(Exception):
    """--help was given: argparse printed the help; nothing else to do."""


class MagicArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting (an interactive prompt must survive a typo)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage(), self.prog)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message, file=sys.stderr, end="")
        raise _HelpShown()


@dataclass
class MagicResult:
    """What a %kvscope line gives back: the trace(s) it loaded or recorded and any file it wrote."""

    traces: list[Trace] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    explorer: Any = None
    rows: Any = None  # %kvscope lab: the lab's rows (a DataFrame)

    @property
    def trace(self) -> Trace | None:
        return self.traces[0] if self.traces else None

    def __repr__(self) -> str:  # one line: the cell's Out[] must not dump an events DataFrame
        parts = [", ".join(f"{t.label} ({t.name})" for t in self.traces)] if self.traces else []
        if self.paths:
            parts.append(f"files: {', '.join(map(str, self.paths))}")
        return f"<kvscope: {'; '.join(parts) or 'nothing'}>"


# ---- the parser -------------------------------------------------------------------------------------------------
def build_parser() -> MagicArgumentParser:
    parser = MagicArgumentParser(prog="%kvscope", description="kvscope in a notebook.", add_help=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=MagicArgumentParser)
    p = sub.add_parser("run", help=SUBCOMMANDS["run"], description=SUBCOMMANDS["run"])
    run_cmd.add_parser(p)
    p.add_argument("--no-show", action="store_true", help="record only; do not display the summary and figures")
    p = sub.add_parser("show", help=SUBCOMMANDS["show"], description=SUBCOMMANDS["show"])
    p.add_argument("traces", nargs="+", metavar="TRACE")
    p.add_argument("--views", metavar="KEYS", help=f"comma-separated report views: {', '.join(VIEWS)}")
    p = sub.add_parser("compare", help=SUBCOMMANDS["compare"], description=SUBCOMMANDS["compare"])
    p.add_argument("traces", nargs="+", metavar="TRACE")
    p = sub.add_parser("report", help=SUBCOMMANDS["report"], description=SUBCOMMANDS["report"])
    report_cmd.add_parser(p)
    p = sub.add_parser("explore", help=SUBCOMMANDS["explore"], description=SUBCOMMANDS["explore"])
    p.add_argument("trace", metavar="TRACE")
    p.add_argument("--step", type=int, help="start at this step (default: the peak of reserved memory)")
    p.add_argument("--tree", choices=tuple(TREE_KINDS), help="sharing tree (default: the first the run has)")
    p = sub.add_parser("lab", help=SUBCOMMANDS["lab"], description=SUBCOMMANDS["lab"])
    lab_cmd.add_parser(p)
    return parser


def _load(paths: list[str]) -> list[Trace]:
    return load_traces(paths)  # the cut-off warning becomes one stderr line, like the CLI's


def _view_keys(text: str | None) -> list[str] | None:
    """--views a,b -> ['a', 'b'] (None: every view that applies); show_traces refuses a key the catalog lacks."""
    return [k.strip() for k in text.split(",") if k.strip()] if text else None


# ---- the magics ----------------------------------------------------------------------------------------------------
@magics_class
class KVScopeMagics(Magics):
    @line_cell_magic
    def kvscope(self, line: str, cell: str | None = None) -> MagicResult | None:
        """%kvscope COMMAND ... (run, show, compare, report, explore); %%kvscope records a cell. `%kvscope --help`."""
        if cell is not None:
            return self._cell(line, cell)
        try:
            argv = shlex.split(line)
        except ValueError as e:
            print(f"%kvscope: error: {e}", file=sys.stderr)
            return None
        parser = build_parser()
        if not argv:
            parser.print_help()
            return None
        try:
            args = parser.parse_args(argv)
            return self._dispatch(args)
        except _HelpShown:
            return None
        except UsageError as e:
            print(f"{e.usage}{e.prog}: error: {e}", file=sys.stderr)
            return None
        except (KeyboardInterrupt, Exception) as e:
            # Exactly what kvscope.cli.main turns into one line: the magic reports the same mistakes the same way.
            failure = describe(e)
            if failure is None:
                raise
            kind = "" if failure.exit_code == EXIT_INTERRUPTED else "error: "
            print(f"%kvscope {argv[0]}: {kind}{failure.line}", file=sys.stderr)
            return None

    # ---- line commands ---------------------------------------------------------------------------------------
    def _dispatch(self, args: argparse.Namespace) -> MagicResult | None:
        if args.command == "run":
            return self._run(args)
        if args.command == "show":
            traces = _load(args.traces)
            show_traces(traces, views=_view_keys(args.views))
            return MagicResult(traces, [Path(p) for p in args.traces])
        if args.command == "compare":
            traces = _load(args.traces)
            compare_traces(traces)
            return MagicResult(traces, [Path(p) for p in args.traces])
        if args.command == "report":
            report_cmd.run(args)
            display(FileLink(args.output))
            return MagicResult([], [Path(args.output)])
        if args.command == "explore":
            explorer = explore(_load([args.trace])[0], step=args.step, tree=args.tree)
            display(explorer)
            return MagicResult([explorer.trace], [Path(args.trace)], explorer=explorer)
        if args.command == "lab":
            rows = lab_cmd.run_rows(args)
            show_lab(rows)
            return MagicResult([], [Path(args.output)] if args.output else [], rows=rows)
        build_parser().print_help()
        return None

    def _run(self, args: argparse.Namespace) -> MagicResult:
        if args.output is None:
            args.output = run_cmd.default_output(args.workload, args.allocator)
        args.quiet = True  # a rich progress bar in a notebook cell is noise; the magic prints one line at the end
        code = run_cmd.run(args)
        if code != 0:
            return MagicResult([], [Path(args.output)])
        traces = _load([args.output])
        if not args.no_show:
            show_traces(traces, views=RUN_VIEWS)
        return MagicResult(traces, [Path(args.output)])

    # ---- cell --------------------------------------------------------------------------------------------------
    def _cell(self, line: str, cell: str) -> MagicResult | None:
        parser = MagicArgumentParser(prog="%%kvscope", description=CELL_HELP)
        parser.add_argument("--no-show", action="store_true", help="record only; do not display")
        parser.add_argument("--name", help="also store the MagicResult in this notebook variable")
        try:
            opts = parser.parse_args(shlex.split(line))
        except _HelpShown:
            return None
        except UsageError as e:
            print(f"{e.usage}{e.prog}: error: {e}", file=sys.stderr)
            return None
        except ValueError as e:  # shlex: unbalanced quotes
            print(f"%%kvscope: error: {e}", file=sys.stderr)
            return None
        shell = self.shell
        if shell is None:  # a Magics object registered outside an IPython shell
            raise RuntimeError("%%kvscope needs an IPython shell")
        with capture_allocators() as captured:
            outcome = shell.run_cell(cell)
        if not outcome.success:
            return None  # IPython already showed the cell's error
        if not captured:
            print("%%kvscope: the cell built no kvscope allocator; nothing recorded", file=sys.stderr)
            return None
        traces = traces_from_captured(captured)
        result = MagicResult(traces)
        if opts.name:
            shell.user_ns[opts.name] = result
        if not opts.no_show:
            by_hand = [t for t in traces if t.meta.get("command") == CELL_COMMAND]
            engine_runs = [t for t in traces if t.meta.get("command") != CELL_COMMAND]
            if engine_runs:
                show_traces(engine_runs, views=CELL_VIEWS)
            for trace in by_hand:
                show_allocator_state(trace)
        return result


def load_ipython_extension(ipython) -> None:
    """Called by `%load_ext kvscope` (through kvscope.load_ipython_extension)."""
    ipython.register_magics(KVScopeMagics)
