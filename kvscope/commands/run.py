"""`kvscope run`: run a workload through an allocator on a device and record a trace.

    kvscope run --workload sharegpt --requests 1000 --allocator paged -o out/paged.kvtrace
    kvscope run --workload my.jsonl --allocator vmm --device cpu --model tiny --kv-memory 64MiB -o vmm.kvtrace

Prints where the trace went and one line of results. Bad options end with one line naming the option (exit 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the engine is a heavy import; commands import only argparse at top level
    from kvscope.engine.api import RunConfig
    from kvscope.workload import Request


class _Lazy:
    """argparse choices looked up when argparse first asks for them (an option given, --help, an error): the parser
    of every `kvscope` command is built at start-up, and the allocator registry imports every allocator."""

    def __init__(self, load: Callable[[], tuple[str, ...]]) -> None:
        self._load = load

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, value: object) -> bool:
        return value in self._load()


def _allocator_names() -> tuple[str, ...]:
    from kvscope.alloc import registry

    return registry.names()


def _attention_modes() -> tuple[str, ...]:
    from kvscope.engine.cuda_options import ATTENTION_MODES

    return ATTENTION_MODES


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows each option's default: "(default: X)" after its help, unless the help already says its default
    or there is none to say (a flag that is off, an option that is unset)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False  # a flag that is off (0 is a default worth saying: --seed)
            or default == argparse.SUPPRESS
            or not action.option_strings
            or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        ):
            return action.help
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def add_parser(p: argparse.ArgumentParser) -> None:
    p.formatter_class = DefaultsHelpFormatter
    w = p.add_argument_group("workload")
    w.add_argument(
        "--workload",
        "-w",
        required=True,
        metavar="NAME|FILE",
        help="a named workload (sharegpt, alpaca, shared-prefix, parallel, multiturn) or a .jsonl file",
    )
    w.add_argument("--requests", "-n", type=int, metavar="N", help="requests to generate (named) or keep (file)")
    w.add_argument("--seed", type=int, default=0, help="seed of the workload generator and the model weights")

    e = p.add_argument_group("engine")
    e.add_argument(
        "--allocator", "-a", choices=_Lazy(_allocator_names), default="paged", help="how the KV cache is allocated"
    )
    e.add_argument(
        "--device",
        "-d",
        choices=("sim", "cpu", "cuda"),
        default="sim",
        help="sim: no compute, simulated clock; cpu: real attention on CPU tensors; cuda: a GPU",
    )
    e.add_argument(
        "--model",
        "-m",
        metavar="PRESET",
        help="model preset (llama-3-8b, llama-2-7b, yi-6b, llama-3-70b, opt-13b, starcoder-15b, tiny); "
        "default llama-3-8b, tiny on --device cpu",
    )
    e.add_argument("--layers", type=int, metavar="N", help="override the preset's number of layers")
    e.add_argument("--kv-memory", metavar="SIZE", help="KV cache memory (default 16GiB; 256MiB on --device cpu)")
    e.add_argument("--max-len", type=int, default=2048, metavar="N", help="longest sequence, prompt + output")
    e.add_argument("--max-batch", type=int, default=256, metavar="N", help="most sequences in a step")
    e.add_argument("--max-tokens-per-step", type=int, default=8192, metavar="N", help="token budget of a step")
    e.add_argument("--chunked-prefill", action="store_true", help="split long prompts across steps")
    e.add_argument(
        "--attention",
        choices=_Lazy(_attention_modes),
        default="triton",
        help="cuda: attention kernels (sdpa: torch SDPA on the contiguous K/V of static and vmm)",
    )
    e.add_argument(
        "--no-background-map",
        action="store_true",
        help="cuda, vmm: map pages on the engine thread only (not ahead, during the forward pass)",
    )
    e.add_argument(
        "--eager",
        action="store_true",
        help="cuda: run decode steps eagerly (default: replay CUDA graphs captured per batch size, paged and static)",
    )
    e.add_argument(
        "--preemption",
        choices=("recompute", "swap"),
        default="recompute",
        help="what happens to a preempted sequence (swap: paged only)",
    )

    a = p.add_argument_group("allocator options")
    a.add_argument("--block-size", type=int, metavar="N", help="paged: tokens per block (default 16)")
    a.add_argument(
        "--prefix-caching",
        action="store_true",
        help="paged: share cached prompt blocks; vmm: map full pages of a live sequence with the same prompt prefix",
    )
    a.add_argument("--swap-space", metavar="SIZE", help="paged with --preemption swap: CPU swap pool (default 4GiB)")
    a.add_argument(
        "--eviction",
        metavar="POLICY",
        help="paged with --prefix-caching: which cached block to evict (lru, fifo, lfu, arc, s3fifo; default vLLM's "
        "LRU)",
    )
    a.add_argument(
        "--cpu-cache",
        metavar="SIZE",
        help="paged with --prefix-caching: a CPU tier that blocks evicted from the GPU go to and return from on a hit",
    )
    a.add_argument("--page-size", metavar="SIZE", help="vmm: physical page size (default 2MiB)")
    a.add_argument("--megacache", action="store_true", help="vmm: one buffer for all layers")
    a.add_argument("--eager-pages", type=int, metavar="N", help="vmm: page-groups mapped ahead of need")
    a.add_argument("--no-deferred-reclaim", action="store_true", help="vmm: unmap a finished request's pages at once")
    a.add_argument(
        "--no-page-sharing", action="store_true", help="vmm: forks copy the parent's rows instead of mapping its pages"
    )
    a.add_argument("--static-variant", choices=("max", "pow2", "oracle"), help="static: reservation size (default max)")

    from kvscope.commands.parallel_run import add_arguments as add_parallel_arguments

    add_parallel_arguments(p)  # --tp, --dcp
    o = p.add_argument_group("output")
    o.add_argument(
        "-o", "--output", metavar="TRACE.kvtrace", help="trace file (default out/<workload>-<allocator>.kvtrace)"
    )
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    o.add_argument("--check", action="store_true", help="check allocator invariants after every step (slow)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    from kvscope.engine.api import RunConfig
    from kvscope.units import parse_size

    check_options(args)

    def size(flag: str, value: str | None) -> int | None:
        if value is None:
            return None
        try:
            return parse_size(value)
        except ValueError as e:
            raise ValueError(f"{flag}: {e}") from None

    cfg = RunConfig(
        allocator=args.allocator,
        device=args.device,
        model=args.model,
        layers=args.layers,
        kv_memory=size("--kv-memory", args.kv_memory),
        max_len=args.max_len,
        max_batch=args.max_batch,
        max_tokens_per_step=args.max_tokens_per_step,
        chunked_prefill=args.chunked_prefill,
        preemption=args.preemption,
        seed=args.seed,
        block_size=args.block_size,
        prefix_caching=args.prefix_caching,
        swap_space=size("--swap-space", args.swap_space),
        eviction=args.eviction,
        cpu_cache=size("--cpu-cache", args.cpu_cache),
        page_size=size("--page-size", args.page_size),
        megacache=args.megacache,
        eager_pages=args.eager_pages,
        deferred_reclaim=not args.no_deferred_reclaim,
        page_sharing=not args.no_page_sharing,
        static_variant=args.static_variant,
        attention=args.attention,
        background_map=not args.no_background_map,
        cuda_graphs=not args.eager,
        check_invariants=args.check,
    )
    # Only the cuda executor reads these; silently ignoring them elsewhere would mislead.
    for flag, given in (
        ("--attention sdpa", args.attention != "triton"),
        ("--no-background-map", not cfg.background_map),
        ("--eager", not cfg.cuda_graphs),
    ):
        if given and cfg.device != "cuda":
            raise ValueError(f"{flag} applies to --device cuda, not {cfg.device}")
    # 0 must not mean "the default" (it used to run with 2 MiB pages): one line here, before any allocator runs.
    if cfg.page_size is not None and cfg.page_size < 1:
        raise ValueError(f"--page-size: must be positive, got {args.page_size}")
    if cfg.cpu_cache is not None and cfg.cpu_cache < 1:
        raise ValueError(f"--cpu-cache: must be positive, got {args.cpu_cache}")
    if cfg.eviction is not None:
        from kvscope.policies.engine import check_engine_policy

        check_engine_policy(cfg.eviction)  # before any workload is generated
    cfg.spec()  # model and --layers, before any workload is generated
    return cfg


def _int_options() -> list[tuple[str, str, int, int]]:
    """(flag, attribute, smallest, largest) of the integer options. The upper bounds are far beyond real use (16 Mi
    tokens is longer than any context), so reaching one is a typo; sizes against memory are the allocators' and
    check_memory's."""
    from kvscope.spec import MAX_DIMENSION
    from kvscope.workload import MAX_REQUEST_TOKENS

    int32_max = 2**31 - 1
    return [
        ("--max-len", "max_len", 1, MAX_REQUEST_TOKENS),
        ("--max-batch", "max_batch", 1, int32_max),
        ("--max-tokens-per-step", "max_tokens_per_step", 1, int32_max),
        ("--block-size", "block_size", 1, MAX_REQUEST_TOKENS),
        ("--eager-pages", "eager_pages", 0, int32_max),
        ("--layers", "layers", 1, MAX_DIMENSION),
        ("--seed", "seed", 0, 2**63 - 1),
    ]


