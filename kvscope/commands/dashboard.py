"""`kvscope dashboard [TRACE ...] [--port N]`: the Streamlit dashboard on the given traces (or the sample runs).

It runs `python -m kvscope.app.serve run <kvscope.app main.py> -- TRACE ...` (streamlit's own command line, with the
pages' modules imported before the server starts and the traces opened meanwhile) in a child process, with usage
statistics off (the dashboard works offline) and uploads capped at kvscope.app.sources.MAX_UPLOAD_MB (200 MB, the one
limit the page enforces too). Paths are checked here first, so a typo is one line on stderr instead of a server that
starts and shows nothing.
"""

from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "traces",
        nargs="*",
        metavar="TRACE",
        help="trace files or directories of them (default: the repository's sample_runs/)",
    )
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default: %(default)s)")
    p.add_argument(
        "--address", default="localhost", help="address to bind (default: %(default)s; 0.0.0.0 for every interface)"
    )
    p.add_argument("--no-browser", action="store_true", help="do not open a browser tab (headless server)")


def streamlit_command(args: argparse.Namespace, python: str) -> list[str]:
    """The child command line (kept apart from run() so tests can check it without starting a server)."""
    from pathlib import Path

    import kvscope.app
    from kvscope.app.sources import MAX_UPLOAD_MB

    main = Path(kvscope.app.__file__).resolve().parent / "main.py"
    cmd = [
        python,
        "-m",
        "kvscope.app.serve",  # `streamlit`, with the pages' imports and the traces' opening started meanwhile
        "run",
        str(main),
        "--server.port",
        str(args.port),
        "--server.address",
        args.address,
        "--server.headless",
        "true" if args.no_browser else "false",
        "--server.maxUploadSize",
        str(MAX_UPLOAD_MB),
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--theme.base",
        "light",
        "--client.toolbarMode",
        "viewer",  # no "Deploy" button: this is a local viewer
    ]
    if args.traces:
        cmd += ["--", *[str(Path(t).resolve()) for t in args.traces]]
    return cmd


def run(args: argparse.Namespace) -> int:
    import subprocess
    import sys

    from kvscope.app.sources import expand_trace_paths, sample_run_paths
    from kvscope.errors import UserError

    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: must be between 1 and 65535")
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise UserError("the dashboard needs streamlit: pip install streamlit") from None
    # Directories expand to their traces; a missing path is refused here with one line.
    args.traces = [str(p) for p in expand_trace_paths(args.traces)] if args.traces else []
    if not args.traces and not sample_run_paths():
        print("kvscope dashboard: no trace given and no sample runs found; upload traces in the page", file=sys.stderr)
    cmd = streamlit_command(args, sys.executable)
    print(f"kvscope dashboard: http://{args.address}:{args.port}  (Ctrl-C stops it)", file=sys.stderr)
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0
