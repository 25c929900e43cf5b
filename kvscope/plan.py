"""Capacity planning: what KV memory a model leaves on a GPU, and how many tokens and requests it holds.

    p = plan(PlanInputs(model="llama-3-70b", gpu_memory=80 << 30, tp=4))
    p.budget.kv_budget_bytes, [(r.label, r.requests, r.tokens) for r in p.rows], p.assumptions

The arithmetic, per GPU (kvscope.engine.costmodel.ModelCosts gives the weights of every preset in kvscope.spec):
    weights   = parameters x dtype bytes / TP                (every weight split evenly over the TP GPUs)
    reserve   = --reserve (a size, or a share of the GPU; 10% by default) for activations, the CUDA context,
                graphs and allocator slack: stated, not estimated
    KV budget = GPU memory - weights - reserve
    KV bytes per token = 2 (K, V) x layers x KV heads on this GPU x head dim x dtype bytes; KV heads on a GPU are
                heads / TP, or 1 when TP exceeds the heads (then each GPU holds a copy, as vLLM does)
    ideal tokens = KV budget // KV bytes per token           (no allocator could hold more)

What each allocator holds is not a formula here: each configuration (allocator x block or page size) is built
through the allocator registry with the KV budget and filled, on the simulated backend, with requests of `context`
tokens until it refuses one: requests = how many it admitted, tokens = requests x context. So static's reservation
of max_len per request, paged's last partly filled block and vmm's page granularity all show as they are.

Tensor parallelism is planned as one GPU holding every KV head with (heads / heads on a GPU) x the budget, and
page sizes scaled by the same factor: that holds exactly the tokens one GPU's shard holds (block, page and row
counts are the same), so the same allocators and the same sweep answer it. With a workload, a small sweep
(kvscope.sweep) runs it through each configuration and reports the concurrency and tokens it reached.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvscope.alloc import registry
from kvscope.engine.api import make_allocator, make_backend
from kvscope.engine.costmodel import ModelCosts
from kvscope.errors import UserError
from kvscope.recorder import NullRecorder
from kvscope.spec import KVSpec, get_spec
from kvscope.sweep.grid import SweepGrid, SweepPoint, option_axis, takes
from kvscope.units import format_bytes, parse_size

DEFAULT_RESERVE = "10%"
DEFAULT_BLOCK_SIZES = (16, 32)
DEFAULT_PAGE_SIZES = (2 << 20,)  # stock drivers' CUDA VMM granularity
DEFAULT_OPTIONS = {"block_size": DEFAULT_BLOCK_SIZES, "page_size": DEFAULT_PAGE_SIZES}
MAX_TP = 1024


@dataclass(frozen=True)
class PlanInputs:
    model: str
    gpu_memory: int
    tp: int = 1
    reserve: str = DEFAULT_RESERVE  # a size ('8GiB') or a share of the GPU memory ('10%')
    max_len: int = 2048
    context: int | None = None  # tokens each request holds; None: max_len (every request at its longest)
    allocators: tuple[str, ...] | None = None  # None: every registered allocator
    # {RunConfig field: values} of the option axes; None: DEFAULT_OPTIONS for the allocators that take them
    options: dict[str, tuple[Any, ...]] | None = None
    workload: str | None = None
    requests: int = 200
    seed: int = 0
    max_batch: int = 256  # the engine's cap in the workload sweep

    @property
    def context_tokens(self) -> int:
        return self.context if self.context is not None else self.max_len


@dataclass(frozen=True)
class Budget:
    model: str
    dtype: str
    tp: int
    gpu_memory_bytes: int
    params: int
    weight_bytes: int  # the whole model
    weight_bytes_per_gpu: int
    reserve_bytes: int
    reserve_rule: str
    kv_budget_bytes: int  # per GPU
    kv_heads: int
    kv_heads_per_gpu: int
    kv_bytes_per_token: int  # the whole model
    kv_bytes_per_token_per_gpu: int
    ideal_tokens: int

    @property
    def scale(self) -> int:
        """How many GPUs' shards one whole-model token spans: KV heads / KV heads on one GPU."""
        return self.kv_heads // self.kv_heads_per_gpu


@dataclass(frozen=True)
class CapacityRow:
    allocator: str
    label: str
    options: dict[str, Any]  # as the user gave them (page sizes per GPU, not scaled)
    requests: int  # of `context` tokens each, held at once
    tokens: int  # requests x context
    share_of_ideal: float
    workload: dict[str, Any] | None = None  # from the sweep, when a workload is given


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    budget: Budget
    rows: list[CapacityRow]
    assumptions: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": dataclasses.asdict(self.inputs) | {"context": self.inputs.context_tokens},
            "budget": dataclasses.asdict(self.budget),
            "allocators": [dataclasses.asdict(r) for r in self.rows],
            "assumptions": self.assumptions,
        }