def check_options(args: argparse.Namespace) -> None:
    """One line for an impossible option value, instead of it being replaced by a default (`--block-size 0` used to
    run with 16) or failing deep inside the run."""
    from kvscope.errors import UserError

    for flag, attr, lo, hi in _int_options():
        value = getattr(args, attr, None)
        if value is not None and not lo <= value <= hi:
            raise UserError(f"{flag}: must be an integer in {lo:,}..{hi:,}, got {shown_int(value)}")
    if args.model is not None and not args.model.strip():
        raise UserError("--model: empty; give a preset name (llama-3-8b, tiny, ...)")
    if not args.workload.strip():
        raise UserError("--workload: empty; give a named workload or a .jsonl file")


def check_requests(requests: int | None) -> None:
    """--requests (None: the workload's default): at least one, at most kvscope.workload.MAX_REQUESTS."""
    from kvscope.workload import MAX_REQUESTS

    if requests is not None and not 1 <= requests <= MAX_REQUESTS:
        raise ValueError(
            f"--requests: must be a positive integer (at most {MAX_REQUESTS:,}), got {shown_int(requests)}"
        )


def shown_int(value: int) -> str:
    """An int for an error line: a 400-digit paste is cut to its length."""
    text = str(value)
    return text if len(text) <= 24 else f"{text[:8]}...({len(text)} digits)"


