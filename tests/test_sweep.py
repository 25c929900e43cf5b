"""`kvscope sweep`: grid expansion follows the allocator registry, each row is the run's own summary, the process
pool and a local Ray instance give the same table, the Pareto front is the non-dominated set, the page is
self-contained and escaped, and bad grids are one line (exit 2) before any run."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re

import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from kvscope import cli
from kvscope.analysis.summary import summarize
from kvscope.engine.api import RunConfig, record_run
from kvscope.sweep import HOST_CLOCK_COLUMNS, SweepGrid, analysis, read_table, run_sweep, write_table
from kvscope.sweep.page import build_page
from kvscope.workload_gen import resolve_workload

GiB = 1 << 30
# Small enough for a busy 2-core machine: 30 short requests a run.
TINY = dict(allocators=("paged", "vmm"), kv_memory=(1 * GiB,), seeds=(0, 1), requests=30)


@pytest.fixture(autouse=True)
def _only_sweep(monkeypatch):
    # Other subcommands are other people's; building their parsers is not this file's business.
    monkeypatch.setattr(cli, "COMMANDS", {"sweep": cli.COMMANDS["sweep"]})


def comparable(table) -> pd.DataFrame:
    """The table without its host-clock columns (the only ones that may differ between two executions)."""
    df = table.to_pandas() if not isinstance(table, pd.DataFrame) else table
    return df.drop(columns=[c for c in HOST_CLOCK_COLUMNS if c in df.columns])


def test_options_are_crossed_only_with_the_allocators_that_take_them():
    grid = SweepGrid(
        allocators=("paged", "vmm", "static"),
        kv_memory=(1 * GiB, 2 * GiB),
        seeds=(0, 1),
        options={"block_size": (16, 32), "page_size": (2 << 20, 4 << 20)},
    )
    points = grid.points()
    # per KV memory and seed: paged x 2 block sizes + vmm x 2 page sizes + static x 1
    assert len(points) == grid.size() == 2 * (2 + 2 + 1) * 2
    by = {}
    for p in points:
        by.setdefault(p.config.allocator, []).append(p)
    assert {(p.options["block_size"], p.options["page_size"]) for p in by["paged"]} == {(16, None), (32, None)}
    assert {(p.options["block_size"], p.options["page_size"]) for p in by["vmm"]} == {(None, 2 << 20), (None, 4 << 20)}
    assert {(p.options["block_size"], p.options["page_size"]) for p in by["static"]} == {(None, None)}
    # seeds innermost: a configuration's replicates are neighbours
    assert [p.seed for p in points[:4]] == [0, 1, 0, 1]
    assert [p.index for p in points] == list(range(len(points)))


def test_a_row_is_the_runs_own_summary():
    result = run_sweep(SweepGrid(allocators=("paged",), kv_memory=(1 * GiB,), requests=30), jobs=1)
    (row,) = result.table.to_pylist()
    requests, description = resolve_workload("sharegpt", requests=30, seed=0)
    direct = summarize(record_run(requests, RunConfig(allocator="paged", kv_memory=1 * GiB), workload=description)
                       .trace())  # fmt: skip
    for key, value in direct.items():
        if key in HOST_CLOCK_COLUMNS:
            continue
        got = row[key]
        assert (json.loads(got) if isinstance(value, dict) else got) == value, key
    assert row["block_size"] == 16  # not swept: the value the allocator used, from its config
    assert row["page_size"] is None  # not an option of paged
    assert row["error"] is None and row["kv_memory"] == 1 * GiB and row["workload"] == "sharegpt"
    assert row["mean_step_s"] == pytest.approx(direct["run_time_s"] / direct["steps"])


def test_the_process_pool_gives_the_same_table_as_running_inline(tmp_path):
    grid = SweepGrid(**TINY)
    inline = run_sweep(grid, jobs=1)
    pool = run_sweep(grid, jobs=2)
    assert pool.meta["executor"] == "local process pool, 2 workers"
    pd.testing.assert_frame_equal(comparable(inline.table), comparable(pool.table))
    assert len(pool.table) == 4 and pool.failed == 0
    # and the Parquet file holds the same table and the sweep's metadata
    write_table(pool.table, tmp_path / "s.parquet")
    df, meta = read_table(tmp_path / "s.parquet")
    pd.testing.assert_frame_equal(comparable(df), comparable(pool.table))
    assert meta["runs"] == 4 and meta["grid"]["allocator"] == ["paged", "vmm"] and meta["device"] == "sim"


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'kvscope[ray]')")
def test_ray_on_a_local_instance_gives_the_same_table_as_the_process_pool():
    grid = SweepGrid(**TINY)
    pool = run_sweep(grid, jobs=2)
    # One CPU: a bounded local instance on a shared machine; timeout_s stops a hung cluster from hanging CI.
    on_ray = run_sweep(grid, ray="", jobs=1, timeout_s=180)
    assert on_ray.meta["executor"].startswith("ray, local instance")
    pd.testing.assert_frame_equal(comparable(pool.table), comparable(on_ray.table))
    import ray

    assert not ray.is_initialized()  # the instance it started is stopped


def test_the_pareto_front_is_the_non_dominated_set():
    configs = pd.DataFrame(
        {
            "capacity_bytes": [1, 1, 2, 2, 3],
            "tokens_per_s": [10, 8, 20, 20, 20],
            "lat": [5.0, 5.0, 3.0, 4.0, 3.0],
        }
    )
    obj = analysis.Objectives("capacity_bytes", "tokens_per_s", "lat", "latency")
    # row 1 is beaten by row 0 (same memory, less throughput); row 3 by row 2 (same memory and throughput, slower);
    # row 4 by row 2 (more memory for the same); rows 0 and 2 trade memory against throughput.
    assert analysis.pareto_front(configs, obj).tolist() == [True, False, True, False, False]
    configs.loc[0, "lat"] = float("nan")  # a configuration without a latency is never on the front
    assert analysis.pareto_front(configs, obj).tolist() == [False, True, True, False, False]


def test_each_workload_has_its_own_front_and_a_configuration_its_own_colour():
    from kvscope.viz.sweep import pareto_figure, what_if_figure

    configs = pd.DataFrame(
        {
            "workload": ["long", "long", "short"],
            "label": ["paged b16", "vmm 2 MiB", "paged b16"],
            "kv_memory": [1, 1, 1],
            "allocator": ["paged", "vmm", "paged"],
            "capacity_bytes": [1, 1, 1],
            "tokens_per_s": [10.0, 5.0, 100.0],  # short prompts serve far more: not an alternative to the long ones
            "lat": [1.0, 2.0, 0.1],
            "seeds": [1, 1, 1],
        }
    )
    configs["series"] = analysis._series_names(configs, ["workload", "allocator", "kv_memory"])
    assert configs["series"].tolist() == ["paged b16 · long", "vmm 2 MiB · long", "paged b16 · short"]
    obj = analysis.Objectives("capacity_bytes", "tokens_per_s", "lat", "latency")
    marked = analysis.with_front(configs, obj)
    assert marked["front"].tolist() == [True, False, True]
    pareto = pareto_figure(marked, memory="capacity_bytes", throughput="tokens_per_s", latency="lat",
                           latency_title="latency")  # fmt: skip
    curves = what_if_figure(analysis.what_if(marked.assign(max_batch=1, preemptions=0), obj))
    colour = {t.name: t.marker.color for t in pareto.data}
    assert len(set(colour.values())) == 3
    assert all(t.line.color == colour[t.name] for t in curves.data)


def test_the_latency_objective_falls_back_to_the_mean_step_time():
    table = pd.DataFrame({"ttft_p90_s": [None, None], "tpot_p90_s": [None, None], "mean_step_s": [0.1, 0.2]})
    assert analysis.objectives(table).latency == "mean_step_s"
    assert analysis.objectives(table.assign(ttft_p90_s=[1.0, 2.0])).latency == "ttft_p90_s"


def test_configurations_average_seeds_and_the_page_is_self_contained_and_escaped():
    result = run_sweep(SweepGrid(**TINY), jobs=1)
    df = result.table.to_pandas()
    configs = analysis.configurations(df)
    assert len(configs) == 2 and configs["seeds"].tolist() == [2, 2]
    paged = df[df["allocator"] == "paged"]
    assert configs.loc[configs["allocator"] == "paged", "tokens_per_s"].item() == pytest.approx(
        paged["tokens_per_s"].mean()
    )
    hostile = df.assign(workload="<script>alert(1)</script>", label=df["label"] + "<img src=x>")
    page = build_page(hostile, result.meta)
    assert "<script>alert(1)" not in page and "<img src=x>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown, as typed, in the front table
    js = get_plotlyjs()
    assert page.count(js[:300]) == 1 and js[-300:] in page  # plotly.js inline, once: the page opens offline
    rest = page.replace(js, "")  # plotly.js names its own CDN and links; the page around it must fetch nothing
    assert "<script src" not in rest.lower() and not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", rest)
    assert 'id="pareto"' in page and 'id="what-if"' in page


def kvscope(*argv: str) -> int:
    return cli.main(list(argv))


def test_cli_writes_the_table_and_the_page(tmp_path, capsys):
    out = tmp_path / "sw"
    rc = kvscope(
        "sweep", "--requests", "20", "--allocator", "paged,static", "--block-size", "16,32",
        "--kv-memory", "1GiB", "-o", str(out), "-q", "--jobs", "1",
    )  # fmt: skip
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("3 runs in ") and lines[1] == f"table: {out / 'sweep.parquet'}"
    df, meta = read_table(out / "sweep.parquet")
    assert sorted(zip(df["allocator"], df["block_size"].fillna(0).astype(int), strict=True)) == [
        ("paged", 16),
        ("paged", 32),
        ("static", 0),
    ]
    assert (out / "sweep.html").stat().st_size > 1_000_000  # plotly.js is in it


def _has_eviction() -> bool:
    return "eviction" in {f.name for f in dataclasses.fields(RunConfig)}


BAD_GRIDS = [
    (["--allocator", "paged,nope"], "unknown allocator"),
    (["--block-size", "16,,32"], "an empty item"),
    (["--block-size", "16,x"], "--block-size x: not an integer"),
    (["--block-size", "0"], "--block-size 0: must be an integer"),
    (["--seed", "0,1,0"], "0 is given twice"),
    (["--seed", "0,x"], "--seed x: not an integer"),
    (["--seed", "-1"], "--seed -1: must not be negative"),
    (["--allocator", "vmm,static", "--block-size", "16"], "--block-size applies to --allocator paged"),
    (["--allocator", "paged", "--page-size", "2MiB"], "--page-size applies to --allocator vmm"),
    (["--kv-memory", "0"], "--kv-memory 0: must be positive"),
    (["--kv-memory", "4Gb,lots"], "--kv-memory lots: not a size"),
    (["--workload", "nosuch"], "--workload nosuch: unknown workload"),
    (["--allocator", "static", "--static-variant", "huge"], "unknown variant"),
    (["--allocator", "vmm", "--kv-memory", "1MiB"], "--allocator vmm"),
    (["--seed", ",".join(map(str, range(10_001)))], "more than 10,000"),
    (["--jobs", "0"], "--jobs: must be a positive integer"),
    (["--requests", "0"], "--requests: must be a positive integer"),
    (["--model", "gpt-9"], "unknown model preset"),
]
if not _has_eviction():  # the axis exists only once the engine has eviction policies
    BAD_GRIDS.append((["--eviction", "lru"], "no eviction setting"))


@pytest.mark.parametrize(("argv", "message"), BAD_GRIDS, ids=[" ".join(a)[:40] for a, _ in BAD_GRIDS])
def test_bad_grids_are_one_line_errors_before_any_run(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    rc = kvscope("sweep", "--requests", "5", *argv, "-o", str(out), "-q")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("kvscope sweep: error: ") and message in err, err
    assert not out.exists()  # nothing ran, nothing was written


def test_an_output_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert kvscope("sweep", "--requests", "5", "-o", str(f), "-q") == 2
    assert "is a file" in capsys.readouterr().err and f.read_text() == "x"


@pytest.mark.skipif(not _has_eviction(), reason="RunConfig has no eviction field yet (the engine's policies)")
def test_eviction_is_an_axis_once_the_engine_has_it():
    policy = getattr(RunConfig(), "eviction", None) or "lru"
    (point,) = SweepGrid(allocators=("paged",), options={"eviction": (policy,), "prefix_caching": (True,)}).points()
    assert point.config.eviction == policy and point.columns()["eviction"] == policy  # type: ignore[attr-defined]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'kvscope[ray]')")
def test_an_unreachable_ray_cluster_is_one_line_within_seconds(tmp_path, capsys):
    # Ray alone retries an unreachable head for minutes; a closed local port must be refused at once.
    rc = kvscope("sweep", "--requests", "5", "--ray", "127.0.0.1:1", "-o", str(tmp_path / "o"), "-q")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--ray 127.0.0.1:1: cannot reach 127.0.0.1:1" in err, err


def test_ray_missing_is_one_line_naming_the_extra(monkeypatch):
    import sys

    from kvscope.errors import UserError

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without the extra installed
    with pytest.raises(UserError, match=r"pip install 'kvscope\[ray\]'"):
        run_sweep(SweepGrid(allocators=("paged",), kv_memory=(1 * GiB,), requests=5), ray="")
