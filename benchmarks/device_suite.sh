#!/usr/bin/env bash
# The one prepared GPU check: versions, `pytest -m gpu`, then every benchmark as "ours vs reference in the
# same run". Results go to $OUT (at most 8 files: suite.log, suite_status.json, pytest_gpu.xml and one JSON per
# benchmark) and a short table is printed last. Runs with or without DALI (staged as parts in /tmp/dali-parts)
# and without a GPU at all (GPU tests are then skipped and the benchmarks label themselves CPU smoke runs, which
# is how benchmarks/emulate_device.sh checks this script on a CPU machine).
#
# Usage, from anywhere:   OUT=/some/dir bash benchmarks/device_suite.sh [--fast]
#   --fast            quick sizes everywhere (a smoke run of the suite itself, e.g. on a CPU)
#   PYTHON=...        the interpreter (default python3); fastmeal need not be installed
#   SUITE_BUDGET_S    the whole suite's time budget in seconds (default 460: a GPU machine run allows ~8 minutes)
#   FASTMEAL_COMMIT   the commit to record when the tree is a plain copy without .git
#   SUITE_SLOW=STEP   simulate a step that hangs (it must time out and every other step still report)
#   SUITE_FAKE=1      every step just sleeps briefly (tests the scheduling itself in a few seconds)
#   SUITE_BREAK_COMPILE=1  make the train-step benchmark's compiled step fail (Inductor's own testing switch): its
#                     fastmeal rows must come out FAILED with the cause, never as a speed
#
# The machine runs a plain copy of the repo: nothing is installed, and `python -m` puts the working directory
# first on sys.path, where `fastmeal/` has no `kernels/` (pyproject maps the top-level kernels/ into the
# package). So every command runs from a shadow copy laid out as the installed package (kernels/ inside
# fastmeal/), and that copy is first on PYTHONPATH too, for scripts run by path.
#
# Budget: the steps are one table below, in order of value. Each step has WANT seconds (what it gets when the
# budget allows) and MIN seconds (the least it may start with). A step starts with
# min(WANT, what is left - the MINs of the steps after it), so whatever an earlier step does, every later step
# still gets at least its MIN, and no step can overrun the suite: its command gets SIGTERM 5 s before its limit
# and SIGKILL at it, and the benchmarks are told a deadline earlier still, so that they write their JSON (after
# every row) first.
# WANT and MIN are scaled by SUITE_BUDGET_S / 460. To add a step, add a row and a run_<name> function.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/benchmarks/results/device}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
: > "$OUT/suite.log"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET_S=${SUITE_BUDGET_S:-460}
FAST=""
case "${1:-}" in
  --fast) FAST=1 ;;
  "") ;;
  *) echo "usage: OUT=DIR bash benchmarks/device_suite.sh [--fast]" >&2; exit 2 ;;
esac
QUICK=${FAST:+--quick}

# --------------------------------------------------------------------------------------------------------
# The steps, in order of value (name, WANT s, MIN s at the default 460 s budget). Sum of WANT <= 450 but for the
# last row, which takes what is left.
# --------------------------------------------------------------------------------------------------------
STEPS=(
  "versions          25  10"
  "pytest-gpu       110  45"
  "data              45  20"
  "bench_train_step 150  70"
  "bench_teachers    55  30"
  "bench_kd_loss     35  20"
  "bench_loader      30  15"
  "bench_bank_build  45  20"
)
RESERVE_S=10  # kept back for the summary at the end

now_ms() { date +%s%3N; }
T0=$(now_ms)
SCALE_PERMILLE=$((BUDGET_S * 1000 / 460))
scaled_ms() { echo $(($1 * SCALE_PERMILLE)); }  # seconds at the 460 s budget -> ms at this budget
secs() { printf '%d.%d' $(($1 / 1000)) $((($1 % 1000) / 100)); }  # ms -> "S.d"
log() { echo "$*" | tee -a "$OUT/suite.log"; }

FASTMEAL_COMMIT=${FASTMEAL_COMMIT:-}
if [ -z "$FASTMEAL_COMMIT" ] && git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
  FASTMEAL_COMMIT=$(git -C "$REPO" rev-parse HEAD)
  [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ] && FASTMEAL_COMMIT="$FASTMEAL_COMMIT-dirty"
fi
export FASTMEAL_COMMIT=${FASTMEAL_COMMIT:-unknown}

# DALI travels in parts; unpack them when present and not yet unpacked (outside the step table: it is not a
# measurement, and what it takes shrinks the later steps).
if [ -z "${SUITE_FAKE:-}" ] && [ -d /tmp/dali-parts ] && [ ! -d /tmp/site/nvidia/dali ]; then
  log "=== dali-unpack ==="
  timeout 150 bash -c 'mkdir -p /tmp/site && cat /tmp/dali-parts/part-* | xz -d | tar -x -C /tmp/site' 2>&1 \
    | tee -a "$OUT/suite.log"
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

