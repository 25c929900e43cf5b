"""`kvscope run --tp N [--dcp M]`: the run's ranks, one trace each (kvscope.parallel). Not a subcommand: `run` calls
`run_group` when --tp or --dcp asks for more than one rank.

    kvscope run -w sharegpt -n 1000 --tp 8 -o out/tp8.kvtrace      -> out/tp8.rank0.kvtrace .. out/tp8.rank7.kvtrace

NAME.kvtrace itself is not written: `kvscope report out/tp8` (or out/tp8.kvtrace) finds the rank files.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvscope.engine.api import RunConfig
    from kvscope.parallel.layout import ParallelConfig
    from kvscope.workload import Request


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-GPU (--device sim)")
    g.add_argument(
        "--tp",
        type=int,
        metavar="N",
        help="tensor parallelism: KV heads split (or replicated) over N ranks, one allocator and one trace a rank "
        "(NAME.rank{r}.kvtrace beside -o NAME.kvtrace); --kv-memory is per rank",
    )
    g.add_argument(
        "--dcp",
        type=int,
        metavar="N",
        help="decode context parallelism inside the TP ranks (vLLM's): the N ranks holding copies of a head split "
        "its tokens round-robin (default --tp N when --tp is not given)",
    )


def run_group(
    args: argparse.Namespace,
    cfg: RunConfig,
    par: ParallelConfig,
    out: str,
    requests: list[Request],
    description: dict[str, Any],
) -> int:
    import sys
    from shlex import quote

    from kvscope.commands.outputs import check_output, named_os_error
    from kvscope.parallel.files import rank_paths, stem_of
    from kvscope.parallel.run import record_group
    from kvscope.units import format_bytes

    paths = rank_paths(out, par.world_size)
    for p in paths:
        check_output(p, "-o", make_parents=True)
    try:
        result = record_group(requests, cfg, par, path=out, workload=description, progress=not args.quiet)
    except KeyboardInterrupt:
        written = [str(p) for p in paths if p.exists()]
        if written:
            print(f"kvscope run: interrupted; the traces so far are in {written[0]} .. (they load as cut off)",
                  file=sys.stderr)  # fmt: skip
        else:
            print("kvscope run: interrupted before the traces were started", file=sys.stderr)
        return 130
    except OSError as e:
        raise named_os_error(e, out) from None
    s, lay = result.stats, result.layout
    clock = f"{s.clock_s:.2f} s simulated"
    mode = f"TP {lay.tp}" + (f" x DCP {lay.dcp}" if lay.dcp > 1 else "")
    caps = result.capacity_tokens
    slots = f"{min(caps):,}" if len(set(caps)) == 1 else f"{min(caps):,}..{max(caps):,}"
    peaks = result.peak_used
    mean = sum(peaks) / len(peaks) if peaks else 0
    imbalance = f"{100 * (max(peaks) / mean - 1):.2f}%" if mean > 0 else "0%"
    print(f"traces: {paths[0]} .. {paths[-1]} ({lay.world_size} ranks; {out} itself is not written)")
    print(
        f"{cfg.allocator} on {cfg.device} ({result.metas[0]['model']}, {mode}: {lay.kv_heads_per_rank} of "
        f"{lay.model.num_kv_heads} KV heads a rank, duplication {lay.duplication}x): {s.steps:,} steps, "
        f"{s.finished_requests:,}/{s.requests:,} requests finished"
        + (f", {s.rejected_requests:,} rejected" if s.rejected_requests else "")
        + (f", {s.preemptions:,} preemptions" if s.preemptions else "")
        + f"; token slots a rank {slots}, the group holds {result.capacity_tokens_total:,} tokens; peak used a rank "
        f"{format_bytes(min(peaks))}..{format_bytes(max(peaks))} (imbalance {imbalance}); "
        f"{s.events:,} events, {clock}, wall {s.wall_s:.2f} s"
    )
    stem = str(stem_of(out))
    print(f"next: kvscope report {quote(stem)} -o {quote(stem + '.html')}   (or: kvscope summary {quote(stem)})")
    return 0
