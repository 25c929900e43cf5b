"""One decode point's kernels, each launched once between cudaProfilerStart and Stop, for Nsight Compute.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        python benchmarks/profile_decode.py --batch 16 --context 1024 --configs "default;num_splits=2"

Runs torch SDPA with its default backend and kvscope's paged decode (16-token blocks) with each config of --configs
(";"-separated; "default": what kvscope picks, `decode_plan`; DecodeConfig fields as k=v,k=v over the default
tiles; or
"streams:S:N:W:STAGES:SPLITS" for benchmarks/exp_stream_decode.py's kernel) on the same data, warmed up
(compiled) before the profiled range. Each launch is in an NVTX range named after its variant, so `ncu --nvtx` or
`--print-summary per-nvtx` can tell them apart. Prints the variants' max |difference| from SDPA. It measures nothing
itself: the numbers are ncu's.

    python benchmarks/profile_decode.py --summarize ncu.txt     # one table row per profiled kernel of ncu's text
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels as bk  # noqa: E402
from tune_decode import decode_sets  # noqa: E402


def parse_config(K, text: str, dtype):
    base = K.default_decode_config(bk.HEAD_DIM, dtype)
    if text == "default":
        return None
    fields: dict[str, object] = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        try:
            fields[key] = value == "True" if value in ("True", "False") else int(value)
        except ValueError:
            what = f"{key}={value!r} is not an integer or True/False"
            raise SystemExit(f"profile_decode: --configs {text!r}: {what}") from None
    try:
        return replace(base, **fields)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"profile_decode: --configs {text!r}: {exc}") from None


#: ncu's text report lines read by --summarize: (column, metric name as ncu prints it)
_METRICS = (
    ("us", "Duration"),
    ("TB/s", "Memory Throughput"),
    ("DRAM %", "DRAM Throughput"),
    ("regs", "Registers Per Thread"),
    ("smem KiB", "Dynamic Shared Memory Per Block"),
    ("occupancy %", "Achieved Occupancy"),
)


_PER_TB = {"Tbyte/s": 1.0, "Gbyte/s": 1e3, "Mbyte/s": 1e6}


def summarize(text: str) -> str:
    """A markdown table of ncu's text report: one row per profiled kernel, named by its NVTX range."""
    rows: list[dict[str, str]] = []
    for line in text.splitlines():
        head = re.match(r"^  (\S+) \(([\d, ]+)\)x\(([\d, ]+)\)", line)
        if head:
            rows.append({"kernel": head.group(1)[:40], "grid": head.group(2).replace(" ", ""), "range": ""})
            continue
        if not rows:
            continue
        nvtx = re.match(r"^\s+<0,(.*)>$", line)
        if nvtx:
            rows[-1]["range"] = nvtx.group(1)
        for col, name in _METRICS:
            m = re.match(rf"^\s+{re.escape(name)}\s+(\S+)\s+([\d.,]+)$", line)
            if not m or col in rows[-1]:
                continue
            value = m.group(2).replace(",", "")
            if col == "TB/s":  # ncu scales the unit to the value: Tbyte/s, Gbyte/s, Mbyte/s
                if m.group(1) not in _PER_TB:
                    continue  # "Memory Throughput" in % (the Speed Of Light section)
                value = f"{float(value) / _PER_TB[m.group(1)]:.3g}"
            rows[-1][col] = value
    cols = ["range", "kernel", "grid", *(c for c, _ in _METRICS)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r.get(c, "-") for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--configs", default="default")
    ap.add_argument("--summarize", type=Path, help="print a table of this ncu text report and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize.read_text()))
        return 0
    import kvscope.kernels as K
    import torch

    dtype = torch.bfloat16
    q, k4, v4, kc, vc, bt, sl, out = decode_sets(torch, args.batch, args.context, dtype, dry=True)[0]
    sdpa = bk.sdpa_default(torch, q.unsqueeze(2), k4, v4, False)
    expected = sdpa().squeeze(2).float()
    variants = {"sdpa-default": sdpa}
    for text in args.configs.split(";"):
        if text.startswith("streams:"):
            from exp_stream_decode import stream_decode

            a = tuple(int(x) for x in text.split(":")[1:])
            variants[text] = lambda a=a: stream_decode(torch, q, kc, vc, bt, sl, args.context, out, *a)
            continue
        cfg = parse_config(K, text, dtype)
        variants[f"paged-16 {text}"] = lambda cfg=cfg: K.paged_decode_attention(
            q, kc, vc, bt, sl, max_seq_len=args.context, out=out, config=cfg
        )
    for name, fn in variants.items():  # compile and warm up outside the profiled range
        got = fn()
        got = (got.squeeze(2) if got.dim() == 4 else got).float()
        print(f"{name}: max |diff| vs sdpa {(got - expected).abs().max().item():.1e}")
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, fn in variants.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
