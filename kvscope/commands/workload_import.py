"""`kvscope workload import FORMAT FILE -o W.jsonl`: another system's request trace -> a kvscope workload.

Not a subcommand of its own (kvscope.cli.COMMANDS lists those): `kvscope workload` hands `import` to it.
"""

from __future__ import annotations

import argparse

FORMATS = ("mooncake",)
# Generator options of `kvscope workload` that an import cannot honour: refused, not ignored.
_GENERATOR_OPTIONS = (
    "rate",
    "n",
    "system_prompt_len",
    "system_prompt_fraction",
    "system_prompts",
    "turns",
    "think_time",
    "max_len",
)


def run_import(args: argparse.Namespace) -> int:
    from kvscope.commands.outputs import check_output
    from kvscope.errors import UserError
    from kvscope.importers.mooncake import load_mooncake, to_requests
    from kvscope.workload import describe_lengths, save_workload

    if args.name != "import":
        raise UserError(f"unexpected arguments after {args.name}: {' '.join(args.source)}")
    if len(args.source) != 2:
        raise UserError(f"import: give a format and a file (kvscope workload import {FORMATS[0]} FILE -o W.jsonl)")
    fmt, path = args.source
    if fmt not in FORMATS:
        raise UserError(f"import: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    for name in _GENERATOR_OPTIONS:
        if getattr(args, name, None) is not None:
            raise UserError(f"--{name.replace('_', '-')}: applies to generated workloads, not to an import")
    if args.requests is not None and args.requests < 1:
        raise UserError(f"--requests: must be a positive integer, got {args.requests}")
    check_output(args.output, "-o", [path])
    trace = load_mooncake(path, limit=args.requests)
    requests = to_requests(trace)
    save_workload(requests, args.output)
    desc = describe_lengths(requests)
    info = trace.describe()
    print(f"wrote {desc['requests']} requests from {path} to {args.output}")
    print(
        f"prompt tokens mean {desc['prompt_len']['mean']:.0f}, output mean {desc['output_len']['mean']:.0f}; "
        f"{info['blocks']} blocks of {trace.block_tokens} tokens, {info['unique_blocks']} distinct "
        f"(an unbounded cache would hit {info['max_block_hit_rate']:.1%} of blocks); "
        f"reusable prompt tokens {desc['reusable_prompt_fraction']:.1%}"
    )
    print(f"arrivals span {desc['duration_s']} s")
    return 0
