"""How a notebook surface emits one figure: a MIME bundle holding the interactive plotly figure, a static PNG of it
and a line of text, so that every frontend shows something and none waits for a browser.

    application/vnd.plotly.v1+json   JupyterLab, VS Code, marimo and nteract draw this, interactive
    image/png                        the static fallback: nbconvert's HTML and the notebook previews of GitHub and
                                     GitLab keep and show it (they do not run plotly.js); Colab shows it too
    text/plain                       a terminal IPython prints this (the figure's title and where to see it drawn)

The bundle is published with display(raw=True), so plotly's renderer machinery is never asked: in a terminal
IPython its default renderer opens a web browser and waits for it, which blocked `%kvscope run` forever.

The PNG is drawn by kaleido (headless Chromium) through one browser kept open for the session, about 0.15 s a
figure after a ~2 s start on the 2-core test machine. It is left out, and said so in the text, when kaleido or a
Chromium is missing, when the frontend is a terminal (nobody would see it), or when KVSCOPE_STATIC_FIGURES=0.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import threading
from typing import Any

import plotly.graph_objects as go

PLOTLY_MIME = "application/vnd.plotly.v1+json"
PNG_MIME = "image/png"
STATIC_ENV = "KVSCOPE_STATIC_FIGURES"  # "0" turns the PNG fallback off
FRONTEND_ENV = "KVSCOPE_FRONTEND"  # "rich" or "text": overrides the detection (an embedded shell, tests)
PNG_SCALE = 1.0  # the figures are sized for a page already; 1x keeps a notebook small (~50 KB a figure)

_lock = threading.Lock()
_server: dict[str, Any] = {"started": False, "failed": None}


def rich_frontend() -> bool:
    """True inside a Jupyter kernel (a frontend that renders MIME bundles: JupyterLab, VS Code, Colab, nbclient);
    False in a terminal IPython or plain Python, where only text reaches the reader."""
    forced = os.environ.get(FRONTEND_ENV, "").strip()
    if forced in ("rich", "text"):
        return forced == "rich"
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency of every notebook surface
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def static_png(fig: go.Figure) -> bytes | None:
    """The figure as PNG bytes, or None when no static renderer is usable here (see the module docstring)."""
    if os.environ.get(STATIC_ENV, "1").strip() == "0":
        return None
    with _lock:
        if _server["failed"] is not None:
            return None
        try:
            import kaleido

            if not _server["started"]:
                kaleido.start_sync_server(silence_warnings=True)  # one Chromium for every figure of the session
                _server["started"] = True
                atexit.register(_stop)
            return fig.to_image(format="png", scale=PNG_SCALE)
        except Exception as e:  # no kaleido, no Chromium, a sandbox without processes: no PNG, said in the text
            _server["failed"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            return None


def static_unavailable() -> str | None:
    """Why static images are not drawn in this session (None while they are, or before the first try)."""
    return _server["failed"]


def _stop() -> None:
    try:
        import kaleido

        kaleido.stop_sync_server(silence_warnings=True)
    except Exception:  # the interpreter is exiting: nothing to report to
        pass


def figure_title(fig: go.Figure) -> str:
    title = fig.layout.title.text if fig.layout.title is not None else None
    return str(title or "figure")


def figure_bundle(fig: go.Figure, *, static: bool | None = None) -> dict[str, Any]:
    """The MIME bundle of a figure: the plotly JSON, a PNG when `static` (default: in a rich frontend) and a
    renderer is usable, and text."""
    static = rich_frontend() if static is None else static
    bundle: dict[str, Any] = {PLOTLY_MIME: json.loads(fig.to_json())}
    png = static_png(fig) if static else None
    if png is not None:
        bundle[PNG_MIME] = base64.b64encode(png).decode("ascii")  # notebooks store images as base64 text
    where = "drawn interactively in a notebook, and by `kvscope report` in a browser"
    bundle["text/plain"] = f"[figure: {figure_title(fig)}; {where}]"
    return bundle


def show_figure(fig: go.Figure, *, static: bool | None = None) -> None:
    """Display a figure on any frontend without blocking (see the module docstring); `static` as figure_bundle's."""
    from IPython.display import display

    display(figure_bundle(fig, static=static), raw=True)
