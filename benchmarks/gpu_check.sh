#!/usr/bin/env bash
# One prepared check of the GPU path (issue 13), under 8 minutes:
#   1. the tests that need CUDA (a bf16 train step with no host sync, CUDA vs CPU predictions);
#   2. bf16 training at batch 256: samples/s, peak GPU memory, ratio to the bf16 ceiling, and
#      the loader-fed speed over the compute-only speed (goal >= 0.9 with the platform's 9
#      cores: the loader keeps up with the GPU);
#   3. float32 inference: rows/s end to end and forward only, ratio to the float32 ceiling;
#   4. on CUDA, --compile with fixed history shapes (torch.compile on the GPU step).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU
#   bash benchmarks/gpu_check.sh --device cpu    # the same script on the CPU (CUDA hidden)
#
# Each step's figures are printed as it ends and again in a summary; a step that fails or
# runs out of its time is reported and the next one runs. The demo data is generated on the
# first run (cached under .demo_data/).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
DEVICE=cuda
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    *) echo "usage: $0 [--device cuda|cpu]" >&2; exit 2 ;;
  esac
done
if [[ "$DEVICE" == cpu ]]; then
  export CUDA_VISIBLE_DEVICES=""  # infer.py and the tests take CUDA whenever they see it
  STEPS=4; WARMUP=1; TRAIN_TIMEOUT=360; INFER_ROWS=2048
else
  STEPS=30; WARMUP=5; TRAIN_TIMEOUT=150; INFER_ROWS=8192
fi
CPUS=$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))')
WORKERS=$(( CPUS - 1 < 8 ? CPUS - 1 : 8 )); (( WORKERS < 1 )) && WORKERS=1
LOG="$(mktemp -d)"
START=$SECONDS
summary=()

step() {  # step NAME TIMEOUT_S CMD...: runs CMD, keeps its output, notes its figures
  local name="$1" limit="$2"; shift 2
  echo "=== $name ($(( SECONDS - START )) s so far)"
  timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log" | grep -v -i "warn" | tail -n 40
  local rc=${PIPESTATUS[0]}
  local figures
  figures=$(grep -E '^(samples_per_s|peak_rss_gb|peak_gpu_memory_gb|train_dtype|ratio_to_ceiling|rows_per_s|fp32_ceiling_rows_per_s|forward_ratio_to_ceiling|pipeline_ratio) ' "$LOG/$name.log" | tr '\n' ' ')
  figures+=$(grep -oE 'loader_ratio [0-9.]+|[0-9]+ passed|[0-9]+ skipped|[0-9]+ failed' "$LOG/$name.log" | tr '\n' ' ')
  if [[ $rc == 124 ]]; then figures+="(timed out after ${limit} s)"; elif [[ $rc != 0 ]]; then figures+="(failed, exit $rc)"; fi
  summary+=("$name: $figures")
}

echo "=== machine"
"$PY" -c "import sys; sys.path.insert(0, '$HERE'); from common import machine_line; print(machine_line())"
command -v nvidia-smi >/dev/null && [[ "$DEVICE" != cpu ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
uptime

cd "$ROOT"
step tests 120 "$PY" -m pytest -q -rs tests/test_speed_rules.py
step train_bf16_b256 "$TRAIN_TIMEOUT" "$PY" "$HERE/bench_train.py" --device "$DEVICE" \
  --batch_size 256 --steps "$STEPS" --warmup "$WARMUP" --loader_workers "$WORKERS" \
  --extra "--train_precision bf16"
step infer_fp32 150 "$PY" "$HERE/bench_infer.py" --device "$DEVICE" --rows "$INFER_ROWS" \
  --num_workers "$WORKERS"
if [[ "$DEVICE" != cpu ]]; then
  step train_bf16_b256_compile 150 "$PY" "$HERE/bench_train.py" --device "$DEVICE" \
    --batch_size 256 --steps "$STEPS" --warmup "$WARMUP" \
    --extra "--train_precision bf16 --compile --seq_pad_multiple 4096"
fi

echo "=== summary (device $DEVICE, $WORKERS loader workers, $(( SECONDS - START )) s)"
for line in "${summary[@]}"; do echo "$line"; done
uptime
