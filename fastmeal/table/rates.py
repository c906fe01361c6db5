"""Images per second per device for every distinct stage: measured (``--calibrate``), read (``--rates FILE``),
or the documented defaults.

A rate is keyed by what a stage computes, not by its name, so that stages doing the same work share it:

* ``student:TAG@S``: a training step of the student alone at S px (a student from the bank, a hard-label teacher);
* ``online:TAG+T1+T2@S``: the teachers' forward and the student's step (online MEAL V2);
* ``teachers:T1+T2@S``: the teachers' forward alone (a bank build);
* ``eval:TAG@S``: the student's forward without gradients;
* ``startup``: seconds from a stage's start to its first step (imports, model build); ``synth``: images/s
  of ``fastmeal data synth``.

**Defaults** (no file, no calibration; labelled "default" wherever they are shown): the work of a step in
FLOPs (counted with ``torch.utils.flop_counter`` on the meta device: no weights, no memory; a backward
counted as twice the forward) divided by an effective throughput, capped by a loader ceiling. On a GPU
the effective throughput is 175 TFLOP/s: SPEC's H100 arithmetic (an online ResNet-50 MEAL V2 step,
92 GFLOP, at ≈2,000 img/s and a student-only ResNet-50 step, 24.7 GFLOP, at ≈7,000 img/s, both MLPerf's
≈18% of peak) gives 175-185; the cap is 7,000 img/s per GPU. On a CPU, 20 GFLOP/s (the order of the
demo's calibration on a shared 2-core machine), capped at 2,000 img/s. Neither is a measurement.

**Calibration** times ``steps`` steps (after 3 warm-up steps) of each workload on random tensors of the
stage's per-device batch, with randomly initialised timm models (no weights are needed), on this
machine's first device: the models' compute only. The loader, BatchNorm folding, CUDA graphs and
``torch.compile`` of the real stages are not part of it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmeal.checkpoint import atomic_write_bytes


class TableError(ValueError):
    """Input the table cannot accept (preset, data, GPUs, out folder, disk, rates); the message says how to fix it."""

log = logging.getLogger("fastmeal.table")

FORMAT = "fastmeal-table-rates"
GPU_EFFECTIVE_FLOPS, GPU_IMAGES_PER_S_CAP = 175e12, 7000.0
CPU_EFFECTIVE_FLOPS, CPU_IMAGES_PER_S_CAP = 20e9, 2000.0
DEFAULT_STARTUP_S = {"gpu": 120.0, "cpu": 10.0}  # imports, model build, cuDNN autotuning, CUDA graph capture
DEFAULT_SYNTH_IMAGES_PER_S = 100.0
WARMUP_STEPS = 3


@dataclass(frozen=True)
class Workload:
    """One distinct piece of work whose rate a stage needs.

    Attributes:
        kind: ``student`` | ``online`` | ``teachers`` | ``eval`` | ``startup`` | ``synth``.
        model: the student's timm tag ("" for ``teachers``, ``startup``, ``synth``).
        teachers: the teachers' timm tags (``online``, ``teachers``).
        image_size: S px.
        num_classes: the classifier's width.
        batch: the per-device batch the stage runs.
    """

    kind: str
    model: str = ""
    teachers: tuple[str, ...] = ()
    image_size: int = 0
    num_classes: int = 1000
    batch: int = 64

    @property
    def key(self) -> str:
        if self.kind in ("startup", "synth"):
            return self.kind
        names = "+".join(([self.model] if self.model else []) + list(self.teachers))
        return f"{self.kind}:{names}@{self.image_size}"


@dataclass
class Rates:
    """Rates by :attr:`Workload.key` with where they come from.

    Attributes:
        measured: rates read from a file or calibrated here.
        source: ``"default"``, or the file's path / ``"calibrated"``.
        machine: the identity of the machine the measured rates come from.
        device_kind: ``gpu`` or ``cpu``: which defaults fill the gaps.
        warnings: what the reader should know (another machine, stages without a measured rate).
    """

    measured: dict[str, float] = field(default_factory=dict)
    source: str = "default"
    machine: dict[str, Any] = field(default_factory=dict)
    device_kind: str = "gpu"
    warnings: list[str] = field(default_factory=list)

    def rate(self, work: Workload) -> tuple[float, str]:
        """``(value, "measured" | "default")``: img/s per device, or seconds for ``startup``."""
        if work.key in self.measured:
            return self.measured[work.key], "measured"
        return default_rate(work, self.device_kind), "default"

    def uncovered(self, works: Iterable[Workload]) -> list[str]:
        return sorted({w.key for w in works if w.key not in self.measured})


# --------------------------------------------------------------------------------------------
# The work of a step, in FLOPs (meta device: no weights, no memory)
# --------------------------------------------------------------------------------------------


@functools.cache
def model_cost(tag: str, image_size: int, num_classes: int = 1000) -> tuple[float, int]:
    """``(forward FLOPs per image, parameters)`` of a timm model, counted on the meta device."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode


    with torch.device("meta"):
        try:
            model = timm.create_model(tag, pretrained=False, num_classes=num_classes).eval()
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise TableError(f"{tag!r} is not a timm model ({err}); see `timm.list_models()`") from None
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size))
    return float(counter.get_total_flops()), sum(p.numel() for p in model.parameters())