SHADOW_PARENT=$(mktemp -d)
trap 'rm -rf "$SHADOW_PARENT"' EXIT
SHADOW=$SHADOW_PARENT/repo
mkdir -p "$SHADOW"
cp -r fastmeal tests benchmarks pyproject.toml "$SHADOW"/ && cp -r kernels "$SHADOW/fastmeal/kernels"
rm -rf "$SHADOW/benchmarks/results"
cd "$SHADOW"
export PYTHONPATH=$SHADOW${PYTHONPATH:+:$PYTHONPATH}
DATA=/tmp/fastmeal-bench-data${FAST:+-quick}

# --------------------------------------------------------------------------------------------------------
# One function per step; $LIMIT_S is the step's limit in seconds, $DEADLINE_S what a benchmark is told.
# --------------------------------------------------------------------------------------------------------
run_versions() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo 'nvidia-smi absent (no NVIDIA driver)'; fi
  "$PY" - <<'PY'
import importlib
import os

for name in ('torch', 'triton', 'timm', 'torchvision', 'numpy', 'nvidia.dali'):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        print(name, 'absent' if name != 'nvidia.dali' else 'DALI absent', type(err).__name__)
import torch

import fastmeal
import fastmeal.kernels

print('cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA',
      '| cpus', os.cpu_count(), '| fastmeal from', os.path.dirname(fastmeal.__file__),
      '| commit', os.environ.get('FASTMEAL_COMMIT'))
PY
}

run_pytest_gpu() {
  # --continue-on-collection-errors: a file that fails to import is reported, the other files still run.
  # -v: one line per test as it finishes, so a step killed at its limit still shows what passed (tests/conftest.py
  # also ends the session on the limit's SIGTERM as on Ctrl-C, so that pytest's summary and XML are written, and
  # runs the tests that decide what we ship first). --durations: the cold compile/capture costs, per test.
  "$PY" -m pytest -v -m gpu -p no:cacheprovider --continue-on-collection-errors --durations=15 \
    --junitxml="$OUT/pytest_gpu.xml" tests
}

run_data() {
  # One JPEG set for every benchmark that reads files: ImageNet-like sizes (short side 375-500 px, quality 90,
  # 1000 classes, train and val), made once per machine by bench_train_step's generator.
  "$PY" benchmarks/bench_train_step.py $QUICK --data "$DATA" --prepare-data-only
}

run_bench_train_step() {
  # A fastmeal row whose compiled step fell back to eager is FAILED (exit status 1), with the cause in the JSON.
  "$PY" benchmarks/bench_train_step.py $QUICK --data "$DATA" --json "$OUT/train_step.json" --budget-s "$DEADLINE_S" \
    ${SUITE_BREAK_COMPILE:+--inject-compile-error}
}

run_bench_teachers() {
  "$PY" benchmarks/bench_teachers.py $QUICK --json "$OUT/teachers.json" --budget-s "$DEADLINE_S"
}

run_bench_kd_loss() {
  # The loss's share of the whole step comes from the train-step result of this same run.
  "$PY" benchmarks/bench_kd_loss.py $QUICK --json "$OUT/kd_loss.json" --budget-s "$DEADLINE_S" \
    --train-step-json "$OUT/train_step.json"
}

run_bench_loader() {
  # Its default is an epoch per repeat; a few batches per repeat keep it inside its limit. With DALI on a GPU it
  # also measures the hardware-decoder shares around data.dali_hw_decoder_load's default (0.9).
  local args=(--warmup 4 --batches 16 --repeats 3 --hw-decoder-loads 0.65 1.0)
  [ -n "$FAST" ] && args=(--batch 8 --image-size 64 --workers 1 --warmup 1 --batches 2 --repeats 2)
  "$PY" benchmarks/bench_loader.py --data "$DATA" "${args[@]}" --json "$OUT/loader.json"
}

# Soft-label bank (issue 13): the build's crops/s next to the online step in the same run. (The bank-mode
# training step is a mode of bench_train_step; the sparse-target kernel's GPU tests are in pytest-gpu.)
run_bench_bank_build() {
  "$PY" benchmarks/bench_bank_build.py $QUICK --data "$DATA" --json "$OUT/bank_build.json"
}

# --------------------------------------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------------------------------------
NAMES=(); WANTS=(); MINS=()
for row in "${STEPS[@]}"; do
  read -r name want min <<< "$row"
  NAMES+=("$name"); WANTS+=("$(scaled_ms "$want")"); MINS+=("$(scaled_ms "$min")")
