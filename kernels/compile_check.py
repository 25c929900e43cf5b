"""Compile every kernel variant for a GPU architecture without a GPU, and report its resources.

    python -m kvscope.kernels.compile_check [--arch 90] [--json]

Triton compiles ahead of time from a signature (argument types, alignment hints, constexprs); ptxas -v then tells the
registers and spills. This catches what Triton's interpreter lets through (type errors in loops, tl.dot shape rules,
shared memory overflow) on a machine without a GPU. The signatures below mirror what the wrappers launch for
Llama-3-8B-shaped inputs (32 q heads, 8 kv heads, head_dim 128) with the default GPU tile configs. Must run with
TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton

from .common import INTERPRETED, default_decode_config, default_prefill_config
from .decode_tiles import one_per_sm_decode_config, two_per_sm_decode_config

_PTR_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
              torch.int64: "*i64"}  # fmt: skip

#: Shared memory a block may use on sm90 (227 KiB).
SM90_MAX_SHARED = 232448


@dataclass
class CompileResult:
    variant: str
    kernel: str
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None
    error: str | None = None


def _ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    suffix = "a" if arch == 90 else ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", f.name, "-o", os.devnull], capture_output=True, text=True
        )
    finally:
        os.unlink(f.name)
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)) if regs else None), (int(spills.group(1)) if spills else None)


def compile_kernel(kernel, args: dict[str, object], num_warps: int, num_stages: int, arch: int):
    """Compile `kernel` (a triton.jit function) for sm_<arch>: tensors given by dtype, ints by a sample value."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = args[name]
        if name.isupper():
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.dtype):
            signature[name] = _PTR_TYPES[value]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # Triton specializes integer arguments equal to 1 into constants
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs, attrs)
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def _short(value: object) -> str:
    return str(value).removeprefix("torch.").removesuffix("_ptr")


def _variant_name(kernel: str, dtype: torch.dtype, over: dict[str, object]) -> str:
    return " ".join([kernel, _short(dtype), *(f"{k}={_short(v)}" for k, v in over.items())])


