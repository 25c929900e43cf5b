"""`kvscope run` end to end: sim and cpu runs write loadable traces; user mistakes end with one line and exit 2."""

from __future__ import annotations

import json

import pytest

from kvscope import cli
from kvscope.trace import load_trace


@pytest.fixture(autouse=True)
def _only_run_command(monkeypatch):
    # Other subcommands are built by other people; this file tests `run` alone.
    monkeypatch.setattr(cli, "COMMANDS", {"run": cli.COMMANDS["run"]})


def kvscope(*argv: str) -> int:
    return cli.main(list(argv))


def test_run_sim_writes_a_trace_and_prints_one_result_line(tmp_path, capsys):
    out = tmp_path / "t.kvtrace"
    rc = kvscope("run", "--workload", "sharegpt", "--requests", "40", "--allocator", "paged", "-o", str(out), "-q")
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"trace: {out}"
    assert len(lines) == 3 and "40/40 requests finished" in lines[1] and "peak reserved" in lines[1]
    assert lines[2].startswith(f"next: kvscope report {out}")  # the next useful command
    trace = load_trace(out)
    assert not trace.truncated
    meta = trace.meta
    assert meta["allocator"] == "paged" and meta["device"] == "sim" and meta["model"] == "llama-3-8b"
    assert meta["workload"]["name"] == "sharegpt" and meta["workload"]["requests"] == 40
    assert len(meta["requests"]["seq"]) == 40
    assert meta["engine_config"]["kv_memory"] == 16 << 30  # the default on sim
    assert meta["allocator_config"]["block_size"] == 16
    assert meta["command"].startswith("kvscope") or meta["command"]
    assert (trace.events["kind"] == "finish").sum() == 40


@pytest.mark.parametrize("allocator", ["static", "vmm"])
def test_run_sim_other_allocators(tmp_path, capsys, allocator):
    out = tmp_path / f"{allocator}.kvtrace"
    rc = kvscope("run", "-w", "alpaca", "-n", "30", "-a", allocator, "--kv-memory", "2GiB", "-o", str(out), "-q")
    assert rc == 0
    assert "30/30 requests finished" in capsys.readouterr().out
    assert load_trace(out).meta["allocator"] == allocator


@pytest.mark.parametrize("flags", [[], ["--no-page-sharing"], ["--prefix-caching"]])
def test_run_vmm_sharing_flags_reach_the_allocator(tmp_path, capsys, flags):
    """vmm's sharing switches on the command line: forks share pages unless --no-page-sharing, prompts share a live
    sequence's full pages with --prefix-caching (megacache pages of 16 tokens, so a shared prompt spans several)."""
    from kvscope.analysis.summary import summarize

    out = tmp_path / "v.kvtrace"
    argv = ["-w", "shared-prefix", "-n", "40", "-a", "vmm", "--megacache", "--kv-memory", "4GiB", "-o", str(out), "-q"]
    assert kvscope("run", *argv, *flags) == 0
    trace = load_trace(out)
    config = trace.meta["allocator_config"]
    assert config["page_sharing"] is ("--no-page-sharing" not in flags)
    assert config["prefix_sharing"] is ("--prefix-caching" in flags)
    hits = summarize(trace)["prefix_hit_tokens"]
    assert (hits > 0) is ("--prefix-caching" in flags)


@pytest.mark.parametrize("allocator", ["paged", "static", "vmm"])
def test_run_cpu_from_a_jsonl_file(tmp_path, capsys, allocator):
    wl = tmp_path / "wl.jsonl"
    rows = [
        {"id": "a", "arrival": 0.0, "prompt_len": 12, "output_len": 4},
        {"id": "b", "arrival": 0.0, "prompt_len": 20, "output_len": 3, "n": 2},
        {"id": "c", "arrival": 0.001, "prompt_len": 7, "output_len": 5},
    ]
    wl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cpu.kvtrace"
    extra = ["--page-size", "4KiB"] if allocator == "vmm" else []
    rc = kvscope("run", "-w", str(wl), "-a", allocator, "-d", "cpu", "--kv-memory", "1MiB", "--max-len", "64",
                 "-o", str(out), "-q", "--check", *extra)  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "(tiny)" in capsys.readouterr().out  # --device cpu defaults to the tiny model
    trace = load_trace(out)
    assert trace.meta["device"] == "cpu" and trace.meta["device_name"]
    assert trace.meta["engine_config"]["kv_memory"] == 1 << 20
    assert trace.meta["workload"]["source"] == "file"
    assert (trace.events["kind"] == "finish").sum() == 4  # three requests, one with n=2


