#!/usr/bin/env bash
# The one prepared GPU check (../shared/GPU.md): versions, `pytest -m gpu`, then every benchmark as
# "ours vs reference in the same run". Results go to $OUT (JSON, at most 8 files) and a short table
# is printed last. Runs with or without DALI (staged into /tmp/site by the README's steps).
#
# Usage on the GPU machine, from the repo root:   OUT=/some/dir bash benchmarks/device_suite.sh [--fast]
# Budget: ~8 minutes in all; each step has its own time limit so one hang cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
FAST=${1:-}

# DALI travels in parts (GPU.md); unpack them when present and not yet unpacked.
if [ -d /tmp/dali-parts ] && [ ! -d /tmp/site/nvidia/dali ]; then
  mkdir -p /tmp/site && cat /tmp/dali-parts/part-* | xz -d | tar -x -C /tmp/site
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

# The GPU machine has no network and nothing installed from this repo: import fastmeal from a shadow
# tree laid out as the installed package (kernels/ becomes fastmeal/kernels, as pyproject maps it).
SHADOW=$(mktemp -d)
cp -r fastmeal "$SHADOW/fastmeal" && cp -r kernels "$SHADOW/fastmeal/kernels"
export PYTHONPATH=$SHADOW:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

step() {  # step NAME LIMIT_S CMD...: run one step under a time limit, log to $OUT/suite.log
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) ===" | tee -a "$OUT/suite.log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/suite.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0))s ===" | tee -a "$OUT/suite.log"
  STATUS+=("$name rc=$rc $((SECONDS - t0))s")
}
STATUS=()

step versions 60 bash -c "nvidia-smi; $PY - <<'PY'
import importlib
for name in ('torch', 'triton', 'timm', 'torchvision', 'numpy', 'nvidia.dali'):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        print(name, 'absent' if name != 'nvidia.dali' else 'DALI absent', type(err).__name__)
import torch; print('cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')
PY"

step pytest-gpu 240 $PY -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" tests

DATA=/tmp/fastmeal-bench-data
if [ ! -d "$DATA/train" ]; then
  step synth 120 $PY -m fastmeal data synth "$DATA" --classes 10 --train-per-class 100 --val-per-class 20 \
    --size-range 375 500 --seed 0 --no-progress
fi

QUICK=""
[ "$FAST" = "--fast" ] && QUICK="--quick"
[ -f benchmarks/bench_kd_loss.py ] && step bench_kd_loss 90 $PY benchmarks/bench_kd_loss.py $QUICK --json "$OUT/kd_loss.json"
[ -f benchmarks/bench_loader.py ] && step bench_loader 120 $PY benchmarks/bench_loader.py --data "$DATA" --json "$OUT/loader.json"
[ -f benchmarks/bench_teachers.py ] && step bench_teachers 150 $PY benchmarks/bench_teachers.py $QUICK --json "$OUT/teachers.json"
[ -f benchmarks/bench_train_step.py ] && step bench_train_step 200 $PY benchmarks/bench_train_step.py $QUICK --data "$DATA" --json "$OUT/train_step.json"

echo
echo "=== fastmeal device suite summary ($(date -u +%FT%TZ)) ==="
printf '%s\n' "${STATUS[@]}"
$PY benchmarks/summarize.py "$OUT" 2>/dev/null || true
rm -rf "$SHADOW"
