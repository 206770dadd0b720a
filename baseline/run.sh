#!/usr/bin/env bash
# The official baseline's configuration on this project's code (see baseline/README.md).
# It runs ../run.sh and switches the seed's additions off again with their --no_* twins;
# flags given here are passed through and win.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BASELINE_FLAGS=(
  --experiment_name official_baseline
  --no_abs_time_emb --time_zone_offset_hours 0 --no_user_activity_dense
  --no_pair_62_66 --no_bf16_train
  --num_epochs 999 --patience 5
)
exec env DEMO_OUT="${DEMO_OUT:-$HERE/../outputs/demo_baseline}" \
  bash "$HERE/../run.sh" "${BASELINE_FLAGS[@]}" "$@"
