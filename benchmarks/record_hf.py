"""HF transformers' continuous batching and kvscope's paged engine on one GPU: the same workload, the same KV budget,
both recorded as kvscope traces.

    python benchmarks/record_hf.py --out sample_runs              # H100/H200: a few minutes
    python benchmarks/record_hf.py --quick --out /tmp/hf-quick    # CPU smoke run: tiny model, 8 short requests

Needs transformers 5.17 (pip install 'kvscope[hf]'). Writes into --out:
  hf-sharegpt-256.jsonl     the workload: kvscope's ShareGPT-like generator (prompts <= 1024 tokens), every output
                            --output-len tokens, all arriving at t=0 (generate_batch takes them at once); the
                            prompts' token ids are written out, so both engines see the same tokens
  hf-transformers.kvtrace   HF `generate_batch` with attn_implementation="paged|sdpa", recorded by
                            kvscope.integrations.hf_transformers (random weights, Llama-3-8B shapes, --layers layers)
  kvscope-paged.kvtrace     kvscope's engine (`--device cuda --allocator paged`, Triton attention) on that workload
  hf-record.json            both summaries; HF's wall time with and without the hook (the hook's cost); the hook's
                            mismatches (HF's block counts against kvscope's shadow, expected empty)
Both engines get the same pool (--kv-memory in --block-size-token blocks), the same token budget per step
(--max-batch-tokens, prompts split to fill it: HF always chunks, kvscope's --chunked-prefill) and batch cap
(--max-batch), and the same prefix caching (HF's allow_block_sharing, on by default there; kvscope's
--prefix-caching). Neither runs warm-up work inside its timed run: each engine first runs
a few requests untimed (CUDA/cuBLAS/Triton initialisation), and HF's `warmup` (CUDA-graph capture, off anyway for
paged|sdpa, which needs an attention mask) is not asked for. HF samples greedily with EOS disabled, so every
request generates exactly --output-len tokens, as kvscope's engine does. Exits 1 with one line on a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
             "head_dim": 128, "vocab_size": 128256}  # fmt: skip
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
}  # fmt: skip (kvscope's "tiny" preset)


def workload(args: argparse.Namespace, vocab: int) -> tuple[list[Any], dict[str, Any]]:
    """ShareGPT-like prompts from kvscope's generator, every output args.output_len tokens, explicit token ids."""
    from kvscope.workload_gen import generate_named

    requests, params = generate_named("sharegpt", args.requests, args.seed)
    out = [
        replace(r, output_len=args.output_len, prompt=tuple(int(t) % vocab for t in r.prompt_tokens()))
        for r in requests
    ]
    description = {"name": "sharegpt", "source": "generated", "params": params, "seed": args.seed,
                   "requests": len(out), "output_len": args.output_len}  # fmt: skip
    return out, description


def hf_model(args: argparse.Namespace, shapes: dict[str, int]):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(num_hidden_layers=args.layers, max_position_embeddings=4096, **shapes)
    dtype = torch.float32 if args.quick else torch.bfloat16
    with torch.device(args.device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="paged|sdpa")
    return model.eval()


def hf_generate(model, prompts: list[list[int]], args: argparse.Namespace, new_tokens: int, num_blocks: int):
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(
        block_size=args.block_size,
        num_blocks=num_blocks,
        max_batch_tokens=args.max_batch_tokens,
        max_requests_per_batch=args.max_batch,
        allow_block_sharing=args.prefix_caching,
    )
    out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb, warmup=False)
    failed = [r for r in out.values() if r.error is not None or len(r.generated_tokens) != new_tokens]
    if len(out) != len(prompts) or failed:
        raise SystemExit(f"record_hf: HF generate_batch returned {len(out)} results, {len(failed)} failed or short")
    return out


def run_hf(args: argparse.Namespace, requests: list[Any], description: dict[str, Any], out_dir: Path) -> dict:
    import torch

    from kvscope.engine.api import requests_table
    from kvscope.integrations import hf_transformers

    shapes = TINY if args.quick else LLAMA3_8B
    model = hf_model(args, shapes)
    prompts = [list(r.prompt) for r in requests]
    block_bytes = args.block_size * 2 * args.layers * shapes["num_key_value_heads"] * shapes["head_dim"]
    block_bytes *= 4 if args.quick else 2
    num_blocks = args.kv_memory // block_bytes
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    hf_generate(model, prompts[:8], args, 8, num_blocks)  # untimed: CUDA context, cuBLAS handles, allocator pools
    sync()
    t0 = time.perf_counter()
    hf_generate(model, prompts, args, args.output_len, num_blocks)
    sync()
    plain_s = time.perf_counter() - t0
    path = out_dir / "hf-transformers.kvtrace"
    meta = {
        "model": "tiny" if args.quick else "llama-3-8b",  # kvscope's preset of the same shapes: the runs compare
        "weights": f"random ({args.layers} layers)",
        "workload": description,
        "requests": requests_table(requests),
        "seed": args.seed,
        "command": " ".join(sys.argv),
    }
    t0 = time.perf_counter()
    with hf_transformers.record(path, model=model, meta=meta) as hook:
        hf_generate(model, prompts, args, args.output_len, num_blocks)
        sync()
    hooked_s = time.perf_counter() - t0
    tokens = len(prompts) * args.output_len
    return {
        "trace": str(path),
        "num_blocks": num_blocks,
        "wall_s_without_hook": plain_s,
        "wall_s_with_hook": hooked_s,
        "tokens_per_s_without_hook": tokens / plain_s,
        "tokens_per_s_with_hook": tokens / hooked_s,
        "hook_overhead": hooked_s / plain_s - 1,
        "mismatches": hook.mismatches,
        "ignored_caches": hook.ignored_caches,
    }


