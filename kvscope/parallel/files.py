"""The files of a parallel run: `-o NAME.kvtrace` with --tp/--dcp writes NAME.rank0.kvtrace .. NAME.rank{N-1}.kvtrace
beside it, one trace a rank, and no NAME.kvtrace (there is no single allocator whose trace it would be).

`expand` turns what a user types after `kvscope report` / `summary` into trace paths: a file that exists is itself;
NAME or NAME.kvtrace that does not exist, with NAME.rank0.kvtrace beside it, is the ranks 0 .. world_size - 1 of that
run (world size from rank 0's metadata). Light: no engine, no pandas.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kvscope.errors import UserError

SUFFIX = ".kvtrace"
_RANK = re.compile(r"\.rank(\d+)$")


def stem_of(path: str | os.PathLike) -> Path:
    """NAME for -o NAME.kvtrace (or NAME)."""
    p = Path(path)
    return p.with_name(p.name.removesuffix(SUFFIX))


def rank_path(path: str | os.PathLike, rank: int) -> Path:
    """NAME.rank{rank}.kvtrace beside -o NAME.kvtrace."""
    stem = stem_of(path)
    return stem.with_name(f"{stem.name}.rank{rank}{SUFFIX}")


def rank_paths(path: str | os.PathLike, world_size: int) -> list[Path]:
    return [rank_path(path, r) for r in range(world_size)]


def rank_of_name(path: str | os.PathLike) -> int | None:
    """r for NAME.rank{r}.kvtrace, else None."""
    m = _RANK.search(Path(path).name.removesuffix(SUFFIX))
    return int(m.group(1)) if m else None


def _world_size(path: Path) -> int:
    import pyarrow as pa

    from kvscope.trace import load_trace, read_meta

    try:  # the schema alone: rank 0's metadata without reading its events
        with pa.OSFile(str(path)) as f:
            meta = read_meta(pa.ipc.open_stream(f).schema, path)
    except (OSError, ValueError, pa.ArrowException):
        meta = load_trace(path, warn=False).meta  # fails with the loader's own one line
    world = meta.get("world_size", 1)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise UserError(f"{path}: metadata world_size should be a positive integer, got {world!r}")
    return world


def expand(args: list[str]) -> list[str]:
    """Trace paths for the command line's arguments (module docstring); UserError for a missing rank."""
    out: list[str] = []
    for arg in args:
        if os.path.exists(arg) or not os.fspath(arg):
            out.append(arg)
            continue
        first = rank_path(arg, 0)
        if not first.is_file():
            out.append(arg)  # missing: the loader says so, naming it
            continue
        ranks = rank_paths(arg, _world_size(first))
        missing = [str(p) for p in ranks if not p.is_file()]
        if missing:
            raise UserError(f"{arg}: rank files missing: {', '.join(missing)} (rank 0 says {len(ranks)} ranks)")
        out.extend(str(p) for p in ranks)
    return out


__all__ = ["SUFFIX", "expand", "rank_of_name", "rank_path", "rank_paths", "stem_of"]
