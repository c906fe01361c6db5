#!/usr/bin/env bash
# Runs benchmarks/device_suite.sh on this (CPU) machine the way the GPU machine runs it, and checks what the
# suite must show. The GPU machine gets a plain copy of the working tree (tracked files and untracked files git
# does not ignore; no .git, no .venv), a python3 that has torch, triton, timm, pytest... but NOT fastmeal (no
# install, editable or not), and no DALI. This script lays that out in a temporary folder:
#
#   * the tree: `git ls-files --cached --others --exclude-standard`, copied (no .git);
#   * the interpreter: a `python -m venv --without-pip` whose only extra path is the site-packages folder(s)
#     holding the dependencies (added as plain sys.path entries, so the .pth files there, the editable
#     fastmeal finder among them, are NOT processed); DALI is hidden (`sys.modules["nvidia.dali"] = None`)
#     unless KEEP_DALI=1. It refuses to run if `import fastmeal` still works outside the tree;
#
# then runs `bash benchmarks/device_suite.sh --fast` from the copy and checks that every step reported ok (or
# the simulated slow one timed out), that `pytest -m gpu` collected every test file without an error, and that
# every benchmark wrote its JSON.
#
# Usage, from the repo root:
#   bash benchmarks/emulate_device.sh [OUT_DIR]          (default: a temporary folder, printed)
#   SUITE_SLOW=bench_teachers bash benchmarks/emulate_device.sh    a step that hangs: it must time out, the rest run
#   SUITE_BREAK_COMPILE=1 bash benchmarks/emulate_device.sh   the compiled train step fails (compile forced on, with
#                              Inductor's testing switch): bench_train_step must be FAILED, its fastmeal rows FAILED
#                              with the cause and no speed
#   DEPS_PYTHON=/path/python   the interpreter whose packages are used (default .venv/bin/python, else python3)
#   SUITE_BUDGET_S=...         passed on to the suite
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEPS_PYTHON=${DEPS_PYTHON:-$([ -x .venv/bin/python ] && echo "$REPO/.venv/bin/python" || command -v python3)}
WORK=$(mktemp -d /tmp/fastmeal-device-emulation.XXXXXX)
OUT=${1:-$WORK/out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
echo "emulating the GPU machine in $WORK (results in $OUT)"

# 1. The tree, as the device copy has it.
mkdir -p "$WORK/repo"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
  | tar -C "$REPO" --null --ignore-failed-read -T - -cf - | tar -C "$WORK/repo" -xf -
COMMIT=$(git -C "$REPO" rev-parse HEAD)
[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ] && COMMIT="$COMMIT-dirty"

# 2. An interpreter with the dependencies and without fastmeal (and without DALI).
read -r BASE PYVER SITES < <("$DEPS_PYTHON" - <<'PY'
import importlib, os, sys
sites = []
for name in ("torch", "triton", "timm", "torchvision", "numpy", "PIL", "pytest", "safetensors", "tqdm"):
    try:
        mod = importlib.import_module(name)
    except ImportError:
        continue
    site = os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__)))
    if site not in sites:
        sites.append(site)
print(sys._base_executable, f"{sys.version_info.major}.{sys.version_info.minor}", ":".join(sites))
PY
)
"$BASE" -m venv --without-pip "$WORK/py"
SITE_DIR="$WORK/py/lib/python$PYVER/site-packages"
tr ':' '\n' <<< "$SITES" > "$SITE_DIR/deps.pth"
if [ -z "${KEEP_DALI:-}" ]; then
  echo "import sys; sys.modules['nvidia.dali'] = None  # the GPU machine has no DALI" > "$SITE_DIR/zz_no_dali.pth"
fi
EMU_PY=$WORK/py/bin/python
(cd / && "$EMU_PY" -c "import torch, timm, pytest") || { echo "the emulated interpreter cannot import torch"; exit 1; }
if (cd / && "$EMU_PY" -c "import fastmeal" 2>/dev/null); then
  echo "fastmeal is importable without the tree ($(cd / && "$EMU_PY" -c 'import fastmeal; print(fastmeal.__file__)'))"
  echo "that is not what the GPU machine has; point DEPS_PYTHON at an interpreter with a plain (non-editable) setup"
  exit 1
