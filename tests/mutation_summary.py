"""Summarise a `make mutation` run: mutants per module and their fate, and the names of the survivors.

Reads mutmut's result files (``mutants/**/*.meta``) and prints a Markdown table; ``--survivors`` lists every
surviving mutant (``mutmut show NAME`` prints its diff). Only the mutants that ``make mutation`` selects are
counted (the LR regime of config.py, the digest/atomic-write/manifest part of checkpoint.py; see the Makefile).

    python tests/mutation_summary.py [--root mutants] [--survivors]
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import shlex
import subprocess
from pathlib import Path

MODULES = ("losses", "plan", "store", "build", "checkpoint", "config", "objectives")
# mutmut's exit codes (mutmut/stats.py): 1 and 3 kill, 0 survives, 33/5 no test covers the function.
STATUS = {1: "killed", 3: "killed", 0: "survived", 33: "no tests", 5: "no tests", None: "not run",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"}


def selections(makefile: Path) -> dict[str, list[str]]:
    """Each module's mutant-name globs, as the Makefile's MUTANTS_<module> variables expand them."""
    out = {}
    for module in MODULES:
        text = subprocess.run(["make", "-s", "-f", str(makefile), "--eval", f"print: ; @echo $(MUTANTS_{module})",
                               "print"], capture_output=True, text=True, check=True).stdout
        out[module] = shlex.split(text)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="mutants", help="mutmut's folder (default mutants)")
    parser.add_argument("--survivors", action="store_true", help="also list the surviving mutants")
    args = parser.parse_args()
    results = {}
    for meta in Path(args.root).rglob("*.meta"):
        results.update(json.loads(meta.read_text())["exit_code_by_key"])
    globs = selections(Path(__file__).resolve().parents[1] / "Makefile")
    print("| module | mutants | killed | survived | no tests | timeout | not run |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    survivors = []
    for module in MODULES:
        mine = {k: v for k, v in results.items() if any(fnmatch.fnmatch(k, g) for g in globs[module])}
        counts = collections.Counter(STATUS.get(v, "other") for v in mine.values())
        print(f"| {module} | {len(mine)} | {counts['killed']} | {counts['survived']} | {counts['no tests']} | "
              f"{counts['timeout']} | {counts['not run']} |")
        survivors += sorted(k for k, v in mine.items() if v == 0)
    if args.survivors:
        print()
        print("\n".join(survivors))


if __name__ == "__main__":
    main()
