"""The cuda executor. On any machine it runs on CPU tensors: batch building, kernel dispatch per allocator, SDPA on
the same memory, the VMM mapper thread, all checked against reference attention on the same K/V (`check`), with
kvscope.kernels.reference (fast) and once with the Triton kernels in the interpreter. On a GPU (@pytest.mark.gpu)
the real thing: bf16 weights, CUDA VMM memory, NVML, clean teardown."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kvscope.alloc.base import Closable
from kvscope.alloc.paged import PagedAllocator
from kvscope.alloc.static import StaticAllocator
from kvscope.alloc.vmm import VMMAllocator
from kvscope.backends.host import HostMemory
from kvscope.engine.base import ExecutorOptions
from kvscope.engine.cuda_executor import CudaExecutor
from kvscope.engine.cuda_options import CudaOptions
from kvscope.engine.engine import Engine
from kvscope.engine.model import LlamaModel
from kvscope.engine.scheduler import SchedulerConfig
from kvscope.events import Kind
from kvscope.recorder import Recorder
from kvscope.spec import get_spec
from kvscope.workload import Request

TINY = get_spec("tiny")
MAX_LEN = 128
REFERENCE = CudaOptions(kernels="reference", check=True)  # plain-torch kernels, every attention call checked


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny tensors: torch's intra-op thread pool only adds contention (7x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def requests(count: int = 5, prompt: int = 9, output: int = 7) -> list[Request]:
    return [
        Request(id=f"r{i}", arrival=0.0, prompt_len=prompt + 11 * i, output_len=output + 5 * i) for i in range(count)
    ]


class ThreadLoggingHost(HostMemory):
    """HostMemory that notes which thread made each map call."""

    def __init__(self) -> None:
        super().__init__()
        self.map_threads: list[str] = []

    def map(self, va, size, handle) -> None:
        self.map_threads.append(threading.current_thread().name)
        super().map(va, size, handle)


def make_allocator(name: str, recorder: Recorder, spec=TINY, *, tokens: int = 400, backend=None, eager: int = 0):
    capacity = tokens * spec.bytes_per_token
    if name == "paged":
        return PagedAllocator(spec, capacity, recorder, block_size=16)
    if name == "static":
        return StaticAllocator(spec, capacity, recorder, max_len=MAX_LEN)
    # Host pages of 4 KiB hold 32 tokens of one tiny layer's K (128-byte rows): growth every 32 tokens.
    return VMMAllocator(
        spec,
        capacity,
        recorder,
        backend=backend or HostMemory(),
        max_batch=8,
        max_len=MAX_LEN,
        page_size=4096,
        eager_pages=eager,
    )


def run(alloc_name: str, *, reqs=None, spec=TINY, tokens: int = 400, backend=None, **extra):
    recorder = Recorder()
    alloc = make_allocator(alloc_name, recorder, spec, tokens=tokens, backend=backend)
    cuda = CudaOptions(**({"kernels": "reference", "check": True} | extra))
    ex = CudaExecutor(spec, alloc, ExecutorOptions(seed=3, cuda=cuda), device="cpu")
    outputs: list[torch.Tensor] = []
    execute = ex.execute

    def recording_execute(plan):
        result = execute(plan)
        if ex.last_logits is not None:
            outputs.append(ex.last_logits.clone())
        return result

    ex.execute = recording_execute
    engine = Engine(reqs or requests(), alloc, ex, recorder, spec, SchedulerConfig(max_len=MAX_LEN, max_batch=8))
    stats = engine.run()
    ex.close()
    return ex, stats, recorder, outputs, alloc


def kinds(recorder: Recorder) -> list[str]:
    return recorder.to_table().column("kind").to_pylist()


# ---- model ----------------------------------------------------------------------------------------------------


def test_the_cuda_and_torch_executors_build_the_same_model():
    """One constructor (kvscope.engine.model.LlamaModel): the same seed gives both executors the same weights."""
    from kvscope.engine.torch_executor import TorchExecutor

    cuda = CudaExecutor(
        TINY, make_allocator("paged", Recorder()), ExecutorOptions(seed=1, cuda=REFERENCE), device="cpu"
    )
    torch_ex = TorchExecutor(TINY, make_allocator("paged", Recorder()), ExecutorOptions(seed=1))
    theirs = LlamaModel(TINY, seed=1)
    try:
        for model in (cuda.model, torch_ex.model):
            for name in ("embed", "final_norm", "lm_head", "inv_freq"):
                assert torch.equal(getattr(model, name), getattr(theirs, name)), name
            for ol, tl in zip(model.layers, theirs.layers, strict=True):
                assert ol.keys() == tl.keys() and all(torch.equal(ol[k], tl[k]) for k in ol)
        other = LlamaModel(TINY, seed=2)
        assert not torch.equal(other.embed, theirs.embed)
    finally:
        cuda.close()
        torch_ex.close()


# ---- every allocator, checked against reference attention on the same memory -----------------------------------------


@pytest.mark.parametrize("alloc_name", ["paged", "static", "vmm"])
def test_runs_every_request_with_correct_attention(alloc_name):
    ex, stats, recorder, outputs, _ = run(alloc_name)
    assert stats.finished_requests == 5 and stats.rejected_requests == 0
    assert stats.generated_tokens == sum(r.output_len for r in requests())
    assert 0.0 <= ex.max_check_error < 1e-4
    assert outputs and all(o.dtype == torch.int64 for o in outputs)
    assert "step_kernel" not in kinds(recorder)  # no CUDA events on the CPU


@pytest.mark.parametrize("alloc_name", ["static", "vmm"])
def test_sdpa_on_the_same_memory_matches_the_kernels(alloc_name):
    _, _, _, kernel_out, _ = run(alloc_name)
    ex, stats, _, sdpa_out, _ = run(alloc_name, attention="sdpa")
    assert stats.finished_requests == 5
    assert ex.max_check_error < 1e-4
    assert len(kernel_out) == len(sdpa_out)
    assert all(torch.equal(a, b) for a, b in zip(kernel_out, sdpa_out, strict=True))


def test_prefix_chunks_and_forks_reach_the_kernels_right():
    # n=2 samples fork; a long prompt with a small token budget prefills in chunks (context > 0 for later chunks).
    reqs = [
        Request(id="a", arrival=0.0, prompt_len=40, output_len=6, n=2),
        Request(id="b", arrival=0.0, prompt_len=13, output_len=9),
    ]
    for alloc_name in ("paged", "static", "vmm"):
        recorder = Recorder()
        alloc = make_allocator(alloc_name, recorder)
        ex = CudaExecutor(TINY, alloc, ExecutorOptions(cuda=REFERENCE), device="cpu")
        config = SchedulerConfig(max_len=MAX_LEN, max_batch=8, max_tokens_per_step=16, chunked_prefill=True)
        stats = Engine(reqs, alloc, ex, recorder, TINY, config).run()
        ex.close()
        assert stats.finished_sequences == 3, alloc_name
        assert "fork" in kinds(recorder)
        assert ex.max_check_error < 1e-4, alloc_name


def test_bad_options_are_one_line_errors():
    recorder = Recorder()
    with pytest.raises(ValueError, match="--attention sdpa: needs contiguous"):
        CudaExecutor(
            TINY, make_allocator("paged", recorder), ExecutorOptions(cuda=CudaOptions(attention="sdpa")), device="cpu"
        )
    with pytest.raises(ValueError, match="--attention flash"):
        CudaOptions(attention="flash")
    with pytest.raises(ValueError, match="kernels 'cutlass'"):
        CudaOptions(kernels="cutlass")


# ---- the VMM mapper thread ------------------------------------------------------------------------------------------


def test_background_mapping_moves_decode_growth_off_the_engine_thread():
    reqs = requests(count=4, prompt=20, output=40)  # decodes cross 32-token page boundaries
    off_backend, on_backend = ThreadLoggingHost(), ThreadLoggingHost()
    _, _, _, out_off, _ = run("vmm", reqs=reqs, backend=off_backend, background_map=False)
    ex, stats, _, out_on, _ = run("vmm", reqs=reqs, backend=on_backend, background_map=True)
    assert stats.finished_requests == 4
    assert "kvscope-mapper" not in " ".join(off_backend.map_threads)
    on_mapper = sum(name.startswith("kvscope-mapper") for name in on_backend.map_threads)
    on_engine = len(on_backend.map_threads) - on_mapper
    assert on_mapper > 0 and ex.mapping.ahead_groups > 0
    assert on_engine < len(off_backend.map_threads)  # only admissions are left on the critical path
    # The same tokens through the same weights: mapping ahead changed where pages were mapped, not the numbers.
    assert len(out_on) == len(out_off)
    assert all(torch.equal(a, b) for a, b in zip(out_on, out_off, strict=True))
    assert ex.max_check_error < 1e-4


def test_mapper_never_records_an_oom_for_a_guess():
    emitted_by: list[tuple[str, int]] = []

    class ThreadRecorder(Recorder):
        def emit(self, kind, *args, **kwargs):
            emitted_by.append((threading.current_thread().name, int(kind)))
            super().emit(kind, *args, **kwargs)

    recorder = ThreadRecorder()
    # Memory for ~3 sequences' worth of pages: decodes compete and the scheduler preempts.
    alloc = make_allocator("vmm", recorder, tokens=120)
    ex = CudaExecutor(TINY, alloc, ExecutorOptions(cuda=REFERENCE), device="cpu")
    reqs = requests(count=6, prompt=20, output=40)
    stats = Engine(reqs, alloc, ex, recorder, TINY, SchedulerConfig(max_len=MAX_LEN, max_batch=8)).run()
    ex.close()
    assert stats.preemptions > 0  # the pressure this test is about really happened
    mapper_kinds = {k for name, k in emitted_by if name.startswith("kvscope-mapper")}
    assert Kind.PAGE_MAP in mapper_kinds
    assert Kind.OOM not in mapper_kinds
    assert ex.mapping.ahead_skipped >= 0 and stats.finished_requests + stats.rejected_requests == 6


# ---- the Triton kernels themselves (interpreted on the CPU) ---------------------------------------------------------


@pytest.mark.parametrize("alloc_name", ["paged", "static", "vmm"])
def test_triton_kernels_in_each_layout(alloc_name):
    from kvscope.kernels import INTERPRETED

    if torch.cuda.is_available():
        pytest.skip("covered by the GPU tests on this machine")
    assert INTERPRETED, "conftest sets TRITON_INTERPRET on machines without a GPU"
    reqs = [  # a prompt over a 16-token block boundary, a short one, decodes crossing the next boundary
        Request(id="a", arrival=0.0, prompt_len=20, output_len=14),
        Request(id="b", arrival=0.0, prompt_len=5, output_len=4),
    ]
    ex, stats, _, _, _ = run(alloc_name, reqs=reqs, spec=TINY.with_layers(1), kernels="triton")
    assert stats.finished_requests == 2
    assert 0.0 <= ex.max_check_error < 1e-4


# ---- the GPU ------------------------------------------------------------------------------------------------------


def gpu_run(
    alloc_name: str, attention: str = "triton", *, layers: int = 2, background: bool = True, mega: bool = False
):
    from kvscope.backends.cuda_vmm import CudaMemory

    spec = get_spec("llama-3-8b", layers)
    recorder = Recorder()
    capacity = 2048 * spec.bytes_per_token
    backend = None
    if alloc_name == "paged":
        alloc = PagedAllocator(spec, capacity, recorder, block_size=16)
    elif alloc_name == "static":
        alloc = StaticAllocator(spec, capacity, recorder, max_len=512)
    else:
        backend = CudaMemory()
        # megacache rows hold every layer: 256 tokens per 2 MiB page here, so decodes cross page boundaries
        alloc = VMMAllocator(spec, 64 << 20, recorder, backend=backend, max_batch=8, max_len=512, megacache=mega)
    ex = CudaExecutor(spec, alloc, ExecutorOptions(cuda=CudaOptions(attention, background, check=True)))
    reqs = [Request(id=f"r{i}", arrival=0.0, prompt_len=50 + 37 * i, output_len=20 + 3 * i) for i in range(6)]
    stats = Engine(reqs, alloc, ex, recorder, spec, SchedulerConfig(max_len=512, max_batch=8)).run()
    ex.close()
    if isinstance(alloc, Closable):
        alloc.close()
    if backend is not None:
        backend.close()
    return ex, stats, recorder, backend


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("alloc_name", "attention"), [("paged", "triton"), ("static", "triton"), ("vmm", "triton"), ("vmm", "sdpa")]
)
def test_gpu_forward_passes_are_correct_and_timed(alloc_name, attention):
    ex, stats, recorder, backend = gpu_run(alloc_name, attention)
    assert stats.finished_requests == 6
    assert ex.max_check_error < 2e-2
    table = recorder.to_table().to_pydict()
    kernel_ns = [d for k, d in zip(table["kind"], table["dur_ns"], strict=True) if k == "step_kernel"]
    assert len(kernel_ns) == stats.steps and min(kernel_ns) > 0
    if backend is not None:
        assert backend.leaked == {"reservations": 0, "handles": 0, "mappings": 0}


@pytest.mark.gpu
def test_gpu_background_mapping_and_nvml_samples():
    ex, stats, recorder, backend = gpu_run("vmm", background=True, mega=True)
    assert stats.finished_requests == 6
    assert ex.mapping.ahead_driver_ns > 0  # the mapper really called the driver
    table = recorder.to_table().to_pydict()
    nvml = [b for k, b in zip(table["kind"], table["bytes"], strict=True) if k == "mem_nvml"]
    assert nvml and min(nvml) > 0
    assert ex.memory["nvml_used_ready"] > ex.memory["nvml_used_start"]
    assert np.isfinite(ex.max_check_error)


# ---- the benchmark scripts: their hidden --device cpu (host pages, the tiny model, reference kernels) ----------


def load_benchmark(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"kvscope_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_scripts_say_one_line_without_a_gpu(capsys):
    from kvscope.cudainfo import probe

    if probe().available:
        pytest.skip("this machine has a GPU")
    for name in ("bench_vmm", "bench_e2e"):
        assert load_benchmark(name).main(["--quick", "--out", "/nonexistent/never-written.json"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"{name}: CUDA unavailable")


def test_bench_e2e_plumbing_on_cpu(tmp_path, monkeypatch):
    import json

    from kvscope.engine.executor import EXECUTORS

    monkeypatch.setitem(EXECUTORS, "cpu", EXECUTORS["cpu"])  # the script routes "cpu" to its executor: undo after

    out = tmp_path / "e2e.json"
    bench = load_benchmark("bench_e2e")
    assert bench.main(["--device", "cpu", "--allocators", "static,vmm", "--requests", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"static", "vmm"}
    for name, r in result["runs"].items():
        assert r["finished_requests"] == 3, name
        assert r["max_batch_reached"] >= 1 and r["generated_tokens"] > 0
        assert (tmp_path / f"{name}.kvtrace").exists()
    # what record_run's teardown found still held by the host-page backend: nothing
    assert result["runs"]["vmm"]["vmm_backend_leaked"] == {"reservations": 0, "handles": 0, "mappings": 0}


def test_bench_vmm_plumbing_on_cpu(tmp_path, monkeypatch):
    import json

    from kvscope.engine.executor import EXECUTORS

    monkeypatch.setitem(EXECUTORS, "cpu", EXECUTORS["cpu"])  # the script routes "cpu" to its executor: undo after

    out = tmp_path / "vmm.json"
    bench = load_benchmark("bench_vmm")
    argv = ["--device", "cpu", "--megacache", "--steps", "12", "--repeats", "2", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    calls = result["driver_calls"]["calls"]
    assert {"reserve", "create", "map", "set_access", "unmap", "release"} <= set(calls)
    assert all(calls[op]["n"] > 0 and calls[op]["median_us"] > 0 for op in ("create", "map", "unmap"))
    assert result["leaked"] == {"reservations": 0, "handles": 0}
    modes = result["decode_megacache"]["modes"]
    assert set(modes) == {"premapped", "sync", "background"}
    assert all(m["finished_requests"] == 4 and m["decode_steps"] == 12 for m in modes.values())
    assert all(len(m["runs"]) == 2 and m["decode_map_exposed_ms_per_step"] >= 0 for m in modes.values())
    assert modes["background"]["mapping"]["ahead_groups"] > 0
    assert modes["sync"]["mapping"]["ahead_groups"] == 0