fi
echo "interpreter: $EMU_PY (packages from $SITES; fastmeal not importable; DALI ${KEEP_DALI:+kept}${KEEP_DALI:-hidden})"

# 3. The suite, as the GPU machine runs it.
set +e
(cd "$WORK/repo" && OUT=$OUT PYTHON=$EMU_PY FASTMEAL_COMMIT=$COMMIT bash benchmarks/device_suite.sh --fast)
SUITE_RC=$?
set -e
echo "device_suite.sh exited $SUITE_RC"

# 4. What it must show.
"$EMU_PY" - "$OUT" "$WORK/repo" "${SUITE_SLOW:-}" "${SUITE_BREAK_COMPILE:-}" <<'PY'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out, repo, slow, broken = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
problems = []
status = json.loads((out / "suite_status.json").read_text())
for step in status["steps"]:
    if step["step"] == slow:
        ok = step["verdict"].startswith("TIMED OUT")
    elif step["step"] == "bench_train_step" and broken:
        ok = step["verdict"].startswith("FAILED")
    else:
        ok = step["verdict"] == "ok"
    print(f"  {step['step']:18s} {step['verdict']} ({step['seconds']}s of {step['limit_s']}s)"
          + (f" [{step['tests']}]" if step.get("tests") else "") + ("" if ok else "   <-- unexpected"))
    if not ok:
        problems.append(f"step {step['step']}: {step['verdict']}")
if status["seconds"] > status["budget_s"]:
    problems.append(f"the suite took {status['seconds']}s, over its {status['budget_s']}s budget")
if slow != "pytest-gpu":
    suite = ET.parse(out / "pytest_gpu.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    errors = int(suite.get("errors", 0))
    files = sorted(p.name for p in (repo / "tests").glob("test_*.py"))
    print(f"  pytest -m gpu: {suite.get('tests')} selected, {suite.get('skipped')} skipped, {errors} errors, "
          f"{suite.get('failures')} failures; {len(files)} test files collected")
    if errors or int(suite.get("failures", 0)):
        problems.append(f"pytest -m gpu: {errors} errors (collection errors included), {suite.get('failures')} failures")
    log = (out / "suite.log").read_text()
    if "ERROR collecting" in log or "errors during collection" in log:
        problems.append("pytest reported a collection error (suite.log)")
benchmarks = {"bench_train_step": "train_step.json", "bench_teachers": "teachers.json",
              "bench_kd_loss": "kd_loss.json", "bench_loader": "loader.json"}
for step, name in benchmarks.items():
    if step == slow:
        continue
    path = out / name
    if not path.is_file():
        problems.append(f"{step} wrote no {name}")
        continue
    doc = json.loads(path.read_text())
    print(f"  {name:16s} {len(doc['rows'])} rows, commit {doc['commit'][:12]}, device {doc['device']}")
    if not doc["rows"]:
        problems.append(f"{name} has no rows")
    if doc["commit"] == "unknown":
        problems.append(f"{name} does not record the commit")
if broken and (out / "train_step.json").is_file():
    rows = json.loads((out / "train_step.json").read_text())["rows"]
    failed = [r for r in rows if r["mode"] in ("fastmeal", "bank")]
    print("  forced compile failure:", "; ".join(f"{r['mode']}@{r['batch']}: {r.get('failure')}" for r in failed))
    if not failed or any(not r.get("failure") or r.get("images_per_s") is not None for r in failed):
        problems.append("a fastmeal row whose compiled step fell back is not FAILED (or still reports a speed)")
    if "FAILED (no speed reported)" not in (out / "suite.log").read_text():
        problems.append("the suite's summary does not show the FAILED row")
print("EMULATION", "FAILED: " + "; ".join(problems) if problems else "OK: every step reported, every file written")
sys.exit(1 if problems else 0)
PY