def _variants() -> list[tuple[str, object, dict[str, object], int, int]]:
    """(name, kernel, args, num_warps, num_stages) for each variant the wrappers can launch."""
    from . import block_copy, decode, kv_store, prefill

    bf16, f32, i32, i64 = torch.bfloat16, torch.float32, torch.int32, torch.int64
    hq, hkv, d, page = 32, 8, 128, 16
    out = []

    def decode_args(dtype, **over):
        args = dict(
            q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, block_tables_ptr=i32, token_base_ptr=i64, seq_lens_ptr=i32,
            out_ptr=dtype, part_out_ptr=f32, part_lse_ptr=f32, counters_ptr=i32, split_len_ptr=i32,
            scale_log2=0.1275, tokens_per_split=512,
            stride_qb=hq * d, stride_qh=d, stride_kb=page * hkv * d, stride_kt=hkv * d, stride_kh=d,
            stride_vb=page * hkv * d, stride_vt=hkv * d, stride_vh=d, stride_bt=2048, stride_ob=hq * d, stride_oh=d,
            stride_pb=hq * 64 * d, stride_ph=64 * d, stride_ps=d, stride_lb=hq * 64, stride_lh=64,
            GROUP=hq // hkv, BLOCK_G=16, HEAD_DIM=d, BLOCK_D=d, BLOCK_N=0, PAGE=page, PAGED=True, DIRECT_OUT=False,
            FUSED=False, DEVICE_SPLIT=False, BLOCK_S=decode.MERGE_SPLITS,
            DOT_PRECISION="ieee" if dtype == f32 else "tf32", UPCAST_DOT=False,
        )  # fmt: skip
        args.update(over)
        return args

    for dtype, over in [
        (bf16, {}),
        (bf16, {"PAGE": 1}),
        (bf16, {"PAGE": 256}),
        (bf16, {"DIRECT_OUT": True}),
        (bf16, {"FUSED": True}),  # the last split merges
        (bf16, {"DEVICE_SPLIT": True}),  # CUDA-graph captured
        (bf16, {"PAGED": False, "DEVICE_SPLIT": True, "stride_kt": 2 * 32 * hkv * d, "stride_vt": 2 * 32 * hkv * d}),
        (bf16, {"PAGED": False, "stride_kt": 2 * 32 * hkv * d, "stride_vt": 2 * 32 * hkv * d}),
        (bf16, {"GROUP": 8}),
        (bf16, {"GROUP": 1}),
        (torch.float16, {"HEAD_DIM": 80, "BLOCK_D": 128}),
        (f32, {"GROUP": 1, "HEAD_DIM": 64, "BLOCK_D": 64}),
        (f32, {}),
        (bf16, {"HEAD_DIM": 256, "BLOCK_D": 256}),
        (bf16, {"seq_lens_ptr": i64, "block_tables_ptr": i64}),  # int64 index tensors from the engine
        (bf16, {"PAGED": False, "seq_lens_ptr": i64, "token_base_ptr": i32}),
    ]:
        cfg = default_decode_config(over.get("HEAD_DIM", d), dtype)
        args = decode_args(dtype, **over)
        args["BLOCK_N"] = cfg.block_n
        out.append(
            (
                _variant_name("decode", dtype, over),
                decode._decode_split_kernel,
                args,
                cfg.num_warps,
                decode.loop_stages(cfg, bool(args["PAGED"])),
            )
        )

    contiguous = {"PAGED": False, "stride_kt": 2 * 32 * hkv * d, "stride_vt": 2 * 32 * hkv * d}
    for plan in (one_per_sm_decode_config, two_per_sm_decode_config):  # decode_plan's no-split tiles
        for over in ({}, {"DEVICE_SPLIT": True}, {"seq_lens_ptr": i64, "block_tables_ptr": i64}, contiguous):
            cfg = plan(d)
            over = {**over, "DIRECT_OUT": True}
            args = decode_args(bf16, **over)
            args["BLOCK_N"] = cfg.block_n
            name = f"{_variant_name('decode', bf16, over)} {plan.__name__}"
            stages = decode.loop_stages(cfg, bool(args["PAGED"]))
            out.append((name, decode._decode_split_kernel, args, cfg.num_warps, stages))

    for block_d in (128, 256):
        reduce_args = dict(
            part_out_ptr=f32, part_lse_ptr=f32, out_ptr=bf16, num_splits=57, stride_pb=hq * 64 * block_d,
            stride_ph=64 * block_d, stride_ps=block_d, stride_lb=hq * 64, stride_lh=64, stride_ob=hq * block_d,
            stride_oh=block_d, HEAD_DIM=block_d, BLOCK_D=block_d, BLOCK_S=decode.REDUCE_SPLITS,
        )  # fmt: skip
        out.append(
            (
                f"decode reduce HEAD_DIM={block_d}",
                decode._decode_reduce_kernel,
                reduce_args,
                decode.reduce_warps(block_d),
                1,
            )
        )

    def prefill_args(dtype, **over):
        args = dict(
            q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, out_ptr=dtype, block_tables_ptr=i32, token_base_ptr=i64,
            cu_seqlens_q_ptr=i32, context_lens_ptr=i32, scale_log2=0.1275, stride_qt=hq * d, stride_qh=d,
            stride_kb=page * hkv * d, stride_kt=hkv * d, stride_kh=d, stride_vb=page * hkv * d, stride_vt=hkv * d,
            stride_vh=d, stride_bt=2048, stride_ot=hq * d, stride_oh=d, GROUP=hq // hkv, HEAD_DIM=d, BLOCK_D=d,
            BLOCK_M=0, BLOCK_N=0, PAGE=page, PAGED=True, DOT_PRECISION="ieee" if dtype == f32 else "tf32",
            UPCAST_DOT=False,
        )  # fmt: skip
        args.update(over)
        return args

    for dtype, over in [
        (bf16, {}),
        (bf16, {"PAGE": 1}),
        (bf16, {"PAGED": False, "stride_kt": 2 * 32 * hkv * d, "stride_vt": 2 * 32 * hkv * d}),
        (torch.float16, {"HEAD_DIM": 64, "BLOCK_D": 64}),
        (f32, {}),
        (bf16, {"HEAD_DIM": 256, "BLOCK_D": 256}),
        (bf16, {"cu_seqlens_q_ptr": i64, "context_lens_ptr": i64, "block_tables_ptr": i64}),
        (bf16, {"PAGED": False, "cu_seqlens_q_ptr": i64, "context_lens_ptr": i32, "token_base_ptr": i32}),
    ]:
        cfg = default_prefill_config(over.get("HEAD_DIM", d), dtype)
        args = prefill_args(dtype, **over)
        args["BLOCK_M"], args["BLOCK_N"] = cfg.block_m, cfg.block_n
        out.append(
            (_variant_name("prefill", dtype, over), prefill._prefill_kernel, args, cfg.num_warps, cfg.num_stages)
        )

    for paged in (True, False):
        store_args = dict(
            key_ptr=bf16, value_ptr=bf16, k_ptr=bf16, v_ptr=bf16, slots_ptr=i64, stride_key_t=(hq + 2 * hkv) * d,
            stride_key_h=d, stride_value_t=(hq + 2 * hkv) * d, stride_value_h=d, stride_kb=page * hkv * d,
            stride_kt=hkv * d, stride_kh=d, stride_vb=page * hkv * d, stride_vt=hkv * d, stride_vh=d,
            NUM_HEADS=hkv, HEAD_DIM=d, BLOCK_H=hkv, BLOCK_D=d, PAGE=page if paged else 1, PAGED=paged,
        )  # fmt: skip
        out.append((f"store paged={paged}", kv_store._store_kv_kernel, store_args, 4, 1))

    copy_args = dict(
        src_ptr=bf16, dst_ptr=bf16, src_ids_ptr=i64, dst_ids_ptr=i64, inner=page * hkv * d,
        src_stride_outer=4096 * page * hkv * d, src_stride_block=page * hkv * d,
        dst_stride_outer=4096 * page * hkv * d, dst_stride_block=page * hkv * d, BLOCK=4096,
    )  # fmt: skip
    out.append(("copy blocks", block_copy._copy_blocks_kernel, copy_args, 4, 1))
    return out


def check_all(arch: int = 90) -> list[CompileResult]:
    if INTERPRETED:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the kernels were built for the interpreter)")
    results = []
    for name, kernel, args, num_warps, num_stages in _variants():
        try:
            compiled = compile_kernel(kernel, args, num_warps, num_stages, arch)
        except Exception as exc:  # report every variant, not just the first failure
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            results.append(CompileResult(name, kernel.__name__, num_warps, num_stages, 0, None, None, first_line))
            continue
        regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
        shared = compiled.metadata.shared
        results.append(CompileResult(name, kernel.__name__, num_warps, num_stages, shared, regs, spills))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100 (default)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    results = check_all(args.arch)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        print(f"{'variant':58} {'warps':>5} {'stages':>6} {'smem KiB':>8} {'regs':>5} {'spill':>5}")
        for r in results:
            if r.error:
                print(f"{r.variant:58} ERROR {r.error}")
            else:
                print(
                    f"{r.variant:58} {r.num_warps:>5} {r.num_stages:>6} {r.shared_bytes / 1024:>8.1f} "
                    f"{r.registers!s:>5} {r.spill_bytes!s:>5}"
                )
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
