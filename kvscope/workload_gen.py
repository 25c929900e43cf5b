"""Synthetic workloads: length distributions (ShareGPT-like, Alpaca-like), Poisson arrivals, shared system prompts,
parallel sampling, beam search and multi-turn conversations. Every generator takes a seed and is deterministic given it.

Lengths are log-normal, with the benchmark filter of vLLM's serving benchmark applied (prompt >= 4, prompt <= 1024,
prompt + output <= 2048). Each sigma is fixed by hand to give a heavy tail; the mus were solved numerically
(`calibrate`) so that the means AFTER the filter match the PagedAttention paper's datasets: ShareGPT prompt ~161 /
output ~338 tokens, Alpaca ~19 / ~58. Re-run `calibrate` if you change a sigma or the filter.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvscope.workload import (
    MAX_ARRIVAL_S,
    MAX_REQUEST_TOKENS,
    MAX_REQUESTS,
    MAX_SAMPLES,
    Request,
    SharedPrefix,
    describe_lengths,
    load_workload,
    sort_by_arrival,
)

MIN_PROMPT = 4
MAX_PROMPT = 1024
MAX_TOTAL = 2048


@dataclass(frozen=True)
class LengthModel:
    """Independent log-normal prompt and output lengths (rounded, >= 1), then vLLM's benchmark filter."""

    name: str
    prompt_mu: float
    prompt_sigma: float
    output_mu: float
    output_sigma: float
    target_prompt_mean: float
    target_output_mean: float

    def draw(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Exactly `count` (prompt_len, output_len) pairs that pass the filter (rejection sampling)."""
        prompts: list[np.ndarray] = []
        outputs: list[np.ndarray] = []
        have = 0
        while have < count:
            batch = max(256, int((count - have) * 1.25))
            p = _round_lengths(rng.lognormal(self.prompt_mu, self.prompt_sigma, batch))
            o = _round_lengths(rng.lognormal(self.output_mu, self.output_sigma, batch))
            keep = benchmark_filter(p, o)
            prompts.append(p[keep])
            outputs.append(o[keep])
            have += int(keep.sum())
        return np.concatenate(prompts)[:count], np.concatenate(outputs)[:count]


def _round_lengths(x: np.ndarray) -> np.ndarray:
    return np.maximum(1, np.rint(np.minimum(x, 1e9))).astype(np.int64)


def benchmark_filter(prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
    """vLLM serving benchmark's ShareGPT filter: True where a request is kept."""
    return (prompt >= MIN_PROMPT) & (prompt <= MAX_PROMPT) & (prompt + output <= MAX_TOTAL)


def calibrate(
    target_prompt_mean: float,
    target_output_mean: float,
    prompt_sigma: float,
    output_sigma: float,
    samples: int = 1_000_000,
    rounds: int = 4,
) -> tuple[float, float]:
    """Solve (prompt_mu, output_mu) so the filtered means hit the targets, on fixed standard-normal draws (common
    random numbers make the filtered mean a smooth, monotone function of each mu). The filter couples the two
    (prompt + output <= 2048), so alternate one-dimensional bisections until both settle."""
    rng = np.random.default_rng(20230901)
    zp, zo = rng.standard_normal(samples), rng.standard_normal(samples)

    def means(mu_p: float, mu_o: float) -> tuple[float, float]:
        p = _round_lengths(np.exp(mu_p + prompt_sigma * zp))
        o = _round_lengths(np.exp(mu_o + output_sigma * zo))
        keep = benchmark_filter(p, o)
        return float(p[keep].mean()), float(o[keep].mean())

    def solve(f, target: float) -> float:
        lo, hi = -2.0, 12.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    mu_p, mu_o = math.log(target_prompt_mean), math.log(target_output_mean)
    for _ in range(rounds):
        mu_p = solve(lambda m, mu_o=mu_o: means(m, mu_o)[0], target_prompt_mean)
        mu_o = solve(lambda m, mu_p=mu_p: means(mu_p, m)[1], target_output_mean)
    return mu_p, mu_o


# Calibrated with calibrate(161, 338, 1.2, 0.9) and calibrate(19, 58, 0.6, 1.0).
LENGTH_MODELS: dict[str, LengthModel] = {
    "sharegpt": LengthModel("sharegpt", 4.5979, 1.2, 5.4986, 0.9, 161.0, 338.0),
    "alpaca": LengthModel("alpaca", 2.7606, 0.6, 3.5630, 1.0, 19.0, 58.0),
}


@dataclass(frozen=True)
class GenParams:
    """What a synthetic workload is made of. `rate` is requests per second (inf: all arrive at t=0); with multi-turn
    conversations, conversations start at rate / turns per second and each later turn arrives an exponential think
    time (mean `think_time` s) after the previous one. A system prompt of `system_prompt_len` tokens, one of
    `system_prompts` distinct ones, is put before the prompt of a `system_prompt_fraction` of requests (of
    conversations: all turns of a conversation use the same one). `max_len` drops requests whose prompt + output
    would exceed it (a conversation ends at its first turn that would)."""

    lengths: str = "sharegpt"
    rate: float = math.inf
    n: int = 1
    beam: int = 1  # beam width K (1: no beam search); takes n = 1
    system_prompt_len: int = 0
    system_prompt_fraction: float = 1.0
    system_prompts: int = 1
    turns: int = 1
    think_time: float = 5.0
    max_len: int | None = None

    def __post_init__(self) -> None:
        if self.lengths not in LENGTH_MODELS:
            raise ValueError(f"lengths: unknown length model {self.lengths!r} (choose from {', '.join(LENGTH_MODELS)})")
        if not self.rate > 0:  # also refuses NaN
            raise ValueError(f"rate: must be > 0 requests/s (inf: all at t=0), got {self.rate}")
        for name in ("n", "beam", "system_prompts", "turns"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        # The same bounds a request file is held to (kvscope.workload), checked before anything is drawn.
        if self.n > MAX_SAMPLES:
            raise ValueError(f"n: must be at most {MAX_SAMPLES:,}, got {self.n}")
        if self.beam > MAX_SAMPLES:
            raise ValueError(f"beam: must be at most {MAX_SAMPLES:,}, got {self.beam}")
        if self.beam > 1 and self.n > 1:
            raise ValueError(f"beam: beam search (width {self.beam}) takes n=1, got n={self.n}")
        if not 0 <= self.system_prompt_len <= MAX_REQUEST_TOKENS - MAX_PROMPT:
            raise ValueError(
                f"system_prompt_len: must be in 0..{MAX_REQUEST_TOKENS - MAX_PROMPT:,}, got {self.system_prompt_len}"
            )
        if not 0.0 <= self.system_prompt_fraction <= 1.0:
            raise ValueError(f"system_prompt_fraction: must be in [0, 1], got {self.system_prompt_fraction}")
        if not 0 <= self.think_time <= MAX_ARRIVAL_S:  # also refuses NaN and inf
            raise ValueError(
                f"think_time: must be a finite number of seconds >= 0 (at most {MAX_ARRIVAL_S:.0e}), "
                f"got {self.think_time}"
            )
        if self.max_len is not None and self.max_len < self.system_prompt_len + MIN_PROMPT + 1:
            raise ValueError(
                f"max_len: {self.max_len} leaves no room for a request "
                f"(system prompt {self.system_prompt_len} + prompt >= {MIN_PROMPT} + output >= 1)"
            )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if math.isinf(self.rate):
            d["rate"] = "inf"  # strict JSON has no Infinity
        return d


# Named workloads: GenParams overrides. Options passed to resolve_workload override these in turn.
NAMED_WORKLOADS: dict[str, dict[str, Any]] = {
    "sharegpt": {"lengths": "sharegpt"},
    "alpaca": {"lengths": "alpaca"},
    "shared-prefix": {"lengths": "sharegpt", "system_prompt_len": 256},
    "parallel": {"lengths": "alpaca", "n": 4},
    "beam": {"lengths": "alpaca", "beam": 4},
    "multiturn": {"lengths": "sharegpt", "turns": 4, "max_len": 4096},
}


def generate_named(name: str, requests: int, seed: int, **opts: Any) -> tuple[list[Request], dict[str, Any]]:
    """The named workload with `opts` overriding its defaults -> (requests, the parameters used as JSON)."""
    unknown = sorted(set(opts) - set(GenParams.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown workload option (known: {', '.join(GenParams.__dataclass_fields__)})")
    params = GenParams(**{**NAMED_WORKLOADS[name], **opts})
    return generate(params, requests, seed), params.to_json()


def generate(params: GenParams, requests: int, seed: int) -> list[Request]:
    """`requests` requests drawn with numpy's Generator seeded by `seed`, sorted by arrival."""
    if requests < 1:
        raise ValueError(f"requests: must be a positive integer, got {requests}")
    rng = np.random.default_rng(seed)
    model = LENGTH_MODELS[params.lengths]
    max_len = params.max_len if params.max_len is not None else math.inf
    sys_len = params.system_prompt_len
    pool = _LengthPool(model, rng, block=min(max(requests, 256), 65536))

    # Turn lists of each conversation (a single request is a one-turn conversation), in start order.
    convs: list[list[tuple[int, int, float]]] = []  # (prompt_len, output_len, offset from the conversation start)
    conv_prefix: list[SharedPrefix | None] = []
    total, attempts = 0, 0
    while total < requests:
        attempts += 1
        if attempts > 100 * requests + 10_000:
            raise ValueError(f"max_len: {params.max_len} rejects almost every request of the {model.name} distribution")
        prefix = None
        if sys_len and rng.random() < params.system_prompt_fraction:
            prefix = SharedPrefix(f"system-{int(rng.integers(params.system_prompts))}", sys_len)
        turns: list[tuple[int, int, float]] = []
        context, offset = (sys_len if prefix else 0), 0.0
        for k in range(min(params.turns, requests - total)):
            user, output = pool.next()
            prompt = context + user
            if prompt + output > max_len:
                break
            if k:
                offset += float(rng.exponential(params.think_time)) if params.think_time else 0.0
            turns.append((prompt, output, offset))
            context = prompt + output  # the next turn's prompt: this prompt + its answer + new user text
        if not turns:
            continue  # its first turn did not fit max_len: draw another
        convs.append(turns)
        conv_prefix.append(prefix)
        total += len(turns)

    # Poisson process over conversation starts, first one at t=0 (as vLLM's benchmark sends its first request).
    if math.isinf(params.rate):
        starts = np.zeros(len(convs))
    else:
        gaps = rng.exponential(params.turns / params.rate, len(convs))
        starts = np.concatenate([[0.0], np.cumsum(gaps[1:])])

    _check_arrivals(params, starts, convs)
    out: list[Request] = []
    multi = params.turns > 1
    for c, (turns, prefix, start) in enumerate(zip(convs, conv_prefix, starts.tolist(), strict=True)):
        for k, (prompt, output, offset) in enumerate(turns):
            out.append(
                Request(
                    id=f"c{c}-t{k}" if multi else f"r{c}",
                    arrival=round(start + offset, 6),
                    prompt_len=prompt,
                    output_len=output,
                    n=params.n,
                    beam=params.beam,
                    shared_prefix=prefix,
                    conversation=f"c{c}" if multi else None,
                )
            )
    return sort_by_arrival(out)


def _check_arrivals(params: GenParams, starts: np.ndarray, convs: list[list[tuple[int, int, float]]]) -> None:
    """A tiny rate (1e-300) or a huge think time puts arrivals past MAX_ARRIVAL_S: name the option, not the first
    request that Request() would refuse."""
    last_start = float(starts.max()) if len(starts) else 0.0
    if not last_start <= MAX_ARRIVAL_S:
        raise ValueError(
            f"rate: {params.rate} requests/s puts arrivals at {last_start:.3g} s, past the {MAX_ARRIVAL_S:.0e} s limit"
        )
    last = max(start + turns[-1][2] for start, turns in zip(starts.tolist(), convs, strict=True))
    if not last <= MAX_ARRIVAL_S:
        raise ValueError(
            f"think_time: {params.think_time} s puts arrivals at {last:.3g} s, past the {MAX_ARRIVAL_S:.0e} s limit"
        )


class _LengthPool:
    """Hands out filtered (prompt, output) pairs one by one, drawing them from the model in blocks."""

    def __init__(self, model: LengthModel, rng: np.random.Generator, block: int) -> None:
        self.model, self.rng, self.block = model, rng, block
        self.prompts: list[int] = []
        self.outputs: list[int] = []
        self.i = 0

    def next(self) -> tuple[int, int]:
        if self.i == len(self.prompts):
            p, o = self.model.draw(self.rng, self.block)
            self.prompts, self.outputs, self.i = p.tolist(), o.tolist(), 0
        self.i += 1
        return self.prompts[self.i - 1], self.outputs[self.i - 1]


# ---------------------------------------------------------------------------------------------------- named workloads

DEFAULT_REQUESTS = 1000


def resolve_workload(
    name_or_path: str | os.PathLike, requests: int | None = None, seed: int = 0, **opts: Any
) -> tuple[list[Request], dict[str, Any]]:
    """A named synthetic workload (see kvscope.NAMED_WORKLOADS) or a .jsonl file -> (requests,
    description for the trace metadata). Options set to None are ignored, so a CLI can pass all of its flags.
    For a file, `max_len` drops requests longer than it, `requests` keeps the first N by arrival, and generator
    options are refused."""
    opts = {k: v for k, v in opts.items() if v is not None}
    if requests is not None and not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(f"requests: must be an integer in 1..{MAX_REQUESTS:,}, got {requests}")
    name = os.fspath(name_or_path)
    if name in NAMED_WORKLOADS:
        count = DEFAULT_REQUESTS if requests is None else requests
        reqs, params = generate_named(name, count, seed, **opts)
        desc: dict[str, Any] = {"name": name, "source": "generated", "params": params, "seed": seed}
    elif name.endswith(".jsonl") or os.path.exists(name):
        max_len = opts.pop("max_len", None)
        if opts:
            raise ValueError(
                f"workload file {name}: generator options ({', '.join(sorted(opts))}) apply only to named workloads"
            )
        reqs = load_workload(name)
        if max_len is not None:
            reqs = [r for r in reqs if r.prompt_len + r.output_len <= max_len]
            if not reqs:
                raise ValueError(f"max_len: {max_len} drops every request of {name}")
        if requests is not None:
            reqs = reqs[:requests]
        params = {} if max_len is None else {"max_len": max_len}
        desc = {"name": Path(name).name, "source": "file", "path": str(Path(name).resolve()), "params": params}
    else:
        raise ValueError(f"unknown workload {name!r}: use one of {', '.join(NAMED_WORKLOADS)} or a .jsonl file path")
    desc.update(describe_lengths(reqs))
    return reqs, desc
