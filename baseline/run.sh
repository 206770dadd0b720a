#!/usr/bin/env bash
# The official baseline's configuration on this project's code (see baseline/README.md).
# It runs ../run.sh with the 'baseline' preset of pcvr/config.py (the seed's additions
# switched off again, 999 epochs with early stopping); flags given here are passed through
# and win.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
exec env PRESET=baseline DEMO_OUT="${DEMO_OUT:-$HERE/../outputs/demo_baseline}" \
  bash "$HERE/../run.sh" "$@"