def run_kvscope(args: argparse.Namespace, requests: list[Any], description: dict[str, Any], out_dir: Path) -> dict:
    from kvscope.engine.api import RunConfig, record_run

    cfg = RunConfig(
        allocator="paged",
        device=args.device,
        model="tiny" if args.quick else "llama-3-8b",
        layers=None if args.quick else args.layers,
        kv_memory=args.kv_memory,
        max_len=2048,
        max_batch=args.max_batch,
        max_tokens_per_step=args.max_batch_tokens,
        chunked_prefill=True,  # HF always splits a prompt to fill the step's token budget
        block_size=args.block_size,
        prefix_caching=args.prefix_caching,
        seed=args.seed,
    )
    warm = replace(cfg, kv_memory=min(args.kv_memory, 1 << 30), max_batch=8)
    record_run(requests[:8], warm, path=None, command="record_hf warm-up")  # Triton compiles on first use
    path = out_dir / "kvscope-paged.kvtrace"
    t0 = time.perf_counter()
    record_run(requests, cfg, path=path, workload=description, command=" ".join(sys.argv))
    return {"trace": str(path), "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("sample_runs"), help="folder for the workload, traces and JSON")
    p.add_argument("--quick", action="store_true", help="tiny model, 8 requests x 16 tokens, on the CPU")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=8, help="Llama-3-8B layers to build (fewer: faster, same KV/layer)")
    p.add_argument("--kv-memory", default="8GiB", help="the KV pool both engines get")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block, both engines (HF's default: 256)")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="tokens a step may compute, both engines")
    p.add_argument("--max-batch", type=int, default=256, help="sequences a step may hold, both engines")
    p.add_argument("--prefix-caching", choices=("on", "off"), default="on", help="both engines (HF's default: on)")
    p.add_argument("--skip-kvscope", action="store_true", help="record HF only")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from kvscope.analysis.summary import summarize
    from kvscope.errors import describe
    from kvscope.trace import load_trace
    from kvscope.units import parse_size

    args.prefix_caching = args.prefix_caching == "on"
    if args.quick:
        args.requests, args.output_len, args.layers = min(args.requests, 8), min(args.output_len, 16), 2
        args.kv_memory, args.max_batch_tokens = "256KiB", min(args.max_batch_tokens, 128)
    args.device = "cpu" if args.quick else "cuda"
    try:
        args.kv_memory = parse_size(args.kv_memory)
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise SystemExit("record_hf: no CUDA GPU (use --quick for a CPU smoke run)")
        args.out.mkdir(parents=True, exist_ok=True)
        requests, description = workload(args, (TINY if args.quick else LLAMA3_8B)["vocab_size"])
        from kvscope.workload import save_workload

        save_workload(requests, args.out / f"hf-sharegpt-{len(requests)}.jsonl")
        result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
        result["hf"] = run_hf(args, requests, description, args.out)
        if not args.skip_kvscope:
            result["kvscope"] = run_kvscope(args, requests, description, args.out)
    except Exception as e:  # noqa: BLE001 - one line for user errors, the traceback for bugs
        failure = describe(e)
        if failure is None:
            raise
        print(f"record_hf: {failure.line}", file=sys.stderr)
        return failure.exit_code
    for side in ("hf", "kvscope"):
        if side in result:
            result[side]["summary"] = summarize(load_trace(result[side]["trace"]))
    (args.out / "hf-record.json").write_text(json.dumps(result, indent=2, default=str))
    hf = result["hf"]
    print(
        f"HF generate_batch: {hf['tokens_per_s_without_hook']:,.0f} tokens/s without the hook, "
        f"{hf['tokens_per_s_with_hook']:,.0f} with it ({100 * hf['hook_overhead']:+.1f}%); trace {hf['trace']}"
    )
    if "kvscope" in result:
        s = result["kvscope"]["summary"]
        print(f"kvscope paged: {s['tokens_per_s']:,.0f} tokens/s; trace {result['kvscope']['trace']}")
    if hf["mismatches"]:
        print(f"record_hf: the hook's shadow disagreed with HF's books: {hf['mismatches'][:3]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