def test_run_with_progress_bar_and_cpu_defaults(tmp_path, capsys):
    out = tmp_path / "p.kvtrace"
    assert kvscope("run", "-w", "alpaca", "-n", "20", "-d", "cpu", "-o", str(out)) == 0
    meta = load_trace(out).meta
    assert meta["workload"]["requests"] == 20
    assert meta["model"] == "tiny" and meta["engine_config"]["kv_memory"] == 256 << 20


def test_default_output_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert kvscope("run", "-w", "alpaca", "-n", "5", "-a", "static", "-q") == 0
    assert (tmp_path / "out" / "alpaca-static.kvtrace").is_file()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="checks the message on machines without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    rc = kvscope("run", "-w", "sharegpt", "-n", "5", "-d", "cuda", "-o", str(tmp_path / "c.kvtrace"))
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvscope run: error: --device cuda: ")
    assert not (tmp_path / "c.kvtrace").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["-a", "static", "--prefix-caching"], "--prefix-caching applies to --allocator paged or vmm, not static"),
        (["-a", "paged", "--no-page-sharing"], "--no-page-sharing applies to --allocator vmm, not paged"),
        (["-a", "vmm", "--preemption", "swap"], "--preemption swap applies to --allocator paged"),
        (["-a", "paged", "--megacache"], "--megacache applies to --allocator vmm"),
        (["--kv-memory", "lots"], "--kv-memory: not a size: 'lots'"),
        (["--max-batch", "0"], "--max-batch: must be an integer in 1..2,147,483,647, got 0"),
        (["--model", "gpt-9"], "unknown model preset 'gpt-9'"),
        (["--requests", "0"], "--requests: must be a positive integer"),
        (["-d", "cpu", "--model", "llama-3-8b"], "too much for --device cpu"),
        (["-a", "vmm", "--page-size", "3000"], "page_size=3000 is not a multiple"),
        (["-a", "paged", "-d", "cuda", "--attention", "sdpa"], "--attention sdpa applies to --allocator static or vmm"),
        (["-a", "static", "--attention", "sdpa"], "--attention sdpa applies to --device cuda, not sim"),
        (["-a", "static", "-d", "cuda", "--no-background-map"], "--no-background-map applies to --allocator vmm"),
        (["-a", "vmm", "-d", "cpu", "--no-background-map"], "--no-background-map applies to --device cuda, not cpu"),
    ],
)
def test_user_mistakes_are_one_line(tmp_path, capsys, argv, needle):
    rc = kvscope("run", "-w", "alpaca", "-n", "5", "-o", str(tmp_path / "x.kvtrace"), "-q", *argv)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize(("allocator", "argv"), [("static", ["--attention", "sdpa"]), ("vmm", ["--no-background-map"])])
def test_cuda_options_reach_the_executor_and_the_metadata(tmp_path, capsys, monkeypatch, allocator, argv):
    """--attention / --no-background-map travel RunConfig -> ExecutorOptions.cuda -> the cuda executor, and are
    recorded in engine_config. The cuda device is stood in for by a sim executor that keeps its options."""
    from kvscope.backends.sim import SimMemory
    from kvscope.engine import api, executor

    seen = {}

    def fake_cuda(spec, alloc, options):
        seen["extra"] = options.cuda.to_dict()
        return executor.SimExecutor(spec, alloc, options)

    monkeypatch.setattr(executor, "check_device", lambda device: None)
    monkeypatch.setattr(api, "check_device", lambda device: None)
    monkeypatch.setitem(executor.EXECUTORS, "cuda", fake_cuda)
    monkeypatch.setattr(api, "make_backend", lambda device: SimMemory())
    monkeypatch.setattr("kvscope.runmeta.versions", lambda device: {"python": "3"})
    out = tmp_path / "c.kvtrace"
    opts = ["--kv-memory", "64MiB", "--max-len", "256"] + (["--page-size", "4KiB"] if allocator == "vmm" else [])
    assert (
        kvscope("run", "-w", "alpaca", "-n", "3", "-d", "cuda", "-a", allocator, *opts, *argv, "-o", str(out), "-q")
        == 0
    )
    want = {"attention": "sdpa" if allocator == "static" else "triton", "background_map": False}
    assert seen["extra"] == want
    engine_config = load_trace(out).meta["engine_config"]
    assert {k: engine_config[k] for k in want} == want
    assert engine_config["cuda_graphs"] is True  # decode steps replay CUDA graphs unless --eager


