"""Shared benchmark harness: environment stamp, timing helpers and JSON results.

Every benchmark script (``benchmarks/bench_*.py``) imports this module (it sits next to them, so
``import harness`` works when a script is run as ``python benchmarks/bench_x.py``). Results are
written as one JSON document per run: the git commit, device, library versions, the settings and
the measured rows. Speed is measured here and never asserted anywhere.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


def loss_bench_parser(description: str) -> argparse.ArgumentParser:
    """The options every loss benchmark takes (bench_kd_loss, bench_topk_soft_ce); each adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", help="write the result document here")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (and the smallest sizes on a CPU)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 64 256 1024 on CUDA)")
    parser.add_argument("--classes", type=int, default=1000)
    return parser


def git_commit() -> str:
    """The commit of the checkout, with ``-dirty`` when the tree has uncommitted changes.

    ``FASTMEAL_COMMIT`` wins when set: the GPU machine gets a plain copy of the tree without ``.git``, and
    ``device_suite.sh`` runs from a shadow copy, so the suite passes the commit it was started from.
    """
    if os.environ.get("FASTMEAL_COMMIT"):
        return os.environ["FASTMEAL_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # noqa: BLE001 - an absent or broken optional package is reported, not raised
        return "absent"


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Everything a number needs next to it to mean something."""
    return {
        "commit": git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device_name(device),
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in
                     ("torch", "torchvision", "timm", "triton", "numpy", "nvidia.dali", "fastmeal")},
    }


def sync(device: torch.device | str | None = None) -> None:
    if torch.device(device or "cpu").type == "cuda":
        torch.cuda.synchronize()


def time_region(fn: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device | str | None = None,
                inner: int = 1) -> list[float]:
    """Seconds per call of ``fn`` for each of ``repeats`` timed repeats, after ``warmup`` calls.

    Each repeat runs ``fn`` ``inner`` times between two synchronisations, so that launch-bound work
    is timed as the GPU sees it. CUDA events when on CUDA, ``perf_counter`` otherwise.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    on_cuda = torch.device(device or "cpu").type == "cuda"
    for _ in range(repeats):
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    """Median and spread of a list of per-call seconds."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
    }


def write_result(path: str | os.PathLike | None, *, benchmark: str, settings: dict[str, Any],
                 rows: list[dict[str, Any]], notes: list[str] | None = None,
                 device: torch.device | str | None = None, details: list[dict[str, Any]] | None = None
                 ) -> dict[str, Any]:
    """Write one benchmark run as JSON (when ``path`` is given) and return the document.

    ``rows`` is the table the README shows (``summarize.py``); ``details``, when given, the full per-item rows
    behind it (kept in the JSON only).
    """
    doc = {"benchmark": benchmark, **environment(device), "settings": settings, "rows": rows,
           "notes": notes or []}
    if details is not None:
        doc["details"] = details
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
    return doc


def report(doc: dict[str, Any], columns: list[str]) -> dict[str, Any]:
    """Print a written result: its table, then its notes; returns ``doc``."""
    print_table(doc["rows"], columns)
    for note in doc.get("notes", []):
        print("note:", note)
    return doc


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain fixed-width table of ``rows`` on stdout."""
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
