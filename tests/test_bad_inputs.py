"""Every user mistake ends with one line on stderr and a non-zero exit (2), never a traceback (issue 7, item 6).

A table of bad inputs (option values, workload files, output paths, Rich markup in names, absurd sizes), each run
in-process through kvscope.cli.main. For every one: exit code 2, stderr exactly one line that starts with
"kvscope CMD: error:" and names the problem, no traceback, no file in the workspace created, changed or removed, and
no gigabytes taken (max RSS grows by less than MAX_RSS_GROWTH, the case takes less than MAX_SECONDS). The cases
that used to fill memory run again in a child process under an address-space limit, to show that they are refused
before anything is allocated.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvscope import cli

MAX_RSS_GROWTH = 256 << 20  # bytes; a refusal needs no more than the imports it triggers
MAX_SECONDS = 30.0  # generous for a shared 2-core machine; a refusal takes well under a second
CHILD_ADDRESS_SPACE = 3 << 30  # the sim path imports no torch and runs fine in 1 GiB; 3 GiB leaves headroom

GOOD = {"id": "r0", "arrival": 0.0, "prompt_len": 10, "output_len": 5}
MANY_DIGITS = "9" * 400


def line(**fields) -> str:
    """One workload line: the good request with `fields` replacing (or, set to ..., removing) its own."""
    obj = {**GOOD, **fields}
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


# Bad workload files: name -> content. Written into the workspace as bad-<name>.jsonl.
WORKLOADS: dict[str, str | bytes] = {
    "cut-json": '{"id": "a",\n',
    "trailing-garbage": line() + " x\n",
    "a-list": "[1, 2]\n",
    "a-string": '"hello"\n',
    "no-id": line(id=...) + "\n",
    "no-arrival": line(arrival=...) + "\n",
    "no-output-len": line(output_len=...) + "\n",
    "no-prompt": line(prompt_len=...) + "\n",
    "empty-id": line(id="") + "\n",
    "number-id": line(id=5) + "\n",
    "string-arrival": line(arrival="0") + "\n",
    "negative-arrival": line(arrival=-1) + "\n",
    "nan-arrival": '{"id": "a", "arrival": NaN, "prompt_len": 10, "output_len": 5}\n',
    "inf-arrival": '{"id": "a", "arrival": Infinity, "prompt_len": 10, "output_len": 5}\n',
    "1e300-arrival": '{"id": "a", "arrival": 1e300, "prompt_len": 10, "output_len": 5}\n',
    "huge-int-arrival": f'{{"id": "a", "arrival": {MANY_DIGITS}, "prompt_len": 10, "output_len": 5}}\n',
    "zero-prompt-len": line(prompt_len=0) + "\n",
    "negative-prompt-len": line(prompt_len=-5) + "\n",
    "float-prompt-len": line(prompt_len=2.5) + "\n",
    "string-prompt-len": line(prompt_len="10") + "\n",
    "bool-prompt-len": line(prompt_len=True) + "\n",
    "1e9-float-prompt-len": '{"id": "a", "arrival": 0, "prompt_len": 1e9, "output_len": 5}\n',
    "1e9-prompt-len": line(prompt_len=10**9) + "\n",
    "huge-int-prompt-len": f'{{"id": "a", "arrival": 0, "prompt_len": {MANY_DIGITS}, "output_len": 5}}\n',
    "5000-digit-prompt-len": f'{{"id": "a", "arrival": 0, "prompt_len": {"9" * 5000}, "output_len": 5}}\n',
    "zero-output-len": line(output_len=0) + "\n",
    "null-output-len": line(output_len=None) + "\n",
    "zero-n": line(n=0) + "\n",
    "huge-n": line(n=10**9) + "\n",
    "float-n": line(n=1.5) + "\n",
    "empty-prompt": line(prompt_len=..., prompt=[]) + "\n",
    "negative-token": line(prompt_len=2, prompt=[1, -1]) + "\n",
    "string-prompt": line(prompt_len=..., prompt="abc") + "\n",
    "prompt-len-mismatch": line(prompt_len=3, prompt=[1, 2]) + "\n",
    "huge-token": line(prompt_len=1, prompt=[2**40]) + "\n",
    "string-prefix": line(shared_prefix="s") + "\n",
    "prefix-no-len": line(shared_prefix={"id": "s"}) + "\n",
    "prefix-too-long": line(shared_prefix={"id": "s", "len": 11}) + "\n",
    "prefix-extra": line(shared_prefix={"id": "s", "len": 2, "x": 1}) + "\n",
    "unknown-field": line(promt_len=3) + "\n",
    "duplicate-id": line() + "\n" + line() + "\n",
    "number-conversation": line(conversation=5) + "\n",
    "deep-list": "[" * 100_000 + "]" * 100_000 + "\n",
    "deep-object": '{"id": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",
    "empty": "",
    "blank-lines": "\n\n   \n",
    # Each line is valid, but its token ids alone (65,536 samples of 16 Mi tokens) would take terabytes.
    "terabytes-of-token-ids": line(prompt_len=1 << 24, output_len=1 << 24, n=1 << 16) + "\n",
}


@dataclass(frozen=True)
class Case:
    name: str
    command: str  # shell words; {sim} is a small `kvscope run`, {ws} the workspace, {digits} 400 nines
    needle: str  # what the one line must contain: the file, field or option, and the value


def case(name: str, command: str, needle: str) -> Case:
    return Case(name, command, needle)


# A small `kvscope run` whose output must never appear.
SIM = "run -w alpaca -n 5 -q -o {ws}/out/x.kvtrace"

WORKLOAD_NEEDLES = {
    "cut-json": "not valid JSON",
    "trailing-garbage": "not valid JSON: Extra data",
    "a-list": "expected a JSON object, got list",
    "a-string": "expected a JSON object, got str",
    "no-id": "field 'id': missing",
    "no-arrival": "field 'arrival': missing",
    "no-output-len": "field 'output_len': missing",
    "no-prompt": "field 'prompt_len': missing",
    "empty-id": "field 'id': must be a non-empty string, got ''",
    "number-id": "field 'id': must be a non-empty string, got 5",
    "string-arrival": "field 'arrival': must be a finite number of seconds >= 0",
    "negative-arrival": "got -1",
    "nan-arrival": "field 'arrival'",
    "inf-arrival": "got inf",
    "1e300-arrival": "got 1e+300",
    "huge-int-arrival": "field 'arrival'",
    "zero-prompt-len": "field 'prompt_len': must be a positive integer, got 0",
    "negative-prompt-len": "got -5",
    "float-prompt-len": "got 2.5",
    "string-prompt-len": "got '10'",
    "bool-prompt-len": "got True",
    "1e9-float-prompt-len": "got 1000000000.0",
    "1e9-prompt-len": "field 'prompt_len': must be at most 16,777,216, got 1000000000",
    "huge-int-prompt-len": "an integer of about 401 digits",
    "5000-digit-prompt-len": "not valid JSON: Exceeds the limit (4300 digits)",
    "zero-output-len": "field 'output_len': must be a positive integer, got 0",
    "null-output-len": "got None",
    "zero-n": "field 'n': must be a positive integer, got 0",
    "huge-n": "field 'n': must be at most 65,536",
    "float-n": "field 'n'",
    "empty-prompt": "field 'prompt': must not be empty",
    "negative-token": "field 'prompt': token 1",
    "string-prompt": "field 'prompt': must be a list of token ids, got str",
    "prompt-len-mismatch": "disagrees with the prompt's 2 tokens",
    "huge-token": "field 'prompt': token 0",
    "string-prefix": "field 'shared_prefix': must be an object",
    "prefix-no-len": "field 'shared_prefix.len': missing",
    "prefix-too-long": "field 'shared_prefix.len': 11 exceeds the prompt length 10",
    "prefix-extra": "field 'shared_prefix.x': unknown field",
    "unknown-field": "field 'promt_len': unknown field",
    "duplicate-id": ":2: field 'id': duplicate id 'r0'",
    "number-conversation": "field 'conversation'",
    "deep-list": "not valid JSON: nested too deeply",
    "deep-object": "not valid JSON: nested too deeply",
    "binary": "not UTF-8 text",
    "empty": "no requests in the file",
    "blank-lines": "no requests in the file",
    "terabytes-of-token-ids": "token ids of its 1 requests",
}


def workload_cases() -> list[Case]:
    """Every bad file through `kvscope run`, a few through `kvscope workload`; the line names file:line too."""
    run = [
        case(f"run-{name}", f"run -w {{ws}}/bad-{name}.jsonl -q -o {{ws}}/out/x.kvtrace", f"bad-{name}.jsonl")
        for name in WORKLOADS
    ]
    run = [Case(c.name, c.command, WORKLOAD_NEEDLES[c.name.removeprefix("run-")]) for c in run]
    rewrite = [
        case(f"workload-{name}", f"workload {{ws}}/bad-{name}.jsonl -o {{ws}}/out.jsonl", f"bad-{name}.jsonl:1: ")
        for name in ("cut-json", "deep-list", "huge-int-prompt-len", "binary", "1e300-arrival")
    ]
    return run + rewrite


CASES: list[Case] = [
    *workload_cases(),
    # ---- run: option values
    case("kv-memory-400-digits", "{sim} --kv-memory {digits}", "--kv-memory: not a size: '99999999999999999999'..."),
    case("kv-memory-99999999TiB", "{sim} --kv-memory 99999999TiB", "--kv-memory: size too large: '99999999TiB'"),
    case("kv-memory-nan", "{sim} --kv-memory nan", "--kv-memory: not a size: 'nan'"),
    case("kv-memory-inf", "{sim} --kv-memory inf", "--kv-memory: not a size: 'inf'"),
    case("kv-memory-negative", "{sim} --kv-memory=-1GiB", "--kv-memory: not a size: '-1GiB' (must not be negative)"),
    case("kv-memory-zero", "{sim} --kv-memory 0", "--kv-memory: must be positive, got 0"),
    case("kv-memory-words", "{sim} --kv-memory lots", "--kv-memory: not a size: 'lots'"),
    case("kv-memory-empty", "{sim} --kv-memory ''", "--kv-memory: not a size: ''"),
    case("kv-memory-exponent", "{sim} --kv-memory 1e3", "--kv-memory: not a size: '1e3'"),
    case("block-size-zero", "{sim} --block-size 0", "--block-size: must be an integer in 1..16,777,216, got 0"),
    case("block-size-negative", "{sim} --block-size -3", "--block-size: must be an integer in 1..16,777,216, got -3"),
    case(
        "block-size-huge",
        "{sim} --block-size 1000000000",
        "--block-size: must be an integer in 1..16,777,216, got 1000000000",
    ),
    case("block-size-400-digits", "{sim} --block-size {digits}", "got 99999999...(400 digits)"),
    case("block-size-word", "{sim} --block-size x", "argument --block-size: invalid int value: 'x'"),
    case("page-size-zero", "{sim} -a vmm --page-size 0", "--page-size: must be positive, got 0"),
    case("page-size-odd", "{sim} -a vmm --page-size 3000", "page_size=3000 is not a multiple"),
    case("page-size-words", "{sim} -a vmm --page-size big", "--page-size: not a size: 'big'"),
    case("max-batch-zero", "{sim} --max-batch 0", "--max-batch: must be an integer in 1..2,147,483,647, got 0"),
    case("max-batch-word", "{sim} --max-batch abc", "argument --max-batch: invalid int value: 'abc'"),
    case("max-len-zero", "{sim} --max-len 0", "--max-len: must be an integer in 1..16,777,216, got 0"),
    case(
        "max-len-huge",
        "{sim} --max-len 1000000000000",
        "--max-len: must be an integer in 1..16,777,216, got 1000000000000",
    ),
    case(
        "max-tokens-per-step-zero", "{sim} --max-tokens-per-step 0", "--max-tokens-per-step: must be an integer in 1.."
    ),
    case("layers-zero", "{sim} --layers 0", "--layers: must be an integer in 1..1,048,576, got 0"),
    case("layers-huge", "{sim} --layers 1000000000", "--layers: must be an integer in 1..1,048,576, got 1000000000"),
    case("seed-negative", "{sim} --seed -1", "--seed: must be an integer in 0.."),
    case("eager-pages-negative", "{sim} -a vmm --eager-pages -1", "--eager-pages: must be an integer in 0.."),
    case("model-empty", "{sim} --model ''", "--model: empty"),
    case("model-unknown", "{sim} --model gpt-9", "unknown model preset 'gpt-9'"),
    case("model-markup", "{sim} --model '[bold]x'", "unknown model preset '[bold]x'"),
    case("model-close-tag", "{sim} --model '[/]'", "unknown model preset '[/]'"),
    case("requests-zero", "{sim} -n 0", "--requests: must be a positive integer"),
    case(
        "requests-huge",
        "run -w sharegpt -n 1000000000000 -q -o {ws}/out/x.kvtrace",
        "at most 1,000,000), got 1000000000000",
    ),
    case("device-unknown", "{sim} -d tpu", "argument --device/-d: invalid choice: 'tpu'"),
    case("allocator-unknown", "{sim} -a buddy", "argument --allocator/-a: invalid choice: 'buddy'"),
    case("option-unknown", "{sim} --kv-memroy 1GiB", "unrecognized arguments: --kv-memroy"),
    case("workload-missing-option", "run -q", "the following arguments are required: --workload/-w"),
    case("attention-on-sim", "{sim} -a static --attention sdpa", "--attention sdpa applies to --device cuda, not sim"),
    case(
        "prefix-caching-on-static", "{sim} -a static --prefix-caching", "--prefix-caching applies to --allocator paged"
    ),
    case("swap-space-without-swap", "{sim} --swap-space 1GiB", "--swap-space needs --preemption swap"),
    # ---- run: sizes that used to fill memory before failing (absurd on any machine, so refused on every one)
    case("paged-7EiB", "{sim} --kv-memory 7EiB", "paged allocator: "),
    case("paged-swap-7EiB", "{sim} --preemption swap --swap-space 7EiB", "CPU blocks needs about"),
    case("vmm-7EiB", "{sim} -a vmm --kv-memory 7EiB", "vmm allocator: "),
    case(
        "vmm-max-batch-1e8",
        "{sim} -a vmm --max-batch 100000000",
        "64 virtual buffers of 381 TiB (max_batch 100,000,000",
    ),
    case(
        "vmm-slots-beyond-ram",
        "{sim} -a vmm -m tiny --megacache --page-size 4KiB --max-len 1 --max-batch 2147483647",
        "2,147,483,647 slots needs about",
    ),
    case("cpu-7EiB", "{sim} -d cpu --kv-memory 7EiB", "--kv-memory 7EiB on --device cpu needs about"),
    # ---- run: workloads and outputs
    case("workload-empty-name", "run -w '' -q -o {ws}/out/x.kvtrace", "--workload: empty"),
    case("workload-unknown-name", "run -w sharegtp -q -o {ws}/out/x.kvtrace", "unknown workload 'sharegtp'"),
    case("workload-missing-file", "run -w {ws}/nope.jsonl -q", "{ws}/nope.jsonl: no such workload file"),
    case(
        "workload-markup-missing", "run -w '{ws}/[bold]nope.jsonl' -q", "{ws}/[bold]nope.jsonl: no such workload file"
    ),
    case("workload-is-directory", "run -w {ws}/d -q", "{ws}/d: is a directory, not a workload file"),
    case("output-empty", "run -w alpaca -n 5 -q -o ''", "-o: empty path"),
    case("output-directory", "run -w alpaca -n 5 -q -o {ws}/d", "{ws}/d: is a directory; -o needs a file name"),
    case("output-under-a-file", "run -w alpaca -n 5 -q -o {ws}/f.txt/x.kvtrace", "{ws}/f.txt is not a directory"),
    case(
        "output-in-proc",
        "run -w alpaca -n 5 -q -o /proc/kvscope-no-such-dir/x.kvtrace",
        "/proc/kvscope-no-such-dir: No such file or directory",
    ),
    case("output-full-disk", "run -w alpaca -n 5 -q -o /dev/full", "/dev/full: writing failed"),
    case("output-is-the-workload", "run -w {ws}/ok.jsonl -q -o {ws}/ok.jsonl", "refusing to overwrite it"),
    case("output-via-a-link", "run -w {ws}/ok.jsonl -q -o {ws}/link.jsonl", "is also an input ({ws}/ok.jsonl)"),
    case("output-relative", "run -w ok.jsonl -q -o ./ok.jsonl", "ok.jsonl: is also an input (ok.jsonl)"),
    # ---- workload command
    case("gen-output-directory", "workload alpaca --requests 3 -o {ws}/d", "{ws}/d: is a directory"),
    case("gen-output-under-a-file", "workload alpaca --requests 3 -o {ws}/f.txt/a.jsonl", "f.txt is not a directory"),
    case(
        "gen-output-missing-dir", "workload alpaca --requests 3 -o {ws}/nodir/a.jsonl", "{ws}/nodir: no such directory"
    ),
    case("gen-output-full-disk", "workload alpaca --requests 3 -o /dev/full", "/dev/full: No space left on device"),
    case(
        "gen-output-in-proc", "workload alpaca --requests 3 -o /proc/kvscope.jsonl", "/proc/kvscope.jsonl: No such file"
    ),
    case("gen-output-empty", "workload alpaca --requests 3 -o ''", "-o: empty path"),
    case("gen-output-is-the-input", "workload {ws}/ok.jsonl -o {ws}/ok.jsonl", "{ws}/ok.jsonl: is also an input"),
    case("gen-output-via-a-link", "workload {ws}/ok.jsonl -o {ws}/link.jsonl", "{ws}/link.jsonl: is also an input"),
    case("gen-rate-zero", "workload alpaca --rate 0 -o {ws}/out.jsonl", "--rate: must be > 0"),
    case(
        "gen-rate-nan",
        "workload alpaca --rate nan -o {ws}/out.jsonl",
        "--rate: must be > 0 requests/s (inf: all at t=0), got nan",
    ),
    case(
        "gen-rate-tiny",
        "workload alpaca --requests 30 --rate 1e-300 -o {ws}/out.jsonl",
        "--rate: 1e-300 requests/s puts",
    ),
    case(
        "gen-rate-word", "workload alpaca --rate fast -o {ws}/out.jsonl", "argument --rate: invalid float value: 'fast'"
    ),
    case(
        "gen-think-time-huge",
        "workload multiturn --think-time 1e300 -o {ws}/out.jsonl",
        "--think-time: must be a finite",
    ),
    case(
        "gen-think-time-negative",
        "workload multiturn --think-time -1 -o {ws}/out.jsonl",
        "--think-time: must be a finite",
    ),
    case(
        "gen-n-huge",
        "workload parallel --n 1000000000 -o {ws}/out.jsonl",
        "--n: must be at most 65,536, got 1000000000",
    ),
    case(
        "gen-system-prompt-huge",
        "workload shared-prefix --system-prompt-len 10000000000 -o {ws}/o.jsonl",
        "--system-prompt-len",
    ),
    case(
        "gen-fraction",
        "workload shared-prefix --system-prompt-fraction 2 -o {ws}/o.jsonl",
        "must be in [0, 1], got 2.0",
    ),
    case(
        "gen-requests-zero",
        "workload alpaca --requests 0 -o {ws}/out.jsonl",
        "--requests: must be an integer in 1..1,000,000",
    ),
    case("gen-requests-huge", "workload sharegpt --requests 100000000000 -o {ws}/out.jsonl", "got 100000000000"),
    case(
        "gen-max-len-too-small",
        "workload alpaca --max-len 3 -o {ws}/out.jsonl",
        "--max-len: 3 leaves no room for a request",
    ),
    case("gen-unknown-name", "workload alpacca -o {ws}/out.jsonl", "unknown workload 'alpacca'"),
    case("gen-input-is-directory", "workload {ws}/d -o {ws}/out.jsonl", "{ws}/d: is a directory, not a workload file"),
    case(
        "gen-options-on-a-file",
        "workload {ws}/ok.jsonl --rate 3 -o {ws}/out.jsonl",
        "generator options (rate) apply only",
    ),
    # ---- summary
    case("summary-missing", "summary {ws}/nope.kvtrace", "{ws}/nope.kvtrace: no such file"),
    case("summary-markup-missing", "summary '{ws}/[bold]nope.kvtrace'", "{ws}/[bold]nope.kvtrace: no such file"),
    case("summary-not-a-trace", "summary {ws}/f.txt", "{ws}/f.txt"),
    case("summary-a-workload", "summary {ws}/ok.jsonl --json", "{ws}/ok.jsonl"),
    case("summary-directory", "summary {ws}/d", "{ws}/d"),
    case("summary-no-trace", "summary", "the following arguments are required: TRACE"),
    # ---- report
    case("report-over-its-trace", "report {ws}/t.kvtrace -o {ws}/t.kvtrace", "{ws}/t.kvtrace: is also an input"),
    case(
        "report-over-markup-trace", "report {ws}/t.kvtrace '{ws}/[bold]x.kvtrace' -o '{ws}/[bold]x.kvtrace'", "refusing"
    ),
    case("report-output-directory", "report {ws}/t.kvtrace -o {ws}/d", "{ws}/d: is a directory"),
    case("report-output-empty", "report {ws}/t.kvtrace -o ''", "is a directory"),
    case("report-output-under-a-file", "report {ws}/t.kvtrace -o {ws}/f.txt/r.html", "{ws}/f.txt is not a directory"),
    case("report-output-missing-dir", "report {ws}/t.kvtrace -o {ws}/nodir/r.html", "{ws}/nodir: no such directory"),
    case("report-output-full-disk", "report {ws}/t.kvtrace -o /dev/full", "/dev/full: writing failed: No space left"),
    case("report-missing-trace", "report {ws}/nope.kvtrace -o {ws}/r.html", "{ws}/nope.kvtrace: no such file"),
    # ---- export
    case("export-over-its-trace", "export {ws}/t.kvtrace -o {ws}/t.kvtrace", "refusing to overwrite"),
    case("export-output-empty", "export {ws}/t.kvtrace -o ''", "-o: empty path"),
    case("export-output-directory", "export {ws}/t.kvtrace -o {ws}/d", "{ws}/d: is a directory"),
    case("export-output-full-disk", "export {ws}/t.kvtrace -o /dev/full", "/dev/full: writing failed"),
    case("export-not-a-trace", "export {ws}/f.txt -o {ws}/e.json", "{ws}/f.txt"),
    case("export-format-unknown", "export {ws}/t.kvtrace --format csv", "argument --format: invalid choice: 'csv'"),
    # ---- demo
    case("demo-out-empty", "demo --device sim --out '' -q", "--out: empty path"),
    case("demo-out-a-file", "demo --device sim --out {ws}/f.txt -q", "{ws}/f.txt: is not a directory (--out)"),
    case("demo-out-under-a-file", "demo --device sim --out {ws}/f.txt/demo -q", "{ws}/f.txt is not a directory"),
    case(
        "demo-requests-zero",
        "demo --device sim --requests 0 --out {ws}/demo -q",
        "--requests: must be a positive integer",
    ),
    case(
        "demo-runs-unknown", "demo --device sim --runs paged-b17 --out {ws}/demo -q", "--runs: unknown run 'paged-b17'"
    ),
    case("demo-kv-memory-huge", "demo --device sim --kv-memory 99999999TiB --out {ws}/demo -q", "size too large"),
    case(
        "demo-max-len-zero", "demo --device sim --max-len 0 --out {ws}/demo -q", "--max-len: must be an integer in 1.."
    ),
    # ---- dashboard (checked before any server starts)
    case("dashboard-port-zero", "dashboard --port 0", "--port 0: must be between 1 and 65535"),
    case("dashboard-missing-trace", "dashboard {ws}/nope.kvtrace", "{ws}/nope.kvtrace: no such file"),
    case("dashboard-empty-dir", "dashboard {ws}/d", "{ws}/d: directory holds no .kvtrace file"),
]


# ------------------------------------------------------------------------------------------------ the workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Inputs every case may read: a good workload, a trace (also under a markup name), a plain file, an empty
    directory, a symlink to the workload, and the bad workload files."""
    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "ok.jsonl").write_text(line() + "\n" + line(id="r1", arrival=0.5) + "\n")
    (root / "f.txt").write_text("just text\n")
    (root / "d").mkdir()
    (root / "link.jsonl").symlink_to(root / "ok.jsonl")
    for name, content in WORKLOADS.items():
        path = root / f"bad-{name}.jsonl"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    trace = root / "t.kvtrace"
    assert cli.main(["run", "-w", str(root / "ok.jsonl"), "-q", "-o", str(trace)]) == 0
    shutil.copy(trace, root / "[bold]x.kvtrace")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root (links followed) -> sha256: a failed command must leave all of it as it was."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def expand(command: str, root: Path) -> list[str]:
    """The case's argv: split like a shell would, then the placeholders filled in (paths may hold spaces)."""
    words = shlex.split(command.replace("{sim}", SIM).replace("{digits}", MANY_DIGITS))
    return [w.replace("{ws}", str(root)) for w in words]


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------------ the table