def check_memory(cfg: RunConfig, kv_memory: str | None) -> None:
    """--device cpu keeps the KV cache in host RAM and cuda on the GPU (both keep the swap pool in host RAM): refuse
    sizes that cannot fit before the allocator or torch starts taking them (1TiB on cpu used to fill memory)."""
    from kvscope.errors import UserError
    from kvscope.units import check_host_memory, format_bytes

    if cfg.device == "sim":
        return
    shown = kv_memory or f"{format_bytes(cfg.kv_bytes)} (the default)"
    swap = cfg.swap_bytes() + (cfg.cpu_cache or 0)  # host RAM: the swap pool and the prefix cache's CPU tier
    if cfg.device == "cpu":
        what = f"--kv-memory {shown} on --device cpu" + (f" with {format_bytes(swap)} of CPU pools" if swap else "")
        check_host_memory(cfg.kv_bytes + swap, what, "use a smaller --kv-memory (or --swap-space)")
    elif cfg.device == "cuda":
        check_host_memory(
            swap, f"--swap-space/--cpu-cache {format_bytes(swap)}", "use a smaller --swap-space or --cpu-cache"
        )
        from kvscope.cudainfo import probe

        info = probe()
        if info.available and info.devices and cfg.kv_bytes > info.device().total_bytes:
            gpu = info.device()
            raise UserError(
                f"--kv-memory {shown}: more than the {format_bytes(gpu.total_bytes)} of memory of {gpu.name}; "
                "use a smaller --kv-memory"
            )