def parse_reserve(text: str, gpu_memory: int) -> tuple[int, str]:
    """'10%' -> (10% of gpu_memory, '10% of GPU memory'); '8GiB' -> (8 GiB, '8 GiB'); ValueError otherwise."""
    raw = str(text).strip()
    if raw.endswith("%"):
        try:
            share = float(raw[:-1])
        except ValueError:
            raise ValueError(f"--reserve {text}: not a percentage") from None
        if not 0 <= share < 100:
            raise ValueError(f"--reserve {text}: must be in 0%..100%")
        return int(gpu_memory * share / 100), f"{raw} of GPU memory"
    try:
        value = parse_size(raw)
    except ValueError as e:
        raise ValueError(f"--reserve: {e}") from None
    return value, format_bytes(value)


def kv_heads_per_gpu(spec: KVSpec, tp: int) -> int:
    """KV heads one GPU holds at tensor parallelism `tp`: heads / tp, or 1 (a copy) when tp is a multiple of the
    heads; anything else cannot be split (vLLM refuses it too)."""
    if not 1 <= tp <= MAX_TP:
        raise UserError(f"--tp: must be an integer in 1..{MAX_TP}, got {tp}")
    if spec.q_heads % tp:
        raise UserError(f"--tp {tp}: {spec.name}'s {spec.q_heads} query heads do not split over {tp} GPUs")
    if spec.num_kv_heads % tp == 0:
        return spec.num_kv_heads // tp
    if tp % spec.num_kv_heads == 0:
        return 1
    raise UserError(f"--tp {tp}: {spec.name}'s {spec.num_kv_heads} KV heads do not split over {tp} GPUs")


