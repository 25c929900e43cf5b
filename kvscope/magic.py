"""IPython magics: `%load_ext kvscope`, then

    %kvscope run --workload alpaca --requests 40 --allocator paged --device sim -o paged.kvtrace
    %kvscope show paged.kvtrace              summary table + the report's figures
    %kvscope compare paged.kvtrace vmm.kvtrace
    %kvscope report paged.kvtrace -o report.html
    %kvscope explore paged.kvtrace           the step-slider widget (kvscope.widgets)

    %%kvscope                                records every kvscope allocator built in the cell, then shows it
    alloc = PagedAllocator(get_spec("llama-3-8b"), 64 << 20, block_size=16)
    ...

`run` and `report` take exactly the options of `kvscope run` / `kvscope report`: their parsers are built by the same
`add_parser` functions, so the magic cannot drift from the CLI. A bad option prints the usage and the error and
returns to the prompt (no SystemExit, no traceback); so does a user mistake the CLI would report in one line.

Line magics return a MagicResult (the trace(s) and paths), so `r = %kvscope run ...` keeps the trace at hand.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from IPython.core.magic import Magics, line_cell_magic, magics_class

from kvscope.trace import Trace

SUBCOMMANDS = {
    "run": "run a workload through an allocator and record a trace (options of `kvscope run`)",
    "show": "summary table and figures of trace(s)",
    "compare": "compare traces side by side",
    "report": "write a self-contained HTML report (options of `kvscope report`)",
    "explore": "step-slider explorer widget for a trace",
}
CELL_COMMAND = "%%kvscope"  # meta['command'] of traces recorded from allocators a cell built without a recorder
CELL_HELP = (
    "%%kvscope [--no-show] [--name NAME]: run the cell, recording every kvscope allocator (static, paged, vmm) it "
    "builds or drives; then show each as a trace. Allocators built without a recorder get an in-memory one."
)


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

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message, self.format_usage(), self.prog)

    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        if message:
            print(message, file=sys.stderr, end="")
        raise _HelpShown()


@dataclass
class MagicResult:
    """What a %kvscope line gives back: the trace(s) it loaded or recorded and any file it wrote."""

    traces: list[Trace] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    explorer: Any = None

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
    from kvscope.commands import report as report_cmd
    from kvscope.commands import run as run_cmd

    parser = MagicArgumentParser(prog="%kvscope", description="kvscope in a notebook.", add_help=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=MagicArgumentParser)
    p = sub.add_parser("run", help=SUBCOMMANDS["run"], description=SUBCOMMANDS["run"])
    run_cmd.add_parser(p)
    p.add_argument("--no-show", action="store_true", help="record only; do not display the summary and figures")
    p = sub.add_parser("show", help=SUBCOMMANDS["show"], description=SUBCOMMANDS["show"])
    p.add_argument("traces", nargs="+", metavar="TRACE")
    p.add_argument("--views", metavar="KEYS", help="comma-separated report views (memory, fragmentation, blocks, ...)")
    p = sub.add_parser("compare", help=SUBCOMMANDS["compare"], description=SUBCOMMANDS["compare"])
    p.add_argument("traces", nargs="+", metavar="TRACE")
    p = sub.add_parser("report", help=SUBCOMMANDS["report"], description=SUBCOMMANDS["report"])
    report_cmd.add_parser(p)
    p = sub.add_parser("explore", help=SUBCOMMANDS["explore"], description=SUBCOMMANDS["explore"])
    p.add_argument("trace", metavar="TRACE")
    p.add_argument("--view", choices=("blocks", "map", "sharing"), default="blocks")
    p.add_argument("--step", type=int, help="start at this step (default: the peak of reserved memory)")
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    # Exactly what kvscope.cli.main turns into one line: the magic reports the same mistakes the same way.
    from kvscope.cli import UserError
    from kvscope.trace import TraceError

    return (UserError, TraceError, ValueError, FileNotFoundError)


# ---- display helpers ----------------------------------------------------------------------------------------------
def _display(*objs: Any) -> None:
    from IPython.display import display

    display(*objs)


def _load(paths: list[str]) -> list[Trace]:
    from kvscope.commands.summary import load_traces

    return load_traces(paths)  # the cut-off warning becomes one stderr line, like the CLI's


def show_traces(traces: list[Trace], *, views: list[str] | None = None) -> None:
    """The summary table, then every report view of each trace (or only `views`, by key)."""
    from IPython.display import HTML, Markdown

    from kvscope.report import run_views
    from kvscope.widgets import summary_frame

    _display(summary_frame(traces))
    for trace in traces:
        if len(traces) > 1:
            _display(HTML(f"<h3>{_escape(trace.label)} — {_escape(trace.name)}</h3>"))
        if trace.truncated:
            _display(Markdown("*This trace is cut off: it shows the run up to its last complete batch.*"))
        for view in run_views(trace):
            if views and view.key not in views:
                continue
            _display(Markdown(f"**{view.title}.** {view.caption}"))
            _display(view.figure if view.figure is not None else Markdown(f"*{view.note}*"))


def show_allocator_state(trace: Trace) -> None:
    """A hand-driven allocator (recorded by %%kvscope: no engine, so no requests or steps): its books at the end of
    the cell and its blocks / pages, plus the sharing graph when blocks are shared."""
    import pandas as pd
    from IPython.display import Markdown

    from kvscope import viz
    from kvscope.analysis.fragmentation import block_states
    from kvscope.analysis.memory import FIELDS, memory_timeline
    from kvscope.analysis.sharing import sharing_edges
    from kvscope.units import format_bytes

    timeline = memory_timeline(trace)
    if timeline.empty:
        _display(Markdown(f"*{_escape(trace.label)}: no memory sample recorded.*"))
        return
    last = timeline.iloc[-1]
    step = int(last["step"])
    books = pd.DataFrame(
        {"bytes": [format_bytes(int(last[f])) for f in FIELDS]},  # the Usage fields, as the timeline holds them
        index=pd.Index(FIELDS, name=f"{trace.label}: allocator's books at the end of the cell"),
    )
    _display(books)
    _display(viz.block_grid_figure(block_states(trace, step), step=step))
    edges = sharing_edges(trace, step)
    if not edges.empty:
        _display(viz.sharing_graph_figure(edges, step=step))


def compare_traces(traces: list[Trace]) -> None:
    from kvscope.analysis.compare import compare_runs
    from kvscope.viz import comparison_figure
    from kvscope.widgets import summary_frame

    _display(summary_frame(traces, [f"{t.label} ({t.name})" for t in traces]))
    _display(comparison_figure(compare_runs(traces)))


def _escape(text: str) -> str:
    import html

    return html.escape(str(text), quote=False)


# ---- %%kvscope: recording allocators built in a cell -----------------------------------------------------------
@dataclass
class Captured:
    allocator: Any
    recorder: Any
    owned: bool  # we gave it an in-memory recorder (it was built without one)


def allocator_classes() -> list[type]:
    from kvscope.alloc.paged import PagedAllocator
    from kvscope.alloc.static import StaticAllocator
    from kvscope.alloc.vmm import VMMAllocator

    return [StaticAllocator, PagedAllocator, VMMAllocator]


def _device_of(allocator: Any) -> str:
    backend = getattr(allocator, "backend", None)
    name = str(getattr(backend, "name", "sim"))
    return {"host": "cpu"}.get(name, name)


@contextlib.contextmanager
def capture_allocators() -> Iterator[list[Captured]]:
    """While active, every kvscope allocator constructed is recorded: one built without a recorder gets an
    in-memory Recorder (at step 0: the whole cell is one step); one built with a recorder (the engine's, or the
    user's) is remembered with it. Explicit NullRecorders are respected (not recorded).

    The hook wraps the allocator classes' __init__ for the duration of the block (restored on exit, even on error),
    so allocators need no notebook-specific code."""
    from kvscope.recorder import NullRecorder, Recorder

    captured: list[Captured] = []
    constructing: set[int] = set()  # allocators inside a wrapped __init__ right now (ids are reused after GC)
    originals: dict[type, Any] = {}

    def wrap(cls: type, original: Any) -> Any:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if id(self) in constructing:  # a wrapped class calling another's __init__ via super(): handled outside
                return original(self, *args, **kwargs)
            constructing.add(id(self))
            try:
                bound = signature.bind(self, *args, **kwargs)
                owned = bound.arguments.get("recorder") is None
                if owned:
                    spec = bound.arguments.get("spec")
                    meta = {"allocator": cls.name, "command": CELL_COMMAND}
                    if spec is not None:
                        meta |= {"model": spec.name, "spec": spec.to_dict()}
                    recorder = Recorder(None, meta)
                    recorder.step = 0
                    bound.arguments["recorder"] = recorder
                original(*bound.args, **bound.kwargs)
            finally:
                constructing.discard(id(self))
            rec = self.recorder
            if owned:
                rec.meta.update({"allocator_config": self.config(), "device": _device_of(self)})
            if not isinstance(rec, NullRecorder):
                captured.append(Captured(self, rec, owned))

        return __init__

    try:
        for cls in allocator_classes():
            originals[cls] = cls.__dict__["__init__"]
            cls.__init__ = wrap(cls, originals[cls])  # type: ignore[method-assign]
        yield captured
    finally:
        for cls, original in originals.items():
            cls.__init__ = original  # type: ignore[method-assign]


def traces_from_captured(captured: list[Captured]) -> list[Trace]:
    """One trace per distinct recorder. Recorders we own get the allocator's books as a final sample (there was no
    engine to emit them) and are closed; files are read back; in-memory recorders are converted as they are."""
    import warnings

    from kvscope.alloc.base import emit_usage
    from kvscope.trace import TruncatedTraceWarning, load_trace, trace_from_recorder

    traces: list[Trace] = []
    done: set[int] = set()
    for c in captured:
        rec = c.recorder
        if id(rec) in done:
            continue
        done.add(id(rec))
        if c.owned:
            if not getattr(rec, "_closed", False):
                emit_usage(rec, c.allocator.usage())
                rec.close(steps=rec.step + 1)
            traces.append(trace_from_recorder(rec))
        elif getattr(rec, "path", None) is not None:
            rec.flush()  # a run still open is read up to here (it loads as cut off)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TruncatedTraceWarning)
                traces.append(load_trace(rec.path))
        else:
            traces.append(trace_from_recorder(rec))
    return traces


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
        except _user_errors() as e:
            print(f"%kvscope {argv[0]}: error: {e}", file=sys.stderr)
            return None
        except KeyboardInterrupt:
            print(f"%kvscope {argv[0]}: interrupted", file=sys.stderr)
            return None

    # ---- line commands ---------------------------------------------------------------------------------------
    def _dispatch(self, args: argparse.Namespace) -> MagicResult | None:
        if args.command == "run":
            return self._run(args)
        if args.command == "show":
            traces = _load(args.traces)
            views = [v.strip() for v in args.views.split(",") if v.strip()] if args.views else None
            show_traces(traces, views=views)
            return MagicResult(traces, [Path(p) for p in args.traces])
        if args.command == "compare":
            traces = _load(args.traces)
            compare_traces(traces)
            return MagicResult(traces, [Path(p) for p in args.traces])
        if args.command == "report":
            from IPython.display import FileLink

            from kvscope.commands import report as report_cmd

            report_cmd.run(args)
            _display(FileLink(args.output))
            return MagicResult([], [Path(args.output)])
        if args.command == "explore":
            from kvscope.widgets import explore

            explorer = explore(_load([args.trace])[0], view=args.view, step=args.step)
            _display(explorer)
            return MagicResult([explorer.trace], [Path(args.trace)], explorer=explorer)
        build_parser().print_help()
        return None

    def _run(self, args: argparse.Namespace) -> MagicResult:
        from kvscope.commands import run as run_cmd

        if args.output is None:
            args.output = run_cmd.default_output(args.workload, args.allocator)
        args.quiet = True  # a rich progress bar in a notebook cell is noise; the magic prints one line at the end
        code = run_cmd.run(args)
        if code != 0:
            return MagicResult([], [Path(args.output)])
        traces = _load([args.output])
        if not args.no_show:
            show_traces(traces, views=["memory", "blocks", "throughput"])
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
        with capture_allocators() as captured:
            outcome = self.shell.run_cell(cell)
        if not outcome.success:
            return None  # IPython already showed the cell's error
        if not captured:
            print("%%kvscope: the cell built no kvscope allocator; nothing recorded", file=sys.stderr)
            return None
        traces = traces_from_captured(captured)
        result = MagicResult(traces)
        if opts.name:
            self.shell.user_ns[opts.name] = result
        if not opts.no_show:
            by_hand = [t for t in traces if t.meta.get("command") == CELL_COMMAND]
            engine_runs = [t for t in traces if t.meta.get("command") != CELL_COMMAND]
            if engine_runs:
                show_traces(engine_runs, views=["memory", "blocks", "sharing"])
            for trace in by_hand:
                show_allocator_state(trace)
        return result


def load_ipython_extension(ipython) -> None:
    """Called by `%load_ext kvscope` (through kvscope.load_ipython_extension)."""
    ipython.register_magics(KVScopeMagics)