def check_workload_memory(requests: list[Request], workload: str) -> None:
    """The scheduler builds the prompt token ids (int32) of every arrived request that fits --max-len, and each
    sample's output ids when it is admitted: refuse a workload whose ids alone cannot fit (a thousand 16M-token
    prompts are 64 GiB) before the run starts building them (counting every request: an upper bound)."""
    from kvscope.units import check_host_memory

    tokens = sum(r.prompt_len + r.n * r.output_len for r in requests)
    check_host_memory(
        4 * tokens,
        f"workload {workload}: the token ids of its {len(requests):,} requests ({tokens:,} tokens)",
        "use fewer or shorter requests (--requests N keeps the first N)",
    )


def output_path(args: argparse.Namespace, allocator: str) -> str:
    """-o, or out/<workload>-<allocator>.kvtrace; checked now, so a bad path fails before the run, not after it."""
    from kvscope.commands.outputs import check_output, input_files

    out = args.output if args.output is not None else default_output(args.workload, allocator)
    check_output(out, "-o", input_files(args.workload), make_parents=True)
    return out


def default_output(workload: str, allocator: str) -> str:
    from pathlib import Path

    stem = Path(workload).name.removesuffix(".jsonl") or "run"
    return f"out/{stem}-{allocator}.kvtrace"


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from kvscope.commands.outputs import named_os_error
    from kvscope.commands.parallel_run import run_group
    from kvscope.engine.api import record_run
    from kvscope.engine.executor import check_device
    from kvscope.parallel.layout import parallel_config
    from kvscope.parallel.run import check_parallel
    from kvscope.units import format_bytes
    from kvscope.workload_gen import resolve_workload

    cfg = config_from_args(args)
    cfg.validate()
    check_device(cfg.device)  # before generating a large workload
    check_memory(cfg, args.kv_memory)
    check_requests(args.requests)
    par = parallel_config(getattr(args, "tp", None), getattr(args, "dcp", None))
    if par.parallel:
        check_parallel(cfg, par)  # before generating a large workload
    out = output_path(args, cfg.allocator)
    requests, description = resolve_workload(args.workload, requests=args.requests, seed=args.seed)
    check_workload_memory(requests, args.workload)
    if par.parallel:
        return run_group(args, cfg, par, out, requests, description)
    try:
        result = record_run(requests, cfg, path=out, workload=description, progress=not args.quiet)
    except KeyboardInterrupt:
        # One line, exit 130 (128 + SIGINT). The engine has already written every event up to the interruption.
        if Path(out).exists():
            print(f"kvscope run: interrupted; the trace so far is in {out} (it loads as cut off)", file=sys.stderr)
        else:
            print("kvscope run: interrupted before the trace was started", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk mid-run fails in the recorder's writes, which name no file
        raise named_os_error(e, out) from None
    s = result.stats
    clock = f"{s.clock_s:.2f} s simulated" if cfg.device == "sim" else f"{s.clock_s:.2f} s measured"
    print(f"trace: {out}")
    print(
        f"{cfg.allocator} on {cfg.device} ({result.meta['model']}): {s.steps:,} steps, "
        f"{s.finished_requests:,}/{s.requests:,} requests finished"
        + (f", {s.rejected_requests:,} rejected" if s.rejected_requests else "")
        + (f", {s.preemptions:,} preemptions" if s.preemptions else "")
        + f", peak reserved {format_bytes(s.peak_reserved_bytes)} / used {format_bytes(s.peak_used_bytes)}, "
        f"{s.events:,} events ({s.events_per_s / 1e3:,.0f}k/s), {clock}, wall {s.wall_s:.2f} s"
    )
    print(next_steps(out))
    return 0


def next_steps(trace: str) -> str:
    """What to do with a fresh trace: the report first (every view, offline), then the table and the dashboard."""
    from pathlib import Path
    from shlex import quote

    html = str(Path(trace).with_suffix(".html"))
    return (
        f"next: kvscope report {quote(trace)} -o {quote(html)}   "
        f"(or: kvscope summary {quote(trace)}; kvscope dashboard {quote(trace)})"
    )