def test_missing_workload_file_is_one_line(tmp_path, capsys):
    rc = kvscope("run", "-w", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "x.kvtrace"))
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jsonl" in err[0]


# ------------------------------------------------------------------------------------------------ issue 7: refusals


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--block-size", "0"], "--block-size: must be an integer in 1..16,777,216, got 0"),  # used to run with 16
        (["-a", "vmm", "--page-size", "0"], "--page-size: must be positive, got 0"),  # used to run with 2 MiB
        (["--model", ""], "--model: empty"),  # used to run llama-3-8b
        (["--layers", "0"], "--layers: must be an integer in 1..1,048,576, got 0"),
        (["--kv-memory", "9" * 400], "--kv-memory: not a size"),
        (["--kv-memory", "99999999TiB"], "--kv-memory: size too large"),
        (["-a", "vmm", "--max-batch", "100000000"], "more than the 128 TiB a process has; use a smaller --max-batch"),
        (["--kv-memory", "7EiB"], "host memory, more than half of the"),
        (["-d", "cpu", "--kv-memory", "7EiB"], "--kv-memory 7EiB on --device cpu needs about 7 EiB of host memory"),
    ],
)
def test_impossible_values_are_refused_not_replaced(tmp_path, capsys, argv, needle):
    out = tmp_path / "x.kvtrace"
    assert kvscope("run", "-w", "alpaca", "-n", "5", "-o", str(out), "-q", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_output_over_the_workload_is_refused_and_the_file_kept(tmp_path, capsys):
    wl = tmp_path / "wl.jsonl"
    wl.write_text(json.dumps({"id": "a", "arrival": 0.0, "prompt_len": 12, "output_len": 4}) + "\n")
    before = wl.read_bytes()
    assert kvscope("run", "-w", str(wl), "-o", str(wl), "-q") == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert wl.read_bytes() == before


def test_a_full_disk_names_the_trace(capsys):
    assert kvscope("run", "-w", "alpaca", "-n", "5", "-o", "/dev/full", "-q") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvscope run: error: /dev/full: writing failed"), err


def test_kv_memory_beyond_the_gpu_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    from kvscope import cudainfo
    from kvscope.engine import executor

    gpu = cudainfo.DeviceInfo(0, "NVIDIA H100 80GB HBM3", 80 << 30, "9.0", "0000:18:00.0")
    monkeypatch.setattr(executor, "check_device", lambda device: None)
    monkeypatch.setattr(cudainfo, "probe", lambda: cudainfo.CudaInfo(True, "", "13.0", (gpu,)))
    out = tmp_path / "g.kvtrace"
    assert kvscope("run", "-w", "alpaca", "-n", "5", "-d", "cuda", "--kv-memory", "1TiB", "-o", str(out), "-q") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvscope run: error: --kv-memory 1TiB: more than the 80 GiB of memory of NVIDIA H100 80GB HBM3; "
                   "use a smaller --kv-memory"]  # fmt: skip
    assert not out.exists()


def test_argparse_mistakes_are_one_line_too(capsys):
    assert kvscope("run", "-w", "alpaca", "--max-batch", "abc") == 2
    assert kvscope("run", "-w", "alpaca", "--kv-memroy", "1GiB") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "kvscope run: error: argument --max-batch: invalid int value: 'abc' (see kvscope run --help)",
        "kvscope run: error: unrecognized arguments: --kv-memroy 1GiB (see kvscope run --help)",
    ]


def test_unwritable_places_are_refused_before_the_run(tmp_path, capsys, monkeypatch):
    # Tests run as root, for whom chmod 0o500 blocks nothing: stand in for the permission check itself.
    from kvscope.commands import outputs

    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    assert kvscope("run", "-w", "alpaca", "-n", "5", "-o", str(tmp_path / "x.kvtrace"), "-q") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kvscope run: error: {tmp_path / 'x.kvtrace'}: cannot create files in {tmp_path}"]