def test_the_table_is_big_enough():
    assert len(CASES) >= 80
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.parametrize("bad", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2(bad: Case, ws: Path, capsys, monkeypatch):
    monkeypatch.chdir(ws)  # relative defaults (out/...) land in the workspace, where the snapshot sees them
    argv = expand(bad.command, ws)
    before, rss, start = snapshot(ws), max_rss_bytes(), time.perf_counter()
    rc = cli.main(argv)
    took, grew = time.perf_counter() - start, max_rss_bytes() - rss
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert "Traceback" not in captured.err, captured.err
    assert rc == 2, (rc, captured.err)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"kvscope {argv[0]}: error: "), lines[0]
    assert bad.needle.replace("{ws}", str(ws)) in lines[0], lines[0]
    assert snapshot(ws) == before, "a failed command created, changed or removed a file"
    assert took < MAX_SECONDS, took
    assert grew < MAX_RSS_GROWTH, f"max RSS grew by {grew / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------ under a memory limit

# The cases that used to allocate gigabytes (or more) before failing, plus ones sized to this limit: run in a child
# whose address space is capped, each must still end with its one-line refusal, not MemoryError or the OOM killer.
LIMITED = [
    case("kv-memory-99999999TiB", "{sim} --kv-memory 99999999TiB", "--kv-memory: size too large"),
    case("paged-1PiB", "{sim} --kv-memory 1PiB", "paged allocator: "),
    case("vmm-max-batch-1e8", "{sim} -a vmm --max-batch 100000000", "vmm allocator: "),
    case("vmm-slots", "{sim} -a vmm -m tiny --megacache --page-size 4KiB --max-len 1 --max-batch 100000000", "slots"),
    case("cpu-1TiB", "{sim} -d cpu --kv-memory 1TiB", "--kv-memory 1TiB on --device cpu needs about"),
    case("prompt-len-1e9", "run -w {ws}/bad-1e9-prompt-len.jsonl -q -o {ws}/out/x.kvtrace", "got 1000000000"),
    case("long-prompts", "run -w {ws}/long-prompts.jsonl -q -o {ws}/out/x.kvtrace", "token ids of its 1,000 requests"),
    case("requests-1e12", "workload sharegpt --requests 1000000000000 -o {ws}/out.jsonl", "--requests: must be"),
]


