"""Shared state of a dashboard session: loading (and caching) traces, uploads, the sidebar, small display helpers.

Traces are cached per server process with st.cache_resource, keyed by path + mtime + size (a re-recorded file is
reloaded) or by the SHA-256 of an upload's bytes. The cached object is the Trace itself, shared by every session:
analysis results memoise inside it, so moving a slider recomputes only what depends on the step. A trace with a
digest (kvscope.digest) opens from it, so the first page draws without reading any event; the events are read on a
background thread once that page is drawn (read_events_later), for the step views.
Pages never compute numbers: they call kvscope.analysis and draw with kvscope.viz, like the report and the notebook.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
from kvscope.app.sources import MAX_UPLOAD_BYTES, TRACE_SUFFIX, sample_runs_dirs, startup_trace_paths

from kvscope.analysis import memory
from kvscope.present import tables
from kvscope.present.rows import meta_rows
from kvscope.present.views import View, start_step
from kvscope.trace import Trace, TraceError, TruncatedTraceWarning, load_trace

TRACES_KEY = "kvscope_traces"  # session_state: list[LoadedTrace] for this run of the script
FOCUS_KEY = "kvscope_focus"  # session_state: key of the trace the single-trace pages show


@dataclass(frozen=True)
class LoadedTrace:
    key: str  # unique within the session: "path:<resolved path>" or "upload:<sha256>"
    name: str  # what the user sees: file name without the suffix
    trace: Trace
    warning: str | None = None  # e.g. the cut-off trace warning
    source: str = "file"  # file | upload
    version: str = ""  # which contents of `key`: "<mtime_ns>:<size>" for a file (an upload's key is its digest)

    @property
    def cache_id(self) -> str:
        """Names these contents: results cached under it are recomputed when the file is re-recorded."""
        return f"{self.key}@{self.version}"

    @property
    def title(self) -> str:
        label = self.trace.label
        return self.name if label == self.name else f"{self.name} ({label})"


def _load_quietly(path: Path) -> tuple[Trace, str | None]:
    """load_trace, with its cut-off warning returned as text for the page instead of printed on the server."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncatedTraceWarning)
        trace = load_trace(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, TruncatedTraceWarning)]
    return trace, (messages[0] if messages else None)


# Traces opened before any page asked (kvscope.app.serve opens the command line's while the server starts), by
# (resolved path, mtime_ns, size): the first _load_path of each takes its result from here.
_PRELOADED: dict[tuple[str, int, int], Future[tuple[Trace, str | None]]] = {}
_PRELOAD_LOCK = threading.Lock()


def preload(paths: list[Path]) -> None:
    """Open these trace files now, for the first page to find them open (files only; errors are left for the
    page to meet and report)."""
    for path in paths:
        try:
            st_ = path.stat()
        except OSError:
            continue
        if not path.is_file():
            continue
        key = (str(path.resolve()), st_.st_mtime_ns, st_.st_size)
        future: Future[tuple[Trace, str | None]] = Future()
        with _PRELOAD_LOCK:
            if key in _PRELOADED:
                continue
            _PRELOADED[key] = future
        try:
            future.set_result(_load_quietly(path))
        except Exception as e:  # noqa: BLE001 (handed to the page, which loads again and reports it)
            future.set_exception(e)


# One thread reads the events of traces opened from their digests, after the page that opened them has drawn.
_READER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvscope-events")
_READING: set[int] = set()  # id() of the traces handed to it


def read_events_later(traces: list[LoadedTrace]) -> None:
    """Start reading the events of the traces opened from their digests (kvscope.digest), on a background thread:
    the overview needs only the digest, the step views need the events, so they are read while the user looks at
    the first page. Errors are left for the page that needs the events to meet and report."""
    for lt in traces:
        trace = lt.trace
        if not trace.events_loaded and id(trace) not in _READING:
            _READING.add(id(trace))
            _READER.submit(_read_events, trace)


def _read_events(trace: Trace) -> None:
    from kvscope.analysis.replay.sweep import block_sweep

    try:
        trace.store  # noqa: B018 (reads them: kvscope.trace.DeferredStore, once however many threads ask)
        block_sweep(trace)  # what a step move of a block-addressed trace replays from (cached on the trace)
    except Exception:  # noqa: BLE001, S110
        pass


@st.cache_resource(max_entries=64, show_spinner="Loading trace…")
def _load_path(path: str, mtime_ns: int, size: int) -> tuple[Trace, str | None]:
    # mtime_ns and size are only part of the cache key.
    with _PRELOAD_LOCK:
        pending = _PRELOADED.pop((path, mtime_ns, size), None)
    if pending is not None:
        try:
            return pending.result()
        except Exception:  # noqa: BLE001, S110 (loaded again below: its error is reported as ever)
            pass
    return _load_quietly(Path(path))


