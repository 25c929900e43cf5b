#!/usr/bin/env bash
# Create .venv and install kvscope with its test tools. Safe to run again (it only installs what is missing).
# torch is pinned: an unpinned torch would pull a multi-GB CUDA build on a machine that has no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" "triton==3.7.1" numpy
.venv/bin/python -m pip install -q -e ".[dev,ray,hf]"
echo "kvscope installed in .venv ($(.venv/bin/kvscope --version))"