def workload_flops(work: Workload) -> float:
    """FLOPs per image of a workload: a backward is counted as twice the forward (SPEC: ResNet-50 8.2 → 24.7)."""
    student = model_cost(work.model, work.image_size, work.num_classes)[0] if work.model else 0.0
    teachers = sum(model_cost(t, work.image_size, work.num_classes)[0] for t in work.teachers)
    return {"student": 3 * student, "online": 3 * student + teachers, "teachers": teachers, "eval": student}[work.kind]


def default_rate(work: Workload, device_kind: str) -> float:
    """The documented default (module docstring): img/s per device, or seconds for ``startup``."""
    if work.kind == "startup":
        return DEFAULT_STARTUP_S[device_kind]
    if work.kind == "synth":
        return DEFAULT_SYNTH_IMAGES_PER_S
    flops, cap = ((GPU_EFFECTIVE_FLOPS, GPU_IMAGES_PER_S_CAP) if device_kind == "gpu"
                  else (CPU_EFFECTIVE_FLOPS, CPU_IMAGES_PER_S_CAP))
    return min(cap, flops / workload_flops(work))


# --------------------------------------------------------------------------------------------
# This machine, and rates files
# --------------------------------------------------------------------------------------------


def machine_identity() -> dict[str, Any]:
    """Device, device count, library versions and the fastmeal commit of this process."""
    import timm
    import torch

    import fastmeal

    if torch.cuda.is_available():
        device, count = torch.cuda.get_device_name(0), torch.cuda.device_count()
    else:
        device, count = f"cpu ({os.cpu_count()} cores, {platform.machine()})", 0
    return {"device": device, "device_count": count, "torch": torch.__version__, "timm": timm.__version__,
            "fastmeal": fastmeal.__version__, "commit": _commit(), "python": platform.python_version()}