@st.cache_resource(max_entries=16, show_spinner="Loading uploaded trace…")
def _load_upload(digest: str, name: str, _data: bytes) -> tuple[Trace, str | None]:
    # The loader reads files; the upload lives in a private temporary directory only while it loads (the whole
    # trace is in memory afterwards). The file keeps the uploaded name, so the trace is named after it.
    safe_name = Path(name).name or f"upload{TRACE_SUFFIX}"
    with tempfile.TemporaryDirectory(prefix="kvscope-upload-") as tmp:
        path = Path(tmp) / safe_name
        path.write_bytes(_data)
        trace, warning = _load_quietly(path)
    return trace, warning


def load_path(path: Path) -> LoadedTrace:
    """A trace file through the cache. Raises TraceError (one line naming the file) for anything unreadable."""
    try:
        st_ = path.stat()
    except OSError:
        raise TraceError(f"{path}: no such file") from None
    trace, warning = _load_path(str(path.resolve()), st_.st_mtime_ns, st_.st_size)
    name = path.name.removesuffix(TRACE_SUFFIX)
    version = f"{st_.st_mtime_ns}:{st_.st_size}"
    return LoadedTrace(f"path:{path.resolve()}", name, trace, warning, "file", version)


def _megabytes(n: int) -> str:
    """Decimal megabytes, the unit of the upload limit (kvscope.app.sources.MAX_UPLOAD_MB): '200 MB', '0.001 MB'."""
    return f"{n / 1e6:,.3g} MB" if n < 1e6 else f"{n / 1e6:,.0f} MB"


def load_upload(name: str, data: bytes) -> LoadedTrace:
    """An uploaded trace through the cache. Raises TraceError for files that are too big or not traces."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise TraceError(
            f"{name}: {_megabytes(len(data))} is over the {_megabytes(MAX_UPLOAD_BYTES)} upload limit; "
            "open big traces by path instead (kvscope dashboard TRACE)"
        )
    digest = hashlib.sha256(data).hexdigest()
    try:
        trace, warning = _load_upload(digest, name, data)
    except TraceError as e:
        # The loader names the temporary file; the user knows the file by the name they uploaded.
        message = str(e)
        problem = message.split(": ", 1)[1] if ": " in message else message
        raise TraceError(f"{name}: {problem}") from None
    return LoadedTrace(f"upload:{digest}", Path(name).name.removesuffix(TRACE_SUFFIX), trace, warning, "upload")


def script_args(main_script: str) -> list[str]:
    """Trace paths given after `--` to `streamlit run main.py -- A B` (sys.argv is then [main.py, A, B]).
    Anything else (e.g. pytest's argv under AppTest) is not ours: ignored."""
    if sys.argv and Path(sys.argv[0]).resolve() == Path(main_script).resolve():
        return sys.argv[1:]
    return []


def load_session_traces(argv: list[str]) -> list[LoadedTrace]:
    """Render the sidebar (trace picker and uploader) and return every trace this session can show. Unreadable
    files and rejected uploads are reported with st.error and left out; the app keeps running."""
    paths, origin = startup_trace_paths(argv)
    loaded: list[LoadedTrace] = []
    for path in paths:
        try:
            loaded.append(load_path(path))
        except TraceError as e:
            st.error(str(e), icon="⚠️")

    with st.sidebar:
        st.markdown("### Traces")
        if paths:
            st.caption(f"{len(paths)} from {origin}")
        uploads = st.file_uploader(
            f"Add traces ({TRACE_SUFFIX}, at most {_megabytes(MAX_UPLOAD_BYTES)} each)",
            accept_multiple_files=True,
            key="kvscope_upload",
            help="Files stay in this server's memory for this session; nothing is written to your traces.",
        )
    for up in uploads or []:
        try:
            loaded.append(load_upload(up.name, up.getvalue()))
        except TraceError as e:
            st.error(f"Upload rejected: {e}", icon="⚠️")

    unique: dict[str, LoadedTrace] = {}
    for lt in loaded:
        unique.setdefault(lt.key, lt)
    traces = list(unique.values())
    for lt in traces:
        if lt.warning:
            st.warning(lt.warning, icon="✂️")
    st.session_state[TRACES_KEY] = traces

    if traces:
        keys = [lt.key for lt in traces]
        titles = display_titles(traces)
        current = st.session_state.get(FOCUS_KEY)
        index = keys.index(current) if current in keys else 0
        with st.sidebar:
            choice = st.selectbox(
                "Trace shown on single-run pages",
                keys,
                index=index,
                format_func=titles.__getitem__,
                key="kvscope_focus_select",
            )
        st.session_state[FOCUS_KEY] = choice
    return traces


FOLLOW_SECONDS = 2.0  # how often a followed trace file is checked for growth


def _file_stamp(lt: LoadedTrace) -> tuple[int, int] | None:
    path = lt.trace.path
    if lt.source != "file" or path is None:
        return None
    try:
        st_ = path.stat()
    except OSError:
        return None
    return st_.st_mtime_ns, st_.st_size


def follow_growing_traces(traces: list[LoadedTrace]) -> None:
    """Opt-in (a sidebar checkbox): every FOLLOW_SECONDS, check whether a trace file changed (a `kvscope listen` or a
    run still writing it) and rerun the app when one did; the cache then reloads it (its key holds mtime and size).
    Only a small fragment reruns on the timer, so an unchanged trace costs a stat() per file."""
    with st.sidebar:
        follow = st.checkbox(
            f"Follow growing traces (checks every {FOLLOW_SECONDS:g} s)",
            key="kvscope_follow",
            help="For traces still being written, e.g. by `kvscope listen`: the pages redraw when the file grows.",
        )
    if not follow:
        return
    seen = {lt.key: _file_stamp(lt) for lt in traces}

    @st.fragment(run_every=FOLLOW_SECONDS)
    def watch() -> None:
        if any(_file_stamp(lt) != seen[lt.key] for lt in traces):
            st.rerun(scope="app")

    with st.sidebar:
        watch()


def display_titles(traces: list[LoadedTrace]) -> dict[str, str]:
    """key -> title, made unique (two files may share a name): widgets identify options by their shown text."""
    titles: dict[str, str] = {}
    for lt in traces:
        title, n = lt.title, 1
        while title in titles.values():
            n += 1
            title = f"{lt.title} [{n}]"
        titles[lt.key] = title
    return titles


def session_traces() -> list[LoadedTrace]:
    return list(st.session_state.get(TRACES_KEY, []))


def focus_trace() -> LoadedTrace | None:
    """The trace single-run pages show; None (after saying why on the page) when nothing is loaded."""
    traces = session_traces()
    if not traces:
        no_traces_message()
        return None
    key = st.session_state.get(FOCUS_KEY)
    for lt in traces:
        if lt.key == key:
            return lt
    return traces[0]


def no_traces_message() -> None:
    where = ", ".join(str(d) for d in sample_runs_dirs())
    st.info(
        "No trace loaded. Record one with `kvscope run --device sim -o run.kvtrace` and open it with "
        "`kvscope dashboard run.kvtrace`, or add one with the uploader in the sidebar. "
        f"(Sample runs are looked for in: {where}.)",
        icon="ℹ️",
    )


_MARKDOWN_SPECIAL = "\\`*_{}[]()#+-.!|<>$~:"


def plain(text: str) -> str:
    """Text (run labels come from traces) for st.markdown, shown as typed: every Markdown, LaTeX ($) and
    Streamlit directive (:color[...]) character is escaped."""
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIAL else ch for ch in str(text))


