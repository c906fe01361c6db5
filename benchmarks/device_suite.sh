#!/usr/bin/env bash
# The one prepared GPU check (../shared/GPU.md): versions, `pytest -m gpu`, then every benchmark as
# "ours vs reference in the same run". Results go to $OUT (at most 8 files: suite.log, pytest_gpu.xml and
# one JSON per benchmark) and a short table is printed last. Runs with or without DALI (staged as parts
# in /tmp/dali-parts, see GPU.md) and without a GPU at all (the GPU rows are then skipped or labelled
# CPU smoke runs, which is how this script is checked on CPU machines).
#
# Usage, from the repo root:   OUT=/some/dir bash benchmarks/device_suite.sh [--fast]
#   --fast          quick sizes everywhere (a smoke run of the suite itself, e.g. on a CPU)
#   PYTHON=...      the interpreter (default python3)
#   SUITE_BUDGET_S  the whole suite's time budget in seconds (default 460: the GPU machine allows ~8 minutes)
#
# Budget: every step has its own limit and the steps together never exceed SUITE_BUDGET_S, so one hang cannot
# eat the rest; the headline benchmark (bench_train_step) runs first among the benchmarks and is told its own
# deadline so that it writes its JSON before it is stopped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
: > "$OUT/suite.log"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TOTAL_S=${SUITE_BUDGET_S:-460}
FAST=""
case "${1:-}" in
  --fast) FAST=1 ;;
  "") ;;
  *) echo "usage: OUT=DIR bash benchmarks/device_suite.sh [--fast]" >&2; exit 2 ;;
esac
QUICK=${FAST:+--quick}

STATUS=()
LIMIT=0
budget() {  # budget WANT_S: sets LIMIT to min(WANT_S, what is left of the suite's budget)
  local left=$((TOTAL_S - SECONDS))
  LIMIT=$(($1 < left ? $1 : left))
}
step() {  # step NAME CMD...: run CMD under $LIMIT seconds (set by `budget`), log to $OUT/suite.log
  local name=$1; shift
  if [ "$LIMIT" -lt 15 ]; then
    echo "=== $name: SKIPPED, the suite's ${TOTAL_S}s budget is spent ===" | tee -a "$OUT/suite.log"
    STATUS+=("$name: skipped (budget spent)")
    return
  fi
  echo "=== $name (limit ${LIMIT}s, ${SECONDS}s into the suite) ===" | tee -a "$OUT/suite.log"
  local t0=$SECONDS
  timeout --kill-after=10 "$LIMIT" "$@" 2>&1 | tee -a "$OUT/suite.log"
  local rc=${PIPESTATUS[0]}
  local verdict=ok
  [ "$rc" -ne 0 ] && verdict="FAILED rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT after ${LIMIT}s"
  echo "=== $name: $verdict in $((SECONDS - t0))s ===" | tee -a "$OUT/suite.log"
  STATUS+=("$name: $verdict ($((SECONDS - t0))s)")
}

# DALI travels in parts (GPU.md); unpack them when present and not yet unpacked.
if [ -d /tmp/dali-parts ] && [ ! -d /tmp/site/nvidia/dali ]; then
  budget 120
  step dali-unpack bash -c 'mkdir -p /tmp/site && cat /tmp/dali-parts/part-* | xz -d | tar -x -C /tmp/site'
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

# The GPU machine has nothing installed from this repo: import fastmeal from a shadow tree laid out as the
# installed package (kernels/ becomes fastmeal/kernels, as pyproject maps it).
SHADOW=$(mktemp -d)
trap 'rm -rf "$SHADOW"' EXIT
cp -r fastmeal "$SHADOW/fastmeal" && cp -r kernels "$SHADOW/fastmeal/kernels"
export PYTHONPATH=$SHADOW:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}

budget 45
step versions bash -c "if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo 'nvidia-smi absent (no NVIDIA driver)'; fi
$PY - <<'PY'
import importlib
for name in ('torch', 'triton', 'timm', 'torchvision', 'numpy', 'nvidia.dali'):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        print(name, 'absent' if name != 'nvidia.dali' else 'DALI absent', type(err).__name__)
import os, torch
print('cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA', '| cpus', os.cpu_count())
PY"

budget 150
step pytest-gpu $PY -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" tests

# One JPEG set for every benchmark that reads files: ImageNet-like sizes (short side 375-500 px, quality 90,
# 1000 classes, train and val; GPU.md), made once per machine by bench_train_step's generator (parallel
# synthesis, hard-linked train copies).
DATA=/tmp/fastmeal-bench-data${FAST:+-quick}
budget 120
step data $PY benchmarks/bench_train_step.py $QUICK --data "$DATA" --prepare-data-only

# The headline first: the whole step, reference vs fastmeal. It stops starting runs 60s before its limit.
if [ -f benchmarks/bench_train_step.py ]; then
  budget 210
  step bench_train_step $PY benchmarks/bench_train_step.py $QUICK --data "$DATA" --json "$OUT/train_step.json" \
    --budget-s $((LIMIT > 90 ? LIMIT - 60 : 30))
fi
if [ -f benchmarks/bench_teachers.py ]; then
  budget 150
  step bench_teachers $PY benchmarks/bench_teachers.py $QUICK --json "$OUT/teachers.json" \
    --budget-s $((LIMIT > 50 ? LIMIT - 25 : 25))
fi
if [ -f benchmarks/bench_kd_loss.py ]; then
  budget 60
  step bench_kd_loss $PY benchmarks/bench_kd_loss.py $QUICK --json "$OUT/kd_loss.json"
fi
if [ -f benchmarks/bench_loader.py ]; then
  # Its default is an epoch per repeat; a few batches per repeat keep it inside its minute (GPU.md budget).
  if [ -n "$FAST" ]; then
    LOADER_ARGS=(--batch 8 --image-size 64 --workers 1 --warmup 1 --batches 2 --repeats 2)
  else
    LOADER_ARGS=(--warmup 4 --batches 16 --repeats 3)
  fi
  budget 75
  step bench_loader $PY benchmarks/bench_loader.py --data "$DATA" "${LOADER_ARGS[@]}" --json "$OUT/loader.json"
fi

echo
$PY benchmarks/summarize.py "$OUT" || true
echo
echo "=== fastmeal device suite summary ($(date -u +%FT%TZ), ${SECONDS}s of ${TOTAL_S}s) ==="
printf '  %s\n' "${STATUS[@]}"
if [ -f "$OUT/train_step.json" ]; then
  $PY benchmarks/bench_train_step.py --summary "$OUT/train_step.json" || true
fi
