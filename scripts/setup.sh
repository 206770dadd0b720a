#!/usr/bin/env bash
# Installs the runtime and test dependencies into the current Python.
# A CPU build of torch is enough here; an existing torch >= 2.7.1 is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import torch" 2>/dev/null; then
  # Prefer the local CPU wheel where the machine has one (a plain 'torch' is a multi-GB
  # CUDA build); otherwise take what the package index serves.
  python3 -m pip install -q torch==2.13.0 2>/dev/null || python3 -m pip install -q "torch>=2.7.1"
fi
python3 -m pip install -q -r requirements.txt -r requirements-dev.txt