def show_figure(fig, key: str) -> None:
    """A kvscope figure exactly as the report draws it (kvscope's template, not the Streamlit theme)."""
    st.plotly_chart(fig, theme=None, key=key, config={"displaylogo": False})


def show_view(lt: LoadedTrace, view: View, key: str, step: int | None = None) -> None:
    """A view of the catalog with its caption (at `step` for stepped views), or, when it does not apply to the
    trace, the reason."""
    if not view.applies(lt.trace):
        st.info(view.absent, icon="ℹ️")
        return
    st.caption(view.caption)
    show_figure(view.figure(lt.trace, step), key=key)


@st.cache_resource(max_entries=256, show_spinner=False)
def _steps(cache_id: str, _trace: Trace) -> tuple[int, int, int]:
    # (first, last, start step) of a trace's contents: every step-slider move asks, and each costs a pass over the
    # memory timeline, so they are kept per trace (cache_id names its contents).
    first, last = memory.step_range(_trace)
    return int(first), int(last), int(start_step(_trace))


def step_bounds(lt: LoadedTrace) -> tuple[int, int]:
    """(first, last) recorded step, from the memory timeline; (0, 0) for a trace without steps."""
    first, last, _ = _steps(lt.cache_id, lt.trace)
    return first, last


def step_slider(lt: LoadedTrace, *, label: str, key: str, default: int | None = None) -> int:
    """A step picker for one trace (a slider; a fixed step when the trace has only one). Starts at `default`, else
    where every surface's step picker starts (the peak of reserved memory)."""
    first, last = step_bounds(lt)
    if last <= first:
        st.caption(f"{label}: {first} (the trace has a single step)")
        return first
    value = min(max(_steps(lt.cache_id, lt.trace)[2] if default is None else default, first), last)
    return int(st.slider(label, min_value=first, max_value=last, value=value, key=f"{key}:{lt.key}"))


def summary_frame(traces: list[LoadedTrace]) -> pd.DataFrame:
    """The `kvscope summary` table (same rows, labels and formats): one column per trace."""
    return tables.summary_frame([lt.trace for lt in traces], [lt.name for lt in traces])


def meta_frame(lt: LoadedTrace) -> pd.DataFrame:
    return pd.DataFrame(meta_rows(lt.trace.meta), columns=["field", "value"]).set_index("field")


def memory_at(lt: LoadedTrace, step: int) -> dict[str, Any] | None:
    """The memory timeline's row for `step` (the allocator's books at the end of it), None if not sampled."""
    return memory.memory_at(lt.trace, step)
