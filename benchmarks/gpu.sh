#!/usr/bin/env bash
# The GPU checks of issue 14 in one prepared run, for a machine with one CUDA GPU:
#   1. end to end: `ckptinit rescale resnet50 --images 1024 --data FOLDER` (the < 15 s goal)
#   2. the GPU tests (tests/test_device.py and tests/data/test_batches.py run their CUDA cases)
#   3. host syncs and CPU/GPU exactness (benchmarks/gpu_checks.py syncs)
#   4. end to end: vit_small_patch16_224 --images 1024
#   5. benchmarks/speed.py on CUDA (forward, lsuv, process, memory sections)
# then writes the figures, with the card's name, between the gpu markers of
# benchmarks/README.md (and into $RES/README.md).
#
#   bash benchmarks/gpu.sh                     # results in benchmarks/results/gpu/
#   DEADLINE=400 RUNS=2 bash benchmarks/gpu.sh # stop starting new steps after 400 s
#   DEVICE=cpu E2E_IMAGES=32 FOLDER_COUNT=200 SPEED_ARGS="--sections forward \
#     --forward-models resnet18 --images 16 --size 64" bash benchmarks/gpu.sh  # dry run, no GPU
#
# Through the device tool: run(command="bash benchmarks/gpu.sh", timeout_s=600). $OUT is then
# the results folder; its README.md, gpu.md, *.json and gpu.log come back: copy README.md
# over benchmarks/README.md. Every step has its own time limit and the README is written
# even when a step fails or the deadline stops the rest, so one run always yields figures.
# The image folder (4112 JPEG crops of the sample photos) is made in /tmp on the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY="${PY:-python3}"
RES="${OUT:-benchmarks/results/gpu}"
RUNS="${RUNS:-2}"
DEADLINE="${DEADLINE:-480}"   # seconds after which no new step starts
HARD="${HARD:-570}"           # seconds by which every step has ended (the tool allows 600)
DEVICE="${DEVICE:-cuda}"
E2E_IMAGES="${E2E_IMAGES:-1024}"
FOLDER_COUNT="${FOLDER_COUNT:-4112}"  # --images 4096 + 16 held out
SPEED_ARGS="${SPEED_ARGS:---sections forward,lsuv,process,memory}"
IMAGES="${IMAGES_DIR:-/tmp/ckptinit-bench-images}"
mkdir -p "$RES"
LOG="$RES/gpu.log"
: > "$LOG"
START=$(date +%s)

step() {  # step NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local now=$(( $(date +%s) - START ))
  local left=$(( HARD - now - 15 ))
  (( limit > left )) && limit=$left
  if (( now > DEADLINE || limit < 20 )); then
    echo "== $name: skipped (at ${now}s; deadline ${DEADLINE}s, hard end ${HARD}s)" | tee -a "$LOG"
    return 0
  fi
  echo "== $name (limit ${limit}s, at ${now}s)" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: rc=${PIPESTATUS[0]} after $(( $(date +%s) - START ))s" | tee -a "$LOG"
}

finish() {
  echo "== write" | tee -a "$LOG"
  "$PY" benchmarks/gpu_checks.py write "$RES" >> "$LOG" 2>&1 || echo "write failed" >> "$LOG"
  cp benchmarks/README.md "$RES/README.md" 2>/dev/null || true
}
trap finish EXIT

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
"$PY" - "$RES/machine.json" "$DEVICE" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
sys.path.insert(0, "benchmarks")
import _bench as B
import torch
cuda = torch.cuda.is_available()
info = B.machine("cuda" if cuda else "cpu")
open(sys.argv[1], "w").write(json.dumps(info))
print(info)
if not cuda and sys.argv[2] != "cpu":
    sys.exit("no CUDA device: nothing to measure here (DEVICE=cpu for a dry run)")
EOF
[[ ${PIPESTATUS[0]} -eq 0 ]] || exit 1

step folder 180 "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import _bench as B; \
from pathlib import Path; print(B.make_image_folder(Path('$IMAGES'), $FOLDER_COUNT))"
step e2e_resnet50 240 "$PY" benchmarks/gpu_checks.py e2e resnet50 --images "$E2E_IMAGES" \
  --data "$IMAGES" --device "$DEVICE" --timeout 210 --json "$RES/e2e_resnet50.json"
step tests 240 bash -c "set -o pipefail; '$PY' -m pytest -q -p no:cacheprovider -rs \
  tests/test_device.py tests/data/test_batches.py 2>&1 | tee '$RES/tests.txt'"
[[ $DEVICE == cpu ]] || step syncs 240 "$PY" benchmarks/gpu_checks.py syncs \
  --json "$RES/syncs.json"
step e2e_vit 300 "$PY" benchmarks/gpu_checks.py e2e vit_small_patch16_224 \
  --images "$E2E_IMAGES" --data "$IMAGES" --device "$DEVICE" --timeout 260 \
  --json "$RES/e2e_vit_small.json"
# shellcheck disable=SC2086  # SPEED_ARGS is a list of options
step speed 420 "$PY" benchmarks/speed.py --device "$DEVICE" --runs "$RUNS" --folder "$IMAGES" \
  --timeout 240 $SPEED_ARGS --json "$RES/speed.json" --markdown "$RES/speed.md"