def budget(model: str, gpu_memory: int, tp: int = 1, reserve: str = DEFAULT_RESERVE) -> Budget:
    """The per-GPU arithmetic of the module docstring; UserError when the weights and the reserve leave nothing."""
    spec = get_spec(model)
    if gpu_memory < 1:
        raise UserError(f"--gpu-memory: must be positive, got {gpu_memory}")
    heads = kv_heads_per_gpu(spec, tp)
    costs = ModelCosts.from_spec(spec)
    weights_gpu = -(-costs.weight_bytes // tp)
    reserve_bytes, rule = parse_reserve(reserve, gpu_memory)
    kv = gpu_memory - weights_gpu - reserve_bytes
    if kv <= 0:
        hint = _smallest_tp(spec, costs, gpu_memory, reserve)
        raise UserError(
            f"{spec.name} at --tp {tp} does not fit {format_bytes(gpu_memory)}: weights {format_bytes(weights_gpu)} "
            f"+ reserve {format_bytes(reserve_bytes)} per GPU leave no KV memory"
            + (f"; --tp {hint} leaves some" if hint else "")
        )
    per_token_gpu = 2 * spec.num_layers * heads * spec.head_dim * spec.dtype_bytes
    return Budget(
        model=spec.name,
        dtype=spec.dtype,
        tp=tp,
        gpu_memory_bytes=gpu_memory,
        params=costs.params,
        weight_bytes=costs.weight_bytes,
        weight_bytes_per_gpu=weights_gpu,
        reserve_bytes=reserve_bytes,
        reserve_rule=rule,
        kv_budget_bytes=kv,
        kv_heads=spec.num_kv_heads,
        kv_heads_per_gpu=heads,
        kv_bytes_per_token=spec.bytes_per_token,
        kv_bytes_per_token_per_gpu=per_token_gpu,
        ideal_tokens=kv // per_token_gpu,
    )


def _smallest_tp(spec: KVSpec, costs: ModelCosts, gpu_memory: int, reserve: str) -> int | None:
    reserve_bytes, _ = parse_reserve(reserve, gpu_memory)
    for tp in (2**i for i in range(1, 11)):
        try:
            kv_heads_per_gpu(spec, tp)
        except UserError:
            continue
        if gpu_memory - -(-costs.weight_bytes // tp) - reserve_bytes > 0:
            return tp
    return None


def plan(inputs: PlanInputs, *, progress: bool = False) -> Plan:
    if inputs.context_tokens < 1 or inputs.context_tokens > inputs.max_len:
        raise UserError(f"--context: must be in 1..--max-len ({inputs.max_len}), got {inputs.context_tokens}")
    b = budget(inputs.model, inputs.gpu_memory, inputs.tp, inputs.reserve)
    grid = _grid(inputs, b)
    points = grid.points()
    rows = [_probe(p, b, inputs) for p in points]
    if inputs.workload is not None:
        rows = _with_workload(rows, grid, b, progress)
    return Plan(inputs, b, rows, assumptions(inputs, b))


def _grid(inputs: PlanInputs, b: Budget) -> SweepGrid:
    """The configurations, in the whole-model form of the module docstring (budget and page sizes x b.scale)."""
    allocators = inputs.allocators if inputs.allocators is not None else registry.names()
    if inputs.options is None:  # the defaults, for the allocators that take them
        options = {k: v for k, v in DEFAULT_OPTIONS.items() if any(takes(a, k) for a in allocators)}
    else:  # as given: an axis no chosen allocator takes is the grid's one-line error
        options = dict(inputs.options)
    scaled = {
        k: tuple(v * b.scale for v in values) if k == "page_size" else tuple(values) for k, values in options.items()
    }
    return SweepGrid(
        allocators=tuple(allocators),
        workloads=(inputs.workload or "sharegpt",),
        kv_memory=(b.kv_budget_bytes * b.scale,),
        seeds=(inputs.seed,),
        options=scaled,
        requests=inputs.requests,
        base={"model": inputs.model, "max_len": inputs.max_len, "max_batch": inputs.max_batch},
    )


def _label(point: SweepPoint, b: Budget) -> tuple[str, dict[str, Any]]:
    given = {k: v for k, v in point.options.items() if v is not None}
    shown = {k: (v // b.scale if k == "page_size" else v) for k, v in given.items()}
    parts = [" ".join(filter(None, (option_axis(k).short, _fmt(k, v)))) for k, v in shown.items()]
    return " ".join([point.config.allocator, *parts]), shown


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return format_bytes(value) if key == "page_size" else str(value)


def _probe(point: SweepPoint, b: Budget, inputs: PlanInputs) -> CapacityRow:
    """Fill the allocator with requests of `context` tokens until it refuses one (module docstring)."""
    context = inputs.context_tokens
    bound = b.ideal_tokens // context + 1  # no allocator can hold more requests than this
    cfg = dataclasses.replace(point.config, max_batch=bound)  # the memory, not the engine's cap, is the limit here
    backend = make_backend("sim") if registry.get(cfg.allocator).needs_backend else None
    allocator = make_allocator(cfg, cfg.spec(), NullRecorder(), backend)
    tokens = np.zeros(context, dtype=np.int32)
    held = 0
    try:
        while held < bound and allocator.can_admit(context, context):
            allocator.admit(held, tokens, context)
            if not allocator.can_append(held, context):
                allocator.free(held)
                break
            allocator.append(held, tokens)
            held += 1
    finally:
        close = getattr(allocator, "close", None)
        if callable(close):
            close()
        if backend is not None:
            backend.close()
    label, shown = _label(point, b)
    return CapacityRow(
        allocator=cfg.allocator,
        label=label,
        options=shown,
        requests=held,
        tokens=held * context,
        share_of_ideal=held * context / b.ideal_tokens if b.ideal_tokens else 0.0,
    )


def _with_workload(rows: list[CapacityRow], grid: SweepGrid, b: Budget, progress: bool) -> list[CapacityRow]:
    from kvscope.sweep import run_sweep

    table = run_sweep(grid, progress=progress).table.to_pylist()
    out = []
    for row, run in zip(rows, sorted(table, key=lambda r: r["run"]), strict=True):
        used = run.get("peak_used_bytes")
        result = {
            "error": run.get("error"),
            "requests": run.get("requests"),
            "finished": run.get("finished"),
            "peak_batch": run.get("max_batch"),
            "batch_limited_by": run.get("batch_limited_by"),
            "peak_tokens": used // b.kv_bytes_per_token if isinstance(used, int) else None,
            "preemptions": run.get("preemptions"),
            # The simulated clock is one GPU's roofline: it says nothing about a TP group's speed.
            "tokens_per_s": run.get("tokens_per_s") if b.tp == 1 else None,
            "ttft_p90_s": run.get("ttft_p90_s") if b.tp == 1 else None,
        }
        out.append(dataclasses.replace(row, workload=result))
    return out


def assumptions(inputs: PlanInputs, b: Budget) -> list[str]:
    lines = [
        f"weights: {b.params:,} parameters (kvscope's Llama-shaped count: attention, gated MLP, norms, embeddings "
        f"and an untied LM head) x {b.dtype} bytes"
        + (f", split evenly over {b.tp} GPUs" if b.tp > 1 else "")
        + "; no quantization",
        f"reserve: {b.reserve_rule} per GPU for activations, the CUDA context, graphs and allocator slack "
        "(stated, not estimated; vLLM's default gpu_memory_utilization 0.9 also leaves 10% outside its pool)",
        f"KV: {b.kv_heads_per_gpu} of {b.kv_heads} KV heads per GPU"
        + (" (replicated: TP exceeds the KV heads)" if b.tp > b.kv_heads else ""),
        f"each request holds {inputs.context_tokens:,} tokens (--context; --max-len {inputs.max_len:,} is what "
        "static reserves per request); requests and tokens are what each allocator admitted before refusing one "
        "(memory only: no batch cap)",
    ]
    if inputs.workload is not None:
        lines.append(
            f"workload: {inputs.workload}, {inputs.requests} requests, seed {inputs.seed}, run through each "
            f"configuration on --device sim with --max-batch {inputs.max_batch}; peak batch and peak tokens are "
            "the run's maxima"
            + (
                ""
                if b.tp == 1
                else f"; TP {b.tp} runs as one GPU with {b.scale}x the budget and page size (the same tokens), so "
                "its simulated clock is not a TP clock and tokens/s is left out"
            )
        )
    return lines
