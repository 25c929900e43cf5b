"""User errors and how each ends a command: the bottom of the stack, so that any layer can raise them and nothing
below the CLI imports the CLI.

A user error is a mistake in what the user asked for (an option, a file, a value) and prints as one line naming the
problem. `describe(exc)` says whether an exception is one, with its line and exit code; the CLI, the notebook magic
and the dashboard all use it, so a mistake reads the same on every surface.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILED = 1  # the run failed for a reason that is not the user's input (out of memory despite the checks)
EXIT_USAGE = 2  # a user error: bad option, file or value
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, exit code 2."""


@dataclass(frozen=True)
class Failure:
    """How an exception ends a command: the one line to print and the exit code."""

    line: str
    exit_code: int


def one_line(text: str) -> str:
    """Messages from libraries (pyarrow, json) may span lines; stderr gets exactly one."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def os_error_line(e: OSError) -> str:
    """'PATH: reason' for an OSError: the path it names first, then its reason, without '[Errno 13]' noise."""
    reason = e.strerror or one_line(str(e)) or type(e).__name__
    if e.filename is None:
        return reason
    names = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return f"{names}: {reason}"


def describe(exc: BaseException) -> Failure | None:
    """The Failure a user-facing exception stands for, or None for a bug (which should show its traceback).

    ValueError covers bad sizes, bad presets, bad workload lines and unreadable traces (TraceError is one): every one
    carries its own one-line message. OSError covers unwritable, missing or full paths."""
    if isinstance(exc, KeyboardInterrupt):
        return Failure("interrupted", EXIT_INTERRUPTED)
    if isinstance(exc, (UserError, ValueError)):
        return Failure(one_line(str(exc)), EXIT_USAGE)
    if isinstance(exc, OSError):
        return Failure(os_error_line(exc), EXIT_USAGE)
    if isinstance(exc, MemoryError):
        return Failure("out of memory; use a smaller --kv-memory or workload", EXIT_FAILED)
    return None
