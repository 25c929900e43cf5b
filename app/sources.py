"""Where the dashboard's traces come from: paths given on the command line, the KVSCOPE_TRACES variable, or the
sample runs shipped with the repository. No streamlit here, so `kvscope dashboard` can check paths before it starts
a server (a bad path is one line on stderr, not a stack trace in a browser tab)."""

from __future__ import annotations

import os
from pathlib import Path

import kvscope
from kvscope.trace import TRACE_SUFFIX

# The one upload limit, in the megabytes of Streamlit's server.maxUploadSize (which `kvscope dashboard` sets from it).
# Streamlit's own checks disagree on what a megabyte is (its browser client counts 10**6 bytes, 2**20 on Windows;
# its server 2**20), so the dashboard enforces the strictest reading itself: 200 MB = 200,000,000 bytes, everywhere.
MAX_UPLOAD_MB = 200
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1_000_000

TRACES_ENV = "KVSCOPE_TRACES"  # os.pathsep-separated trace paths; how tests (and `kvscope dashboard`) pass traces
SAMPLES_ENV = "KVSCOPE_SAMPLE_RUNS"  # overrides where sample runs are looked for (a directory)


def expand_trace_paths(paths: list[str | os.PathLike]) -> list[Path]:
    """Files stay as given; a directory becomes the .kvtrace files under it (sorted). Raises ValueError naming the
    first path that does not exist or a directory that holds no trace."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(path.rglob(f"*{TRACE_SUFFIX}"))
            if not found:
                raise ValueError(f"{path}: directory holds no {TRACE_SUFFIX} file")
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise ValueError(f"{path}: no such file")
    # The same file named twice (or through a directory and by name) is shown once.
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def sample_runs_dirs() -> list[Path]:
    """Candidate sample_runs/ directories: $KVSCOPE_SAMPLE_RUNS, the repository's (next to the kvscope package in
    a checkout or an editable install), then the working directory's."""
    if os.environ.get(SAMPLES_ENV):
        return [Path(os.environ[SAMPLES_ENV])]
    repo = Path(kvscope.__file__).resolve().parent.parent
    candidates = [repo / "sample_runs", Path.cwd() / "sample_runs"]
    unique: list[Path] = []
    for c in candidates:
        if c.resolve() not in [u.resolve() for u in unique]:
            unique.append(c)
    return unique


def sample_run_paths() -> list[Path]:
    """The .kvtrace files in the first sample_runs/ directory that has any (sorted); empty when there is none."""
    for d in sample_runs_dirs():
        if d.is_dir():
            found = sorted(d.rglob(f"*{TRACE_SUFFIX}"))
            if found:
                return found
    return []


def startup_trace_paths(argv: list[str]) -> tuple[list[Path], str]:
    """(paths, where they came from) for a dashboard session: script arguments, then $KVSCOPE_TRACES, then the
    sample runs. Directories become the traces under them; paths that do not exist are kept, so the page reports
    them with the loader's own message."""
    if argv:
        raw, origin = [Path(a) for a in argv], "the command line"
    elif os.environ.get(TRACES_ENV, "").strip():
        raw, origin = [Path(p) for p in os.environ[TRACES_ENV].split(os.pathsep) if p.strip()], f"${TRACES_ENV}"
    else:
        return sample_run_paths(), "the sample runs"
    paths: list[Path] = []
    for p in raw:
        paths.extend(sorted(p.rglob(f"*{TRACE_SUFFIX}")) if p.is_dir() else [p])
    return paths, origin
