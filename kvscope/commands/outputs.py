"""Output paths of the commands: checked before any work, so a bad `-o` is one line naming the path, never a
traceback after a long run, and never a file written over one of the command's inputs.

Not a subcommand (kvscope.cli.COMMANDS lists those); `run`, `workload`, `report`, `export` and `demo` use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def check_output(
    path: str | os.PathLike, flag: str, inputs: Iterable[str | os.PathLike] = (), *, make_parents: bool = False
) -> Path:
    """The output `path` (of option `flag`) as a Path, or UserError: empty, a directory, under something that is not
    a directory, in a missing directory (unless `make_parents`), or the same file as one of `inputs`."""
    from kvscope.errors import UserError

    if not os.fspath(path):
        raise UserError(f"{flag}: empty path; give a file name")
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{out}: is a directory; {flag} needs a file name")
    for given in inputs:
        if _same_file(out, Path(given)):
            raise UserError(f"{out}: is also an input ({given}); refusing to overwrite it, give another {flag}")
    parent = _nearest_existing(out.parent)
    if not parent.is_dir():
        raise UserError(f"{out}: {parent} is not a directory")
    if parent != out.parent and not make_parents:
        raise UserError(f"{out.parent}: no such directory (for {flag} {out})")
    # Permissions up front, so a long run does not end in "Permission denied" (root passes these; then the open
    # itself fails, quickly, and kvscope.cli prints that OSError as one line).
    if out.exists() and not os.access(out, os.W_OK):
        raise UserError(f"{out}: not writable")
    if not out.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{out}: cannot create files in {parent}")
    return out


def _same_file(a: Path, b: Path) -> bool:
    # samefile sees through symlinks, hard links and ./x vs x; a path that does not exist yet cannot be an input.
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (what mkdir -p would start from)."""
    path = path if str(path) else Path(".")
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def input_files(*candidates: str | os.PathLike | None) -> list[str]:
    """The candidates that are existing files: a workload argument may be a name (sharegpt) or a file."""
    return [os.fspath(c) for c in candidates if c and os.path.isfile(c)]


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Give OSErrors raised while writing `path` its name (see named_os_error)."""
    try:
        yield
    except OSError as e:
        raise named_os_error(e, path) from None


def named_os_error(e: OSError, path: str | os.PathLike) -> OSError:
    """`e`, or when it names no file, the same error naming `path`: a full disk (ENOSPC) fails in write() or close(),
    whose errors carry no file name, and "[Errno 28] No space left on device" alone does not say which output."""
    if getattr(e, "filename", None) is not None or isinstance(e, BrokenPipeError):
        return e
    reason = e.strerror or (str(e).splitlines()[0] if str(e) else type(e).__name__)
    return OSError(e.errno, f"writing failed: {reason}", os.fspath(path))
