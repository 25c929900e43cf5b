"""Running a sweep's points: one simulated run each, in a local process pool (the default) or on Ray.

Every run is independent: a worker gets its RunConfig and its workload's requests, records the run in memory,
summarizes the trace with kvscope.analysis.summary.summarize (the numbers every other surface shows) and sends back
one row. The workload of each (workload, seed) pair is generated once, here, and shipped to the workers: they need
no file system in common with this process (a Ray cluster's nodes do not have one), and a run's requests are the
same whichever executor ran it.

Rows come back in completion order and are put back in grid order, so the table does not depend on the executor;
the only columns that differ between two executions of the same grid are the host-clock ones (HOST_CLOCK_COLUMNS).
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from kvscope.errors import UserError, one_line
from kvscope.sweep.grid import SweepPoint, takes
from kvscope.workload import Request

# Measured on the host's clock, so they differ from one execution to the next (everything else is simulated).
HOST_CLOCK_COLUMNS = ("wall_time_s", "driver_ms", "run_wall_s", "run_cpu_s")

Workloads = dict[tuple[str, int], tuple[list[Request], dict[str, Any]]]
Advance = Callable[[dict[str, Any]], None]  # called with each finished row (the progress bar)


def generate_workloads(points: Sequence[SweepPoint], requests: int | None) -> Workloads:
    """The requests of every (workload, seed) pair the points use, generated once (the seed seeds the workload
    generator, as `kvscope run --seed` does)."""
    from kvscope.workload_gen import resolve_workload

    out: Workloads = {}
    for p in points:
        key = (p.workload, p.seed)
        if key not in out:
            out[key] = resolve_workload(p.workload, requests=requests, seed=p.seed)
    return out


def run_point(point: SweepPoint, requests: list[Request], description: dict[str, Any], command: str) -> dict[str, Any]:
    """One run -> its row: the configuration columns, `error` (None, or the one line a run that its allocator
    refused mid-way ended with), the summary's fields, mean_step_s (the run's clock / steps: the latency of last
    resort), run_wall_s and run_cpu_s (host wall and CPU seconds this worker spent on the run and its summary: on a
    shared machine the CPU time is the steadier of the two)."""
    from kvscope.analysis.summary import summarize
    from kvscope.engine.api import record_run

    t0, cpu0 = time.perf_counter(), time.process_time()
    summary: dict[str, Any] = {}
    error = None
    try:
        result = record_run(requests, point.config, workload=description, command=command)
        summary = summarize(result.trace())
    except (UserError, ValueError) as e:  # a user-level refusal: the row says so and the other runs go on
        error = one_line(str(e))
    row = point.columns()
    row["error"] = error
    config = summary.get("allocator_config") or {}
    for key, value in row.items():  # an axis left at the allocator's default: the value the allocator used
        if value is None and key in point.options and key in config and takes(point.config.allocator, key):
            row[key] = config[key]
    for key, value in summary.items():
        if key not in row:  # allocator, model: the same value as the configuration's
            row[key] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
    steps = summary.get("steps") or 0
    row["mean_step_s"] = summary["run_time_s"] / steps if steps else None
    row["run_wall_s"] = time.perf_counter() - t0
    row["run_cpu_s"] = time.process_time() - cpu0
    return row


def run_inline(points: Sequence[SweepPoint], workloads: Workloads, command: str, advance: Advance) -> list[dict]:
    """--jobs 1: the runs one after another in this process (no pool to start; tracebacks stay readable)."""
    rows = []
    for p in points:
        requests, description = workloads[(p.workload, p.seed)]
        rows.append(run_point(p, requests, description, command))
        advance(rows[-1])
    return rows


def run_pool(
    points: Sequence[SweepPoint],
    workloads: Workloads,
    command: str,
    jobs: int,
    advance: Advance,
    started: Callable[[], None] = lambda: None,
) -> list[dict]:
    """The runs in a local pool of `jobs` processes; `started()` is called once every worker exists (the progress
    bar starts then: see _context)."""
    if jobs == 1:
        started()
        return run_inline(points, workloads, command, advance)
    rows: list[dict] = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=_context()) as pool:
        pending: set[Future] = set()
        try:
            for i, p in enumerate(points):
                requests, description = workloads[(p.workload, p.seed)]
                pending.add(pool.submit(run_point, p, requests, description, command))
                if i == 0:
                    started()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    rows.append(future.result())
                    advance(rows[-1])
        except BaseException:  # Ctrl-C or a failed run: drop the queued runs instead of waiting for all of them
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return sorted(rows, key=lambda r: r["run"])


def _context() -> multiprocessing.context.BaseContext:
    """Fork where the OS has it: a spawned worker re-imports the caller's main module, which fails in a user's
    script that lacks an `if __name__ == "__main__":` guard, and spends a second importing kvscope. Forking is safe
    here because a fork pool starts all its workers at the first submit, before the progress bar's thread exists
    (a child forked while another thread holds a lock can hang)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _check_reachable(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that does not answer is one line within seconds: Ray itself retries an
    unreachable head for minutes, ignoring SIGTERM meanwhile. 'auto' and other forms are left to Ray."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"--ray {address}: cannot reach {host}:{port} ({reason})") from None


def run_ray(
    points: Sequence[SweepPoint],
    workloads: Workloads,
    command: str,
    address: str | None,
    jobs: int | None,
    advance: Advance,
    timeout_s: float | None = None,
) -> list[dict]:
    """The runs as Ray tasks. address None: start a local Ray instance with `jobs` CPUs (Ray's default, every CPU,
    when None) and stop it at the end; otherwise connect to that cluster ('auto': the one this machine belongs to),
    whose nodes need kvscope installed. Each workload goes into Ray's object store once, not once per run.
    `timeout_s` bounds the whole sweep (TimeoutError past it)."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'kvscope[ray]' (or pip install ray)") from None
    started = not ray.is_initialized()
    if started:
        if address is not None:
            _check_reachable(address)
        try:
            if address is None:
                ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except ConnectionError as e:
            raise UserError(f"--ray {address}: cannot connect ({one_line(str(e))})") from None
    try:
        remote = ray.remote(num_cpus=1)(run_point)
        refs = {key: ray.put(requests) for key, (requests, _) in workloads.items()}
        pending = []
        for p in points:
            ref = refs[(p.workload, p.seed)]
            pending.append(remote.remote(p, ref, workloads[(p.workload, p.seed)][1], command))
        rows: list[dict] = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while pending:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            done, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not done:
                for task in pending:
                    ray.cancel(task, force=True)
                raise TimeoutError(f"the Ray sweep did not finish in {timeout_s} s ({len(pending)} runs left)")
            for row in ray.get(done):
                rows.append(row)
                advance(row)
    finally:
        if started:
            ray.shutdown()
    return sorted(rows, key=lambda r: r["run"])
