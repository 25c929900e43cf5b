"""`python -m kvscope.app.serve run main.py ...`: `streamlit run main.py ...` (what `kvscope dashboard` starts), with
the dashboard's modules imported before the server starts and the traces on its command line opened on a background
thread meanwhile, so that the first page a browser asks for waits on neither (about a second of imports on a cold
start, and opening each trace: its digest, when it has one, else every event). The imports come first, on this
thread: importing on two threads at once can meet a module half-initialised.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path


def warm_imports() -> None:
    """Import what the pages import (never raises: the page imports and reports everything again)."""
    try:
        import plotly.graph_objects  # noqa: F401
        from kvscope.app import filters, memo, state  # noqa: F401

        import kvscope.digest  # noqa: F401
    except Exception:  # noqa: BLE001, S110
        pass


def open_traces(paths: list[str]) -> None:
    """Open the traces into the dashboard's cache (kvscope.app.state.preload); never raises."""
    try:
        from kvscope.app import state

        state.preload([Path(p) for p in paths])
    except Exception:  # noqa: BLE001, S110 (the page loads and reports every trace again)
        pass


def trace_args(argv: list[str]) -> list[str]:
    """The trace paths of a `streamlit run main.py [options] -- TRACE ...` command line."""
    return argv[argv.index("--") + 1 :] if "--" in argv else []


def main() -> None:
    warm_imports()
    from streamlit.web import cli

    threading.Thread(target=open_traces, args=(trace_args(sys.argv[1:]),), name="kvscope-open", daemon=True).start()

    sys.argv = ["streamlit", *sys.argv[1:]]
    sys.exit(cli.main(prog_name="streamlit"))


if __name__ == "__main__":
    main()
