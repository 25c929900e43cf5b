"""`kvscope sweep` in Python: a grid of configurations run as independent simulated runs, one table row each.

    from kvscope.sweep import SweepGrid, run_sweep
    grid = SweepGrid(allocators=("paged", "vmm"), kv_memory=(4 << 30, 8 << 30), options={"block_size": (16, 32)})
    result = run_sweep(grid, jobs=2)            # local process pool; ray="" starts a local Ray instance instead
    result.table.to_pandas()                    # one row per run: configuration columns + summarize()'s fields

grid.py expands the axes (which allocator takes which option comes from the allocator registry), runner.py runs the
points (process pool or Ray), table.py writes the Parquet table, analysis.py derives the Pareto front and the
what-if curves from it, page.py writes the figure page (figures from kvscope.viz.sweep).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from kvscope import __version__, runmeta
from kvscope.errors import UserError
from kvscope.sweep.grid import OPTION_AXES, SweepGrid, SweepPoint, parse_list
from kvscope.sweep.runner import HOST_CLOCK_COLUMNS, generate_workloads, run_pool, run_ray
from kvscope.sweep.table import build_table, read_table, write_table


@dataclass
class SweepResult:
    table: pa.Table
    meta: dict[str, Any]

    @property
    def failed(self) -> int:
        """Runs that ended with an error (their row says which)."""
        errors = self.table.column("error").to_pylist() if "error" in self.table.column_names else []
        return sum(e is not None for e in errors)


def default_jobs(runs: int) -> int:
    return max(1, min(os.cpu_count() or 1, runs))


def run_sweep(
    grid: SweepGrid,
    *,
    jobs: int | None = None,
    ray: str | None = None,
    progress: bool = False,
    command: str | None = None,
    timeout_s: float | None = None,
) -> SweepResult:
    """Run every point of `grid`. jobs: processes of the local pool (default: one per CPU, at most one per run);
    ray: None for the local pool, "" to start a local Ray instance (with `jobs` CPUs when given), or a cluster
    address ('auto', 'ray://host:10001'). `timeout_s` bounds a Ray sweep."""
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs: must be a positive integer, got {jobs}")
    points = grid.points()
    command = command if command is not None else runmeta.command_line()
    started = runmeta.start_time()
    t0 = time.perf_counter()
    workloads = generate_workloads(points, grid.requests)
    with _Progress(len(points), enabled=progress) as bar:
        if ray is None:
            workers = min(jobs, len(points)) if jobs else default_jobs(len(points))
            executor = f"local process pool, {workers} worker{'s' if workers > 1 else ''}"
            rows = run_pool(points, workloads, command, workers, bar.advance, started=bar.start)
        else:
            bar.start()
            address = ray or None
            executor = f"ray, local instance ({jobs or 'all'} CPUs)" if address is None else f"ray at {address}"
            rows = run_ray(points, workloads, command, address, jobs, bar.advance, timeout_s=timeout_s)
    meta = {
        "kvscope_version": __version__,
        "grid": grid.axes(),
        "runs": len(points),
        "device": "sim",
        "executor": executor,
        "host_cpus": os.cpu_count(),
        "started": started,
        "wall_s": time.perf_counter() - t0,
        "command": command,
        "host_clock_columns": list(HOST_CLOCK_COLUMNS),
    }
    return SweepResult(build_table(rows, meta), meta)


class _Progress:
    """A rich progress bar on stderr over runs done / runs, with the last run's label; nothing when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        return self

    def start(self) -> None:
        if self.enabled and self._progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]runs"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[last]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._progress.add_task("sweep", total=self.total, last="")
            self._progress.start()

    def advance(self, row: dict[str, Any]) -> None:
        if self._progress is not None:
            last = f"{row.get('label') or row.get('allocator')} {row.get('workload')} seed {row.get('seed')}"
            self._progress.update(self._task, advance=1, last=last)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


__all__ = [
    "HOST_CLOCK_COLUMNS",
    "OPTION_AXES",
    "SweepGrid",
    "SweepPoint",
    "SweepResult",
    "parse_list",
    "read_table",
    "run_sweep",
    "write_table",
]