def run_limited(argv: list[str], address_space: int) -> tuple[int, str, int]:
    """`kvscope ARGV` under RLIMIT_AS -> (exit code, stderr, the child's own max RSS in bytes)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    env = {**os.environ, "PYTHONFAULTHANDLER": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from kvscope.cli import main; sys.exit(main(sys.argv[1:]))", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=limit,  # only setrlimit runs between fork and exec
        env=env,
    )
    err = proc.stderr.read().decode()
    proc.stderr.close()
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage, not all children's together
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return proc.returncode, err, usage.ru_maxrss * 1024


@pytest.mark.parametrize("bad", LIMITED, ids=[c.name for c in LIMITED])
def test_memory_fillers_are_refused_before_allocating(bad: Case, ws: Path, tmp_path):
    long_prompts = ws / "long-prompts.jsonl"
    if not long_prompts.exists():  # 1,000 valid requests whose prompt ids alone are 64 GiB: over the limit here
        rows = (line(id=f"r{i}", prompt_len=1 << 24, output_len=1) for i in range(1000))
        long_prompts.write_text("".join(row + "\n" for row in rows))
    argv = expand(bad.command, ws)
    rc, err, rss = run_limited(argv, CHILD_ADDRESS_SPACE)
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert bad.needle in lines[0] and "out of memory" not in lines[0], lines[0]
    assert rss < 1 << 30, f"the child peaked at {rss / 2**20:.0f} MiB"
    assert not (ws / "out").exists()


# ------------------------------------------------------------------------------------------------ markup is literal


def test_markup_in_a_trace_name_is_printed_literally(ws: Path, capsys):
    assert cli.main(["summary", str(ws / "[bold]x.kvtrace")]) == 0
    out = capsys.readouterr().out
    assert "[bold]x.kvtrace" in out


def test_markup_in_metadata_does_not_break_the_tables():
    """`[/]` used to raise MarkupError inside Rich; `[bold]` was applied. Both must come out as typed."""
    import pandas as pd
    from rich.console import Console

    from kvscope.commands.demo import comparison_table
    from kvscope.commands.summary import summary_table

    summary = {"label": "[/]", "model": "[bold]m", "device": "sim", "device_name": "[red]gpu[/red]", "steps": 3}
    console = Console(record=True, width=200)
    console.print(summary_table([summary], ["[/]x.kvtrace"]))
    frame = pd.DataFrame([{"label": "[/]run", "steps": 3}])
    console.print(comparison_table(frame))
    text = console.export_text()
    for literal in ("[/]", "[bold]m", "[red]gpu[/red]", "[/]x.kvtrace", "[/]run"):
        assert literal in text


def test_markup_in_the_demo_workload_name_is_printed_literally(ws: Path, tmp_path, capsys):
    workload = tmp_path / "[bold]w.jsonl"
    shutil.copy(ws / "ok.jsonl", workload)
    rc = cli.main(["demo", "--device", "sim", "--workload", str(workload), "--runs", "paged-b16",
                   "--out", str(tmp_path / "[red]demo"), "-q"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "[bold]w.jsonl requests" in out and "[red]demo" in out


# ------------------------------------------------------------------------------------------------ one upload limit


def test_the_upload_limit_is_one_constant_everywhere():
    """Streamlit's maxUploadSize (what `kvscope dashboard` passes) and the dashboard's own check are one number."""
    import argparse

    from kvscope.app import sources, state

    from kvscope.commands import dashboard

    args = argparse.Namespace(port=8501, address="localhost", no_browser=True, traces=[])
    cmd = dashboard.streamlit_command(args, "python")
    assert cmd[cmd.index("--server.maxUploadSize") + 1] == str(sources.MAX_UPLOAD_MB) == "200"
    assert state.MAX_UPLOAD_BYTES == sources.MAX_UPLOAD_BYTES == 200 * 10**6
    assert state._megabytes(state.MAX_UPLOAD_BYTES) == "200 MB"


# ------------------------------------------------------------------------------------------------ permissions


def test_an_unwritable_directory_is_one_line():
    """A directory its user may read but not write (0o500 for its owner; 0o555 here, so that nobody, as whom root
    runs the command through setpriv since root writes anywhere, sees it the way its owner would)."""
    import tempfile

    as_nobody: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: no way to be refused a write")
        as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    top = Path(tempfile.mkdtemp(prefix="kvscope-ro-"))  # not under pytest's 0700 tmp dir: nobody must reach it
    locked = top / "locked"
    try:
        locked.mkdir()
        locked.chmod(0o555)
        top.chmod(0o755)
        code = "import sys; from kvscope.cli import main; sys.exit(main(sys.argv[1:]))"
        argv = ["workload", "alpaca", "--requests", "3", "-o", str(locked / "a.jsonl")]
        proc = subprocess.run([*as_nobody, sys.executable, "-c", code, *argv], capture_output=True, text=True)
        if "Permission denied" in proc.stderr and "kvscope" not in proc.stderr:
            pytest.skip("nobody cannot read this checkout")
        assert proc.returncode == 2, proc.stderr
        want = f"kvscope workload: error: {locked / 'a.jsonl'}: cannot create files in {locked}"
        assert proc.stderr.splitlines() == [want]
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
        shutil.rmtree(top)