done
STATUS=()
STATUS_JSON=()
FAILED=0
record() {  # record NAME VERDICT SECONDS LIMIT [TESTS]
  STATUS+=("$1: $2 ($3s of $4s)${5:+; $5}")
  STATUS_JSON+=("{\"step\": \"$1\", \"verdict\": \"$2\", \"seconds\": $3, \"limit_s\": $4, \"tests\": \"${5:-}\"}")
}
tests_ran() {  # tests_ran LOG: the outcomes of the tests a pytest -v step finished, even if it was cut at its limit
  local counts last
  counts=$(grep -oE '^tests/[^ ]+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)' "$1" | awk '{print $2}' | sort | uniq -c \
    | awk '{printf "%s%d %s", sep, $1, tolower($2); sep=", "}')
  last=$(grep -oE '^tests/[^ ]+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)' "$1" | tail -n 1 | awk '{print $1}')
  echo "ran: ${counts:-none}${last:+; last finished: $last}"
}
STEP_LOG=$SHADOW_PARENT/step.log

for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  later_min=0
  for ((j = i + 1; j < ${#NAMES[@]}; j++)); do later_min=$((later_min + MINS[j])); done
  left=$((BUDGET_S * 1000 - RESERVE_S * SCALE_PERMILLE - ($(now_ms) - T0)))
  limit=$((WANTS[i] < left - later_min ? WANTS[i] : left - later_min))
  if [ "$limit" -lt "${MINS[$i]}" ]; then
    log "=== $name: SKIPPED, only $(secs $((left > 0 ? left : 0)))s of the suite's ${BUDGET_S}s budget left ==="
    record "$name" "skipped: budget spent" 0 "$(secs $((limit > 0 ? limit : 0)))"
    FAILED=1
    continue
  fi
  LIMIT_S=$(secs "$limit")
  # SIGTERM at TERM_S, SIGKILL KILL_S later (at the limit at the latest); benchmarks stop starting work at
  # DEADLINE_S, 85% of TERM_S, so that their JSON is written before either.
  kill_ms=$((5 * SCALE_PERMILLE))
  TERM_S=$(secs $((limit - kill_ms))); KILL_S=$(secs "$kill_ms")
  DEADLINE_S=$(secs $(((limit - kill_ms) * 85 / 100)))
  log "=== $name (limit ${LIMIT_S}s, $(secs $(($(now_ms) - T0)))s into the suite) ==="
  t0=$(now_ms)
  : > "$STEP_LOG"
  if [ "$name" = "${SUITE_SLOW:-}" ]; then
    cmd=(bash -c 'echo "simulated slow step: sleeping until killed"; exec sleep 100000')
  elif [ -n "${SUITE_FAKE:-}" ]; then
    cmd=(sleep 0.1)
  else
    cmd=("run_${name//-/_}")
  fi
  if [ "${cmd[0]}" = "run_${name//-/_}" ]; then
    # A function cannot be given to `timeout`: run it in a child bash that has the functions and variables.
    export -f "${cmd[0]}"
    export PY OUT QUICK FAST DATA DEADLINE_S SUITE_BREAK_COMPILE
    timeout --kill-after="$KILL_S" "$TERM_S" bash -c "${cmd[0]}" 2>&1 | tee -a "$OUT/suite.log" "$STEP_LOG"
  else
    timeout --kill-after="$KILL_S" "$TERM_S" "${cmd[@]}" 2>&1 | tee -a "$OUT/suite.log" "$STEP_LOG"
  fi
  rc=${PIPESTATUS[0]}
  took=$(secs $(($(now_ms) - t0)))
  verdict=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    verdict="TIMED OUT after ${LIMIT_S}s"
  elif [ "$rc" -ne 0 ]; then
    verdict="FAILED rc=$rc"
  fi
  [ "$verdict" != ok ] && FAILED=1
  tests=""
  [ "$name" = pytest-gpu ] && tests=$(tests_ran "$STEP_LOG")
  log "=== $name: $verdict in ${took}s${tests:+ ($tests)} ==="
  record "$name" "$verdict" "$took" "$LIMIT_S" "$tests"
done

{
  echo "{\"budget_s\": $BUDGET_S, \"fast\": $([ -n "$FAST" ] && echo true || echo false), \"commit\": \"$FASTMEAL_COMMIT\","
  echo " \"seconds\": $(secs $(($(now_ms) - T0))), \"steps\": ["
  for k in "${!STATUS_JSON[@]}"; do
    sep=","; [ "$k" -eq $((${#STATUS_JSON[@]} - 1)) ] && sep=""
    echo "  ${STATUS_JSON[$k]}$sep"
  done
  echo "]}"
} > "$OUT/suite_status.json"

echo
if [ -z "${SUITE_FAKE:-}" ]; then
  timeout 20 "$PY" benchmarks/summarize.py "$OUT" || true
fi
echo
echo "=== fastmeal device suite summary ($(date -u +%FT%TZ), $(secs $(($(now_ms) - T0)))s of ${BUDGET_S}s) ==="
printf '  %s\n' "${STATUS[@]}" | tee -a "$OUT/suite.log"
if [ -z "${SUITE_FAKE:-}" ] && [ -f "$OUT/train_step.json" ]; then
  timeout 20 "$PY" benchmarks/bench_train_step.py --summary "$OUT/train_step.json" || true
fi
exit "$FAILED"
