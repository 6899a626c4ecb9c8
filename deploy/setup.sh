#!/usr/bin/env bash
# Install fedrad into ./.venv (Python 3.11, pip; torch/torchvision pins come from the local wheel cache
# where the machine has one). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# torch first: the largest download/copy, and timm/opacus must see this exact build.
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/fedrad --version
