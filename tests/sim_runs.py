"""A small simulated run recorded through `kvscope run`'s own parser and code, for the surface tests."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvscope.commands import run as run_cmd


def record(path: Path, *options: str) -> Path:
    """`kvscope run OPTIONS --device sim --quiet -o PATH`, asserting it succeeds; returns PATH."""
    parser = argparse.ArgumentParser()
    run_cmd.add_parser(parser)
    assert run_cmd.run(parser.parse_args([*options, "--device", "sim", "--quiet", "-o", str(path)])) == 0
    return path