def _commit() -> str:
    """The git commit of the fastmeal source (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def write_rates(path: str | os.PathLike, measured: dict[str, float], machine: dict[str, Any],
                details: dict[str, Any]) -> Path:
    doc = {"format": FORMAT, "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine, **details,
           "units": "images/s per device; startup in seconds per stage",
           "rates": {k: round(v, 3) for k, v in sorted(measured.items())}}
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
    return path


def read_rates(path: str | os.PathLike, *, here: dict[str, Any] | None) -> Rates:
    """A rates file, with a warning when it was measured on another machine or version.

    Args:
        path: the file ``--calibrate`` wrote.
        here: this machine's identity (:func:`machine_identity`), or None to skip the comparison.

    Raises:
        TableError: not a rates file (the message names the file).
    """

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TableError(f"--rates {path}: cannot read it as JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("rates"), dict):
        raise TableError(f"--rates {path} is not a rates file of `fastmeal table plan --calibrate` "
                         f"(no format={FORMAT!r} with rates)")
    machine = doc.get("machine", {})
    rates = Rates(measured={k: float(v) for k, v in doc["rates"].items()}, source=str(path), machine=machine,
                  device_kind="gpu" if machine.get("device_count") else "cpu")
    if here is not None:
        keys = ("device", "device_count", "torch", "fastmeal")
        differ = [f"{k} {machine.get(k)!r} (here {here.get(k)!r})" for k in keys if machine.get(k) != here.get(k)]
        if differ:
            rates.warnings.append(f"rates file {path} was measured on another machine or version: "
                                  + ", ".join(differ) + "; the estimates may be off (recalibrate with --calibrate)")
    return rates


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def calibrate(works: Iterable[Workload], *, steps: int = 24, amp: bool = True,
              progress: bool = True) -> dict[str, float]:
    """Time each distinct workload on this machine's first device; returns img/s (``startup``: seconds).

    Args:
        works: the workloads (duplicates are timed once).
        steps: timed steps per workload, after :data:`WARMUP_STEPS` warm-up steps.
        amp: autocast the student (bf16 where supported, else fp16) and run teachers in fp16 on CUDA; the
            CPU runs fp32 (as fastmeal does there).
        progress: one log line per workload.
    """
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, float] = {}
    for work in {w.key: w for w in works}.values():
        start = time.perf_counter()
        if work.kind == "startup":
            out[work.key] = _time_startup()
        elif work.kind == "synth":
            out[work.key] = _time_synth()
        else:
            out[work.key] = _time_workload(work, device, steps=steps, amp=amp and device.type == "cuda")
        if progress:
            log.info("calibrate: %-60s %10.2f %s (%.0f s)", work.key, out[work.key],
                     "s" if work.kind == "startup" else "img/s", time.perf_counter() - start)
    return out


def _time_startup() -> float:
    """Seconds for a fresh process to import fastmeal's training modules (the part of a stage's start-up that
    does not depend on the models)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import fastmeal.trainer"], check=True, timeout=600)
    return time.perf_counter() - start


def _time_synth(num_images: int = 40) -> float:
    import tempfile

    from fastmeal.data.synthetic import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        synthesize(Path(tmp) / "data", num_classes=4, train_per_class=num_images // 4 - 1, val_per_class=1, seed=0,
                   progress=False)
        return num_images / (time.perf_counter() - start)


def _time_workload(work: Workload, device: Any, *, steps: int, amp: bool) -> float:
    import contextlib

    import timm
    import torch

    def make(tag: str, train: bool) -> torch.nn.Module:
        model = timm.create_model(tag, pretrained=False, num_classes=work.num_classes).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            if not train:
                model = model.half()
        return model.train(train).requires_grad_(train)

    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if amp else contextlib.nullcontext
    images = torch.randn(work.batch, 3, work.image_size, work.image_size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    teachers = [make(t, False) for t in work.teachers]
    student = make(work.model, work.kind in ("student", "online")) if work.model else None
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9) if student is not None and \
        work.kind != "eval" else None

    def soft_target() -> torch.Tensor:
        with torch.no_grad():
            x = images.half() if device.type == "cuda" else images
            return torch.stack([t(x).float().softmax(-1) for t in teachers]).mean(0)

    def step() -> None:
        if work.kind == "teachers":
            soft_target()
            return
        if work.kind == "eval":
            with torch.no_grad(), autocast():
                student(images)
            return
        target = soft_target() if teachers else torch.full((work.batch, work.num_classes), 1 / work.num_classes,
                                                           device=device)
        with autocast():
            loss = -(target * student(images).float().log_softmax(-1)).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(WARMUP_STEPS):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * work.batch / (time.perf_counter() - start)
