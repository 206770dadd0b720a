#!/usr/bin/env bash
# Installs the runtime and test dependencies into the current Python.
# A CPU build of torch is enough here; an existing torch >= 2.7.1 is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch" 2>/dev/null; then
  # Prefer the CPU wheel (a plain 'torch' from PyPI is a multi-GB CUDA build).
  python3 -m pip install -q torch==2.13.0 2>/dev/null \
    || python3 -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
    || python3 -m pip install -q torch
fi
python3 -m pip install -q -r requirements.txt -r requirements-dev.txt
