"""`kvscope workload NAME -o FILE.jsonl`: write a synthetic workload and print the distribution it produced."""

from __future__ import annotations

import argparse

NAMES = ("sharegpt", "alpaca", "shared-prefix", "parallel", "beam", "multiturn")  # kvscope.workload_gen.NAMED_WORKLOADS


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "name", metavar="NAME", help=f"{', '.join(NAMES)}, a .jsonl file to filter/rewrite, or `import mooncake FILE`"
    )
    p.add_argument("source", nargs="*", metavar="FORMAT FILE", help="with `import`: the format (mooncake) and file")
    p.add_argument("-o", "--output", required=True, metavar="FILE.jsonl", help="where to write the workload")
    p.add_argument("--requests", type=int, default=None, metavar="N", help="number of requests (default 1000)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--rate", type=float, default=None, metavar="R", help="Poisson arrivals, requests/s (inf: all at 0)")
    p.add_argument("--n", type=int, default=None, metavar="K", help="parallel samples per request")
    p.add_argument("--width", type=int, default=None, metavar="K", help="beam search with K beams per request")
    p.add_argument("--system-prompt-len", type=int, default=None, metavar="L", help="shared system prompt tokens")
    p.add_argument("--system-prompt-fraction", type=float, default=None, metavar="F", help="share of requests using it")
    p.add_argument("--system-prompts", type=int, default=None, metavar="K", help="number of distinct system prompts")
    p.add_argument("--turns", type=int, default=None, metavar="T", help="turns per multi-turn conversation")
    p.add_argument("--think-time", type=float, default=None, metavar="S", help="mean seconds between turns")
    p.add_argument("--max-len", type=int, default=None, metavar="M", help="drop requests with prompt + output > M")


def run(args: argparse.Namespace) -> int:
    from kvscope.commands.outputs import check_output, input_files
    from kvscope.workload import save_workload
    from kvscope.workload_gen import resolve_workload

    if args.name == "import" or args.source:
        from kvscope.commands.workload_import import run_import

        return run_import(args)
    # Before generating: a bad -o, or -o naming the input file being rewritten, must not cost a generation first.
    check_output(args.output, "-o", input_files(args.name))

    opts = {
        "rate": args.rate,
        "n": args.n,
        "beam": args.width,
        "system_prompt_len": args.system_prompt_len,
        "system_prompt_fraction": args.system_prompt_fraction,
        "system_prompts": args.system_prompts,
        "turns": args.turns,
        "think_time": args.think_time,
        "max_len": args.max_len,
    }
    try:
        requests, desc = resolve_workload(args.name, requests=args.requests, seed=args.seed, **opts)
    except ValueError as e:
        raise ValueError(as_flag(str(e))) from None
    save_workload(requests, args.output)
    print(f"wrote {desc['requests']} requests ({desc['samples']} samples) to {args.output}")
    print(f"{'':6} {'prompt_len':>11} {'output_len':>11}")
    for stat in ("mean", "p50", "p90", "max"):
        print(f"{stat:6} {desc['prompt_len'][stat]:>11.1f} {desc['output_len'][stat]:>11.1f}")
    extras = {k: desc[k] for k in ("beams", "shared_prefixes", "conversations", "reusable_prompt_fraction") if desc[k]}
    if extras:
        print("  ".join(f"{k} {v}" for k, v in extras.items()))
    if desc["duration_s"]:
        print(f"arrivals span {desc['duration_s']} s")
    return 0


def as_flag(message: str) -> str:
    """The generator names its parameters ('think_time: must be ...'); on the command line they are options."""
    name, sep, rest = message.partition(": ")
    if sep and name in _OPTION_NAMES:
        return f"--{_FLAG_OF.get(name, name.replace('_', '-'))}: {rest}"
    return message


_FLAG_OF = {"beam": "width"}  # generator parameters whose flag has another name
_OPTION_NAMES = {"requests", "rate", "n", "beam", "system_prompt_len", "system_prompt_fraction", "system_prompts",
                 "turns", "think_time", "max_len"}  # fmt: skip
