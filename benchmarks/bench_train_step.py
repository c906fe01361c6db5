"""The whole MEAL V2 training step, JPEG files on disk to the optimiser step: the reference pipeline vs fastmeal.

Two modes compute the same function (SPEC, "The algorithm, exactly") with the same models and random
weights, the same per-device batch, the same JPEG files and the same CPU threads:

* ``reference`` — the original code's pipeline (SPEC, "The reference implementation's pipeline"):
  ``ImageFolder`` + PIL + the reference transforms (:func:`fastmeal.data.torchvision.build_transform`)
  + ``DataLoader`` with N workers and ``pin_memory``; FP32 NCHW eager teachers and student in one
  single-process ``nn.DataParallel`` wrapper (on CUDA); :func:`fastmeal.losses.reference_meal_v2_loss`
  (the eager op chain with its host-built target); torch's default SGD; ``loss.item()`` every step.
* ``fastmeal`` — the product: :func:`fastmeal.data.build_loader` (DALI when installed, else the
  torchvision backend, and the result says so), :func:`fastmeal.models.factory.build_teachers` (fp16
  channels-last, BatchNorm folded, CUDA graphs captured at build time on CUDA) and
  :meth:`fastmeal.trainer.Trainer.train_step` (AMP channels-last student compiled with torch.compile on
  CUDA, ``meal_v2_loss(impl="auto")``, fused SGD).
* ``fastmeal_eager`` — the same with ``runtime.compile=off`` (on CUDA only: on a CPU the product's student
  is eager already): what compiling the student adds.
* ``bank`` — fastmeal trained from a soft-label bank (``bank.path``): the same loader and trainer, no
  teachers; each step's top-K records (K=5, fp16 + int16) are copied from pinned host memory to the device,
  as the bank loader does, and the loss is ``bank_meal_v2_loss(impl="auto")`` (the sparse-target kernel on
  CUDA). The records are random (speed does not depend on their values); MFU counts the student only.

A fastmeal row whose compiled step fell back to eager (``trainer.compiled`` turned False during the run)
is not a result: its speed columns are None, ``failure`` gives the cause (``trainer.compile_failure`` when
the trainer records it), the summary prints it as FAILED and the script exits with status 1.
``cold_s`` is the time from building the run to the end of its first step: the loader's start, the
student's torch.compile and, on CUDA, its autotuning (the teachers' CUDA graphs are captured before any
run; ``settings.teacher_build_s`` gives that time).

Every mode runs under the same ``cudnn.benchmark`` (``--cudnn-benchmark``, on by default, as ``fastmeal
train`` sets it).

Measured for each (batch, mode), after warm-up steps:

* ``images_per_s``: images over the wall time of the timed steps (in ``repeats`` chunks: the median
  and spread of the chunks are given too); ``data_wait_pct``: the share of that wall time the host
  spent blocked on the loader (what the trainer logs as data wait);
* ``step_images_per_s``: the same step on one device-resident batch, no loader (the compute
  ceiling); ``data_stall_pct = 1 - images_per_s / step_images_per_s``: what the loader costs;
* ``ms_<phase>``: median per-step time of each named phase (``fastmeal.profiling.phase`` names:
  data, teachers, student_fwd, loss, backward, optimizer; ``other`` is the rest), from a separate
  instrumented pass that synchronises around every phase, so the headline numbers are not perturbed;
* ``mfu_pct``: model FLOPs per image (counted with ``FlopCounterMode``: teachers' forwards and the
  student's forward + backward at the benchmark's size) × images/s ÷ the best dense matmul rate
  (bf16 or fp32) measured on the same device in the same run;
* ``peak_mib``: CUDA memory peak above what was allocated before the run (teacher weights excluded);
* ``speedup_vs_ref``: fastmeal images/s ÷ reference images/s at the same batch (also for the step).

Usage::

    python benchmarks/bench_train_step.py --quick --json benchmarks/results/train_step_quick_cpu-2core.json
    python benchmarks/bench_train_step.py --data /tmp/jpegs --json $OUT/train_step.json   # full size, on a GPU

``--quick``: tiny timm models, 64 px, a handful of steps (the CI smoke run; on a CPU its times say
nothing about speed, and the JSON says so). Full size: SENet154 + ResNet-152s → ResNet-50 at 224 px,
per-GPU batches 64, 128 and 256, random weights. Without ``--data`` (or when the folder has no
``train/``) the JPEGs are generated with :func:`fastmeal.data.synthetic.synthesize`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import fastmeal.objectives  # noqa: E402
import fastmeal.trainer  # noqa: E402
from fastmeal.batch import Batch  # noqa: E402
from fastmeal.config import Config, build_config  # noqa: E402
from fastmeal.data import build_loader, dali_available  # noqa: E402
from fastmeal.data.common import scan_split  # noqa: E402
from fastmeal.data.torchvision import build_transform  # noqa: E402
from fastmeal.losses import reference_meal_v2_loss  # noqa: E402
from fastmeal.models.factory import build_discriminator, build_student, build_teachers, create_model  # noqa: E402
from fastmeal.objectives import (  # noqa: E402
    Objective,
    TrainedModel,  # noqa: E402
    build_objective,
)
from fastmeal.optim import build_optimizer  # noqa: E402
from fastmeal.profiling import phase  # noqa: E402
from fastmeal.trainer import Trainer  # noqa: E402

MODES = ("reference", "fastmeal", "fastmeal_eager", "bank")
BANK_TOP_K = 5
# The order runs are started in, by value: the product first, the reference for its ratio, the product from a
# soft-label bank (its goal is a ratio to the online step), then the product with an eager student (what
# torch.compile adds; on a CPU the product is eager already, so it is left out).
RUN_ORDER = ("fastmeal", "reference", "bank", "fastmeal_eager")
PHASES = ("data", "teachers", "student_fwd", "loss", "backward", "optimizer")
COLUMNS = ["mode", "batch", "loader", "images_per_s", "speedup_vs_ref", "step_images_per_s", "step_speedup_vs_ref",
           "data_wait_pct", "data_stall_pct", "mfu_pct", "peak_mib", *(f"ms_{p}" for p in (*PHASES, "other"))]
SUMMARY_COLUMNS = ["mode", "batch", "loader", "images_per_s", "speedup_vs_ref", "step_images_per_s", "data_wait_pct",
                   "mfu_pct", "cold_s"]
# What a failed row does not report: every measured speed (a fallen-back step's speed is not the product's).
SPEED_COLUMNS = ("images_per_s", "speedup_vs_ref", "step_images_per_s", "step_speedup_vs_ref", "data_wait_pct",
                 "data_stall_pct", "mfu_pct", "images_per_s_median", "images_per_s_min", "images_per_s_max",
                 "step_mfu_pct", *(f"ms_{p}" for p in (*PHASES, "other", "total")))

# Per-image forward GFLOP at 224 px from the SPEC ("Compute per training image"), printed next to our
# own count at full size as a cross-check of FlopCounterMode.
SPEC_GFLOP_224 = {"senet154": 41.5, "resnet152s": 25.8, "resnet50 fwd+bwd": 24.7}


@dataclass(frozen=True)
class Size:
    """What one run measures: models, image size, batches, step counts, and the JPEG set it makes."""

    student: str
    teachers: tuple[str, ...]
    image_size: int
    batches: tuple[int, ...]
    warmup: int  # loader steps before the timed ones
    steps: int  # timed loader steps, split into `repeats` chunks
    repeats: int
    step_warmup: int  # device-resident batch (no loader): warm-up, then timed steps
    step_steps: int
    phase_steps: int  # instrumented steps (synchronised phases)
    # The generated JPEG set: `files_per_class` distinct train JPEGs per class, each hard-linked `copies`
    # times, and `val_per_class` val JPEGs per class (for bench_loader, which reads the same set).
    num_classes: int
    files_per_class: int
    copies: int
    val_per_class: int
    size_range: tuple[int, int]


# The CI smoke run: tiny timm models at 64 px on a shared 2-core CPU, well under a minute (half of it imports).
QUICK = Size(student="test_resnet", teachers=("resnet10t", "test_resnet"), image_size=64, batches=(8,), warmup=1,
             steps=2, repeats=2, step_warmup=0, step_steps=2, phase_steps=1, num_classes=10, files_per_class=4,
             copies=1, val_per_class=2, size_range=(64, 96))
# The paper's r50_224 models (SPEC table) with random weights; 1000 classes like ImageNet. Batches in order of
# value (256: the throughput headline; 64: the reference's per-GPU batch; 128 last); the suite's deadline
# (--budget-s) decides how many of them run, and shortens a run that would overrun it.
# Synthesising an ImageNet-sized JPEG costs ~0.2 CPU-s, so 1000 distinct files are made and each is
# hard-linked 10 times: 10,000 paths, so that an epoch boundary falls at most twice in a run.
FULL = Size(student="resnet50", teachers=("senet154", "resnet152s"), image_size=224, batches=(256, 64, 128),
            warmup=10, steps=24, repeats=3, step_warmup=3, step_steps=10, phase_steps=5, num_classes=1000,
            files_per_class=1, copies=10, val_per_class=1, size_range=(375, 500))


# --------------------------------------------------------------------------------------------
# The JPEG set
# --------------------------------------------------------------------------------------------


def prepare_jpegs(root: str | os.PathLike, *, num_classes: int, files_per_class: int, copies: int,
                  size_range: tuple[int, int], workers: int, val_per_class: int = 0, seed: int = 0) -> int:
    """Write a synthetic ImageFolder dataset under ``root`` and hard-link each train file ``copies`` times.

    The benchmark needs many paths but not many distinct images (decoding cost depends on the size
    and quality, not on the content), and synthesising an ImageNet-sized JPEG costs ~0.2 CPU-s.
    Links that the file system refuses become copies.

    Args:
        root: the dataset root; ``root/train/<class>/*.JPEG`` (and ``root/val/...``) are written.
        num_classes: class folders.
        files_per_class: distinct train JPEGs per class (:func:`fastmeal.data.synthetic.synthesize`).
        copies: paths per distinct train file (1: no links).
        size_range: short side range in pixels (``(375, 500)`` resembles ImageNet).
        workers: processes for the synthesis.
        val_per_class: val JPEGs per class (not linked).
        seed: the synthesis seed.

    Returns:
        The number of train files.
    """
    from fastmeal.data.synthetic import synthesize

    if copies < 1:
        raise ValueError(f"copies={copies} must be >= 1")
    synthesize(root, num_classes=num_classes, train_per_class=files_per_class, val_per_class=val_per_class, seed=seed,
               size_range=size_range, progress=False, num_workers=workers)
    count = 0
    for class_dir in sorted(p for p in (Path(root) / "train").iterdir() if p.is_dir()):
        for src in sorted(class_dir.iterdir()):
            count += 1
            for k in range(1, copies):
                dst = src.with_name(f"{src.stem}_copy{k}{src.suffix}")
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
                count += 1
    return count


def _ensure_data(data: str | None, size: Size, workers: int, stack: contextlib.ExitStack) -> tuple[Path, str | None]:
    """The dataset root, ``data`` or a temporary folder, generated when it has no ``train/``.

    Returns:
        ``(root, note)``: ``note`` describes a set generated now (None for an existing one).
    """
    if data is None:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fastmeal-bench-")))
    else:
        root = Path(data)
    if (root / "train").is_dir():
        return root, None
    start = time.perf_counter()
    count = prepare_jpegs(root, num_classes=size.num_classes, files_per_class=size.files_per_class,
                          copies=size.copies, size_range=size.size_range, workers=workers,
                          val_per_class=size.val_per_class)
    note = (f"JPEG set: {count} train paths, {size.num_classes} classes x {size.files_per_class} synthetic JPEG(s) "
            f"(short side {size.size_range[0]}-{size.size_range[1]} px, quality 90)"
            + (f", each hard-linked {size.copies} times (decoding cost depends on size and quality, not content)"
               if size.copies > 1 else ""))
    print(f"{note}; generated in {root} in {time.perf_counter() - start:.1f}s", flush=True)
    return root, note


def _read_all(paths: Sequence[str]) -> int:
    """Read every file once, so neither mode pays the first cold read from disk (the page cache is shared)."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += len(f.read())
    return total


# --------------------------------------------------------------------------------------------
# FLOPs and the device's matmul peak (for MFU)
# --------------------------------------------------------------------------------------------


def count_flops(cfg: Config) -> dict[str, float]:
    """FLOPs per image of one MEAL V2 step at ``cfg.data.image_size``, counted with ``FlopCounterMode``.

    Models are built on the meta device (shapes only, instant). Teachers: one eval forward each.
    Student: forward and forward + backward in train mode, on a batch of 2 (BatchNorm's training
    statistics need more than one value). The discriminator and the loss (~1 MFLOP per image) are
    not counted.

    Returns:
        ``{"teacher:<tag>": fwd, "student_fwd": fwd, "student_fwd_bwd": fwd+bwd, "total": sum}``, FLOPs
        per image (a multiply-add counts 2).
    """
    from torch.utils.flop_counter import FlopCounterMode

    size = cfg.data.image_size
    out: dict[str, float] = {}
    with torch.device("meta"):
        teachers = [(t.tag, create_model(t.tag, num_classes=cfg.model.num_classes)) for t in cfg.model.teachers]
        student = create_model(cfg.model.student, num_classes=cfg.model.num_classes)
    for tag, model in teachers:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()(torch.empty(1, 3, size, size, device="meta"))
        out[f"teacher:{tag}"] = float(counter.get_total_flops())
    student.train()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        student(torch.empty(2, 3, size, size, device="meta"))
    out["student_fwd"] = counter.get_total_flops() / 2
    with FlopCounterMode(display=False) as counter:
        student(torch.empty(2, 3, size, size, device="meta")).sum().backward()
    out["student_fwd_bwd"] = counter.get_total_flops() / 2
    out["total"] = sum(v for k, v in out.items() if k.startswith("teacher:")) + out["student_fwd_bwd"]
    return out


def matmul_peak(device: torch.device) -> dict[str, float]:
    """The best dense matmul rate (TFLOP/s) this device shows now, in bf16 and fp32: the MFU denominator.

    Square ``n x n`` products (8192 on CUDA; on a CPU 1024 in fp32 and 256 in bf16, which CPUs without
    bf16 units emulate slowly), best of 5 timed repeats. fp32 follows torch's defaults (no TF32 for
    matmuls unless the user enabled it).
    """
    on_cuda = device.type == "cuda"
    out: dict[str, float] = {}
    for name, dtype, n in (("bf16", torch.bfloat16, 8192 if on_cuda else 256),
                           ("fp32", torch.float32, 8192 if on_cuda else 1024)):
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        times = harness.time_region(lambda a=a, b=b: torch.mm(a, b), warmup=2, repeats=5, device=device,
                                    inner=10 if on_cuda else 1)
        out[f"{name}_tflops"] = 2 * n**3 / min(times) / 1e12
        out[f"{name}_n"] = n
        del a, b
    out["peak_tflops"] = max(out["bf16_tflops"], out["fp32_tflops"])
    return out


# --------------------------------------------------------------------------------------------
# Phase timing
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def timed_phases(device: torch.device) -> Iterator[dict[str, float]]:
    """Time every ``phase(name)`` block of the trainer and of this script, synchronising around each.

    ``fastmeal.trainer``, ``fastmeal.objectives`` and this module look ``phase`` up as a module global when a
    step runs, so swapping it for a timing wrapper measures the product's own step unchanged (the NVTX range is
    still emitted). The yielded dict accumulates seconds per phase name; the originals are restored
    on exit.
    """
    seconds: dict[str, float] = {}
    original = phase
    modules = [fastmeal.trainer, fastmeal.objectives, sys.modules[__name__]]

    @contextlib.contextmanager
    def timed(name: str, enabled: bool | None = None) -> Iterator[None]:
        harness.sync(device)
        start = time.perf_counter()
        with original(name, enabled):
            yield
        harness.sync(device)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

    saved = [(module, module.phase) for module in modules]
    for module, _ in saved:
        module.phase = timed
    try:
        yield seconds
    finally:
        for module, fn in saved:
            module.phase = fn


# --------------------------------------------------------------------------------------------
# The two modes
# --------------------------------------------------------------------------------------------


def endless(loader: Any, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of ``loader`` epoch after epoch, on ``device`` (a no-op move for fastmeal's loaders)."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


class ReferenceModel(nn.Module):
    """The reference's wrapper: frozen teachers and the student in one module, the unit DataParallel splits.

    ``forward`` returns ``(student logits [B, C], [K teacher logits [B, C]])``. The teachers stay in
    eval mode (BN on running statistics, SPEC step 1) whatever ``train()`` is told.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList(teachers)

    def train(self, mode: bool = True) -> ReferenceModel:
        super().train(mode)
        self.teachers.eval()
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        with phase("teachers"), torch.no_grad():
            teacher_logits = [teacher(images) for teacher in self.teachers]
        with phase("student_fwd"):
            student_logits = self.student(images)
        return student_logits, teacher_logits


class ReferenceRun:
    """One reference-mode run: its loader, the DataParallel model, the eager loss and torch's default SGD.

    Args:
        cfg: the run's config (``data.*`` for the loader; the optimiser's hyper-parameters).
        student, discriminator: fresh copies (trained here); moved to ``device``.
        teachers: FP32 NCHW eval-mode teachers already on ``device`` (shared between runs: frozen).
        device: where it runs.
    """

    mode = "reference"
    loader_backend = "torchvision-reference"
    compiled = False

    def __init__(self, cfg: Config, *, student: nn.Module, discriminator: nn.Module, teachers: Sequence[nn.Module],
                 device: torch.device) -> None:
        from torch.utils.data import DataLoader
        from torchvision.datasets import ImageFolder

        self.device = device
        self.discriminator = discriminator.to(device)
        self.model = ReferenceModel(student.to(device), teachers).train()
        # Single-process DataParallel, as the reference; with one GPU it scatters the batch and calls the module.
        self.parallel = nn.DataParallel(self.model, device_ids=[device.index or 0]) if device.type == "cuda" \
            else self.model
        # Only the parameter groups come from TrainedModel: torch's default SGD (optim.impl=torch).
        ref_cfg = cfg.replace({"optim.impl": "torch"})
        self.optimizer = build_optimizer(ref_cfg, TrainedModel(self.model.student, Objective(self.discriminator)),
                                         device)
        data = cfg.data
        dataset = ImageFolder(os.path.join(data.root, "train"),
                              transform=build_transform("train", data.image_size, data.resolved_eval_resize))
        # drop_last: fixed batch shapes in both modes (fastmeal runs data.last_batch=drop for its CUDA
        # graphs). persistent_workers: the reference restarts its workers every epoch, once per ~2,500
        # ImageNet steps; our small JPEG set would put that restart inside the timed steps.
        self.loader = DataLoader(dataset, batch_size=data.batch_size, shuffle=True, num_workers=data.workers,
                                 pin_memory=device.type == "cuda", drop_last=True,
                                 persistent_workers=data.workers > 0,
                                 generator=torch.Generator().manual_seed(cfg.runtime.seed))

    def step(self, images: Tensor, labels: Tensor) -> None:
        """One reference step; ends with the reference's per-step host sync (``loss.item()``)."""
        student_logits, teacher_logits = self.parallel(images)
        with phase("loss"):
            out = reference_meal_v2_loss(student_logits, teacher_logits, self.discriminator)
        with phase("backward"):
            self.optimizer.zero_grad()
            out["loss"].backward()
        with phase("optimizer"):
            self.optimizer.step()
        out["loss"].item()


class FastmealRun:
    """One fastmeal-mode run: the product's loader and :meth:`Trainer.train_step`.

    Args:
        cfg: the run's config (``data.backend``, ``precision``, ``loss.impl``, ``optim.impl`` as the product's).
        student, discriminator: fresh copies (trained here).
        teachers: the :class:`~fastmeal.models.teachers.TeacherEnsemble` (shared between runs: frozen).
        device: where it runs.
        run_dir: the trainer's run folder (nothing is written there by steps alone).
        mode: the row's name: ``fastmeal`` (the product's defaults) or ``fastmeal_eager`` (the same with
            ``runtime.compile=off``, which ``cfg`` then says).
    """

    def __init__(self, cfg: Config, *, student: nn.Module, discriminator: nn.Module, teachers: Any,
                 device: torch.device, run_dir: Path, mode: str = "fastmeal") -> None:
        from fastmeal.distributed import DistInfo

        self.loader = build_loader(cfg, "train", device=device)
        self.loader_backend = self.loader.backend
        self.trainer = Trainer(cfg, student=student, objective=build_objective(cfg, device=device, teachers=teachers,
                                                                                  discriminator=discriminator),
                               train_loader=self.loader, val_loader=None, dist=DistInfo(device=device),
                               run_dir=run_dir)
        self.trainer.model.train()
        self.mode = mode
        self.compile_requested = self.trainer.compiled

    @property
    def compiled(self) -> bool:
        """Whether the student's step is compiled now (False after a compile failure fell back to eager)."""
        return self.trainer.compiled

    def failure(self) -> str | None:
        """Why this run is not a result (its compiled step fell back to eager), or None."""
        if not self.compile_requested or self.trainer.compiled:
            return None
        cause = getattr(self.trainer, "compile_failure", None) or "the cause is in the warning logged above"
        return f"the compiled step fell back to eager: {cause}"

    def step(self, images: Tensor, labels: Tensor) -> None:
        """One product step: teachers, student forward, loss, backward, optimiser (no host sync)."""
        self.trainer.train_step(Batch(images, labels))


class BankRun(FastmealRun):
    """fastmeal from a soft-label bank: the product's loader and :meth:`Trainer.train_step` with records, no teachers.

    Args:
        cfg: as :class:`FastmealRun`; ``bank.path`` is set here (the trainer then needs no teachers).
        student, discriminator: fresh copies (trained here).
        device: where it runs.
        run_dir: the trainer's run folder.
    """

    def __init__(self, cfg: Config, *, student: nn.Module, discriminator: nn.Module, device: torch.device,
                 run_dir: Path) -> None:
        cfg = cfg.replace({"bank.path": "synthetic-records"})
        super().__init__(cfg, student=student, discriminator=discriminator, teachers=None, device=device,
                         run_dir=run_dir, mode="bank")
        gen = torch.Generator().manual_seed(0)
        probs, classes = torch.softmax(4 * torch.randn(cfg.data.batch_size, cfg.model.num_classes, generator=gen),
                                       -1).topk(BANK_TOP_K)
        pin = device.type == "cuda"
        self._host = tuple(t.pin_memory() if pin else t for t in (probs.half(), classes.to(torch.int16)))

    def step(self, images: Tensor, labels: Tensor) -> None:
        """One bank step: the batch's records to the device, student forward, sparse-target loss, backward, SGD."""
        n = images.shape[0]
        probs, classes = (t[:n].to(self.trainer.device, non_blocking=True) for t in self._host)
        self.trainer.train_step(Batch(images, labels, {"probs": probs, "classes": classes}))


# --------------------------------------------------------------------------------------------
# Measuring one run
# --------------------------------------------------------------------------------------------


def _timed_steps(run: Any, stream: Iterator[tuple[Tensor, Tensor]], num_steps: int,
                 device: torch.device) -> tuple[float, float]:
    """``(wall seconds, seconds blocked on the loader)`` of ``num_steps`` steps, synchronised at both ends."""
    harness.sync(device)
    wait = 0.0
    start = time.perf_counter()
    for _ in range(num_steps):
        fetch = time.perf_counter()
        images, labels = next(stream)
        wait += time.perf_counter() - fetch
        run.step(images, labels)
    harness.sync(device)
    return time.perf_counter() - start, wait


def _phase_pass(run: Any, stream: Iterator[tuple[Tensor, Tensor]], num_steps: int,
                device: torch.device) -> dict[str, float]:
    """Median milliseconds per step of each phase (and ``other``) over ``num_steps`` instrumented steps."""
    per_step: list[dict[str, float]] = []
    with timed_phases(device) as seconds:
        for _ in range(num_steps):
            seconds.clear()
            harness.sync(device)
            start = time.perf_counter()
            with phase("data"):
                images, labels = next(stream)
            run.step(images, labels)
            harness.sync(device)
            total = time.perf_counter() - start
            per_step.append({**seconds, "other": total - sum(seconds.values()), "total": total})
    names = [p for p in (*PHASES, "other", "total") if any(p in s for s in per_step)]
    return {name: 1e3 * statistics.median(s.get(name, 0.0) for s in per_step) for name in names}


def measure(run: Any, size: Size, batch: int, device: torch.device, flops_per_image: float,
            peak_tflops: float, deadline: float = math.inf) -> dict[str, Any]:
    """Every number of one (mode, batch) run (module docstring); the run's loader is iterated here.

    ``deadline`` (a ``perf_counter`` time) shortens the run instead of letting it overrun: warm-up stops
    at it (after one step, which pays the first-call costs), the timed repeats after the first stop when
    another would not fit, and the phase pass and the step-only pass are left out when they would not fit
    (their columns are then None); ``truncated`` lists what was cut.
    """
    def left() -> float:
        return deadline - time.perf_counter()

    truncated: list[str] = []
    steps_per_repeat = max(1, size.steps // size.repeats)
    stream = endless(run.loader, device)
    phases: dict[str, float] = {}
    try:
        run.step(*next(stream))  # the cold step: the loader starts, torch.compile compiles (and autotunes)
        harness.sync(device)
        cold_done = time.perf_counter()
        for i in range(1, size.warmup):
            if left() < 0:
                truncated.append(f"warm-up {i} of {size.warmup} steps")
                break
            run.step(*next(stream))
        repeats = [_timed_steps(run, stream, steps_per_repeat, device)]
        while len(repeats) < size.repeats and left() > 1.5 * repeats[-1][0]:
            repeats.append(_timed_steps(run, stream, steps_per_repeat, device))
        if len(repeats) < size.repeats:
            truncated.append(f"{len(repeats)} of {size.repeats} timed repeats")
        per_step = repeats[0][0] / steps_per_repeat
        step_only_cost = per_step * (size.step_warmup + size.step_steps)
        if left() > step_only_cost + 3 * per_step * size.phase_steps:
            phases = _phase_pass(run, stream, size.phase_steps, device)
        else:
            truncated.append("phase pass")
        # The compute ceiling: the same step on one batch already on the device (no loader at all).
        images, labels = next(stream)
    finally:
        stream.close()  # ends this pass over the loader (its workers stay until the run is dropped)
    step_rate = None
    if left() > 1.5 * step_only_cost:
        for _ in range(size.step_warmup):
            run.step(images, labels)
        harness.sync(device)
        start = time.perf_counter()
        for _ in range(size.step_steps):
            run.step(images, labels)
        harness.sync(device)
        step_rate = batch * size.step_steps / (time.perf_counter() - start)
    else:
        truncated.append("step-only pass")
    wall, wait = sum(r[0] for r in repeats), sum(r[1] for r in repeats)
    rate = batch * steps_per_repeat * len(repeats) / wall  # over the whole wall time, not a mean of rates
    rates = [batch * steps_per_repeat / r[0] for r in repeats]
    peak_flops = peak_tflops * 1e12
    # Key order is the column order of the README's generated table: headline numbers first.
    row: dict[str, Any] = {
        "mode": run.mode, "batch": batch, "loader": run.loader_backend,
        "images_per_s": rate, "speedup_vs_ref": None,
        "step_images_per_s": step_rate, "step_speedup_vs_ref": None,
        "data_wait_pct": 100 * wait / wall, "data_stall_pct": 100 * (1 - rate / step_rate) if step_rate else None,
        "mfu_pct": 100 * flops_per_image * rate / peak_flops, "peak_mib": None,
    }
    row.update({f"ms_{name}": phases.get(name) for name in (*PHASES, "other", "total")})
    row.update({"images_per_s_median": statistics.median(rates), "images_per_s_min": min(rates),
                "images_per_s_max": max(rates),
                "step_mfu_pct": 100 * flops_per_image * step_rate / peak_flops if step_rate else None,
                "timed_steps": steps_per_repeat * len(repeats), "student_compiled": run.compiled,
                "truncated": truncated or None, "cold_done": cold_done})
    return row


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def bench_config(size: Size, *, root: Path, num_classes: int, batch: int, workers: int, backend: str,
                 device: torch.device, cudnn_benchmark: bool = True, compile: str = "auto") -> Config:
    """The r50_224 preset with the benchmark's models, data and batch; random weights (no download)."""
    return build_config("r50_224", overrides={
        "runtime.cudnn_benchmark": cudnn_benchmark, "runtime.compile": compile,
        "data.root": str(root), "data.backend": backend, "data.image_size": size.image_size,
        "data.batch_size": batch, "data.workers": workers, "data.last_batch": "drop",
        "model.student": size.student, "model.teachers": [{"tag": t} for t in size.teachers],
        "model.pretrained": False, "model.num_classes": num_classes,
        "runtime.device": device.type, "runtime.seed": 0, "logging.progress_bar": False,
    })


def _peak_mib(device: torch.device, base: int) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    reference = {r["batch"]: r for r in rows if r["mode"] == "reference"}
    for row in rows:
        ref = reference.get(row["batch"])
        if ref is not None and row["images_per_s"] and ref["images_per_s"]:  # a FAILED row has no speed
            row["speedup_vs_ref"] = row["images_per_s"] / ref["images_per_s"]
            if row["step_images_per_s"] and ref["step_images_per_s"]:
                row["step_speedup_vs_ref"] = row["step_images_per_s"] / ref["step_images_per_s"]


def _round(value: Any) -> Any:
    return float(f"{value:.4g}") if isinstance(value, float) and math.isfinite(value) else value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 64 px, few steps (the CI smoke run)")
    parser.add_argument("--data", help="ImageFolder root with train/ (generated there if absent; default: a temp dir)")
    parser.add_argument("--prepare-data-only", action="store_true", help="generate --data and exit")
    parser.add_argument("--json", help="write the result document here (rewritten after every run)")
    parser.add_argument("--modes", nargs="+", choices=MODES,
                        help="default: all three on CUDA; reference and fastmeal on a CPU (whose product is eager)")
    parser.add_argument("--batches", type=int, nargs="+", help="per-device batches (default: 64 128 256; quick: 8)")
    parser.add_argument("--workers", type=int,
                        help="loader workers / DALI threads, the same in both modes (default: CPUs - 2, at least 1)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads, the same in both modes (default: torch's; quick on a CPU: 1)")
    parser.add_argument("--backend", choices=["auto", "dali", "torchvision"], default="auto",
                        help="fastmeal mode's loader (auto: DALI when installed)")
    parser.add_argument("--steps", type=int, help="timed loader steps (default 24; quick 2)")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default 10; quick 1)")
    parser.add_argument("--cudnn-benchmark", choices=["on", "off"], default="on",
                        help="torch.backends.cudnn.benchmark for every mode (on: what fastmeal train does)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="finish within this many seconds (0: no limit): a run that would not fit is not "
                             "started, and a run is shortened rather than overrun (its row says what was cut)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="runtime.compile of the fastmeal and bank modes (fastmeal_eager is always off)")
    parser.add_argument("--inject-compile-error", action="store_true",
                        help="make Inductor's generated code fail to compile (torch's own testing switch "
                             "inject_relu_bug_TESTING_ONLY) and compile=on: proves a fallen-back row is FAILED")
    parser.add_argument("--summary", metavar="JSON", help="print the short table of a result file and exit")
    return parser.parse_args(argv)


def print_summary(path: str | os.PathLike) -> None:
    """The short table of a result file (the device suite prints it last)."""
    doc = json.loads(Path(path).read_text())
    print(f"train_step on {doc.get('device')} (commit {str(doc.get('commit'))[:12]})")
    harness.report(doc, SUMMARY_COLUMNS)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.summary:
        print_summary(args.summary)
        return {}
    size = QUICK if args.quick else FULL
    if args.inject_compile_error:
        import torch._inductor.config as inductor_config

        args.compile = "on"
        inductor_config.cpp.inject_relu_bug_TESTING_ONLY = "compile_error"
        inductor_config.triton.inject_relu_bug_TESTING_ONLY = "compile_error"
    overrides = {k: v for k, v in (("steps", args.steps), ("warmup", args.warmup)) if v is not None}
    if args.batches:
        overrides["batches"] = tuple(args.batches)
    if overrides:
        size = Size(**{**asdict(size), **overrides})
    if size.steps < 1 or size.warmup < 0 or any(b < 1 for b in size.batches):
        raise SystemExit(f"--steps must be >= 1, --warmup >= 0 and batches >= 1 (got {size.steps}, {size.warmup}, "
                         f"{size.batches})")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    on_cuda = device.type == "cuda"
    modes = args.modes or (list(MODES) if on_cuda else ["reference", "fastmeal", "bank"])
    workers = args.workers if args.workers is not None else max(1, (os.cpu_count() or 2) - 2)
    if args.quick and args.workers is None:
        workers = 1
    # A quick run on a shared CI machine: one thread each (more OpenMP threads than free cores spin).
    threads = args.threads or (1 if args.quick and not on_cuda else None)
    if threads:
        torch.set_num_threads(threads)
    # One setting for every mode: the reference's steps run under it here, and the fastmeal modes' trainer sets
    # the same value from runtime.cudnn_benchmark (bench_config), as `fastmeal train` does.
    cudnn_benchmark = args.cudnn_benchmark == "on"
    torch.backends.cudnn.benchmark = cudnn_benchmark
    began = time.perf_counter()
    deadline = began + args.budget_s if args.budget_s else math.inf

    with contextlib.ExitStack() as stack:
        root, data_note = _ensure_data(args.data, size, os.cpu_count() or 1, stack)
        if args.prepare_data_only:
            return {}
        split = scan_split(root, "train")
        if len(split) < max(size.batches):
            raise SystemExit(f"{root}/train holds {len(split)} images, fewer than the batch {max(size.batches)}: "
                             "give a larger --data or smaller --batches")
        num_bytes = _read_all(split.paths)
        num_classes = len(split.classes)
        notes: list[str] = []
        if not on_cuda:
            notes.append("CPU SMOKE RUN: no CUDA, so no DataParallel, CUDA graphs, fp16 teachers or fused kernels, "
                         f"on a shared CPU (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the "
                         "start): these numbers say nothing about speed on a GPU.")
        if data_note:
            notes.append(data_note)
        notes.append("images_per_s: images / wall time of the timed steps after warm-up; ms_* phases come from a "
                     "separate pass synchronised around each phase (their sum exceeds a pipelined step); "
                     "backward covers loss + student + discriminator gradients.")
        cfg = bench_config(size, root=root, num_classes=num_classes, batch=size.batches[0], workers=workers,
                           backend=args.backend, device=device, cudnn_benchmark=cudnn_benchmark)
        print(f"bench_train_step on {harness.device_name(device)}: {size.student} <- {' + '.join(size.teachers)}, "
              f"{size.image_size} px, {num_classes} classes, {len(split)} JPEGs ({num_bytes / 2**20:.0f} MiB) in "
              f"{root}, {workers} workers, {torch.get_num_threads()} threads"
              + ("" if on_cuda else "  [CPU SMOKE RUN: times are not meaningful]"), flush=True)

        flops = count_flops(cfg)
        peak = matmul_peak(device)
        print(f"FLOPs per image: {flops['total'] / 1e9:.3g} G ("
              + ", ".join(f"{k} {v / 1e9:.3g}" for k, v in flops.items() if k != "total")
              + f"); matmul peak {peak['peak_tflops']:.3g} TFLOP/s (bf16 {peak['bf16_tflops']:.3g}, "
              f"fp32 {peak['fp32_tflops']:.3g})", flush=True)
        if not on_cuda and cfg.precision.mode != "fp32" and peak["bf16_tflops"] < peak["fp32_tflops"]:
            notes.append(f"bf16 matmuls run at {peak['bf16_tflops'] / peak['fp32_tflops']:.2g}x the fp32 rate on this "
                         f"CPU, and precision.mode={cfg.precision.mode} means a bf16-autocast student on a CPU: "
                         "fastmeal mode is slower than the FP32 reference here, mainly for that reason.")

        # One set of random weights for both modes (SPEC: same function); each run trains fresh copies.
        torch.manual_seed(cfg.runtime.seed)
        student0 = build_student(cfg)
        discriminator0 = build_discriminator(cfg)
        teachers0 = [create_model(t.tag, num_classes=num_classes, what=f"model.teachers[{i}]")
                     for i, t in enumerate(cfg.model.teachers)]
        ref_teachers = fm_teachers = teacher_build_s = None
        if "reference" in modes:
            ref_teachers = [copy.deepcopy(t).to(device).eval().requires_grad_(False) for t in teachers0]
        if {"fastmeal", "fastmeal_eager"} & set(modes):
            # Every batch's graphs are captured now, before any loader runs (as `fastmeal train` does).
            start = time.perf_counter()
            fm_teachers = build_teachers(cfg, device, models=[copy.deepcopy(t) for t in teachers0],
                                         batch_sizes=size.batches)
            teacher_build_s = time.perf_counter() - start
        del teachers0

        settings: dict[str, Any] = {
            **asdict(size), "modes": modes, "quick": args.quick, "num_classes": num_classes,
            "num_jpegs": len(split), "jpeg_mib": num_bytes / 2**20, "workers": workers,
            "torch_threads": torch.get_num_threads(), "fastmeal_backend_requested": args.backend,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "flops_per_image": flops, "matmul_peak": peak,
            "fastmeal_precision": cfg.precision.mode, "fastmeal_loss_impl": cfg.loss.impl,
            "fastmeal_optim_impl": cfg.optim.impl, "reference": "ImageFolder+PIL DataLoader, fp32 NCHW, DataParallel "
            "on CUDA, reference_meal_v2_loss, torch default SGD, loss.item() per step",
            "teacher_engine": fm_teachers.report if fm_teachers is not None else None,
            # Folding, fp16 conversion and CUDA-graph capture of every batch: the cold cost before any step.
            "teacher_build_s": teacher_build_s if fm_teachers is not None else None,
        }
        if not args.quick:
            settings["spec_gflop_224"] = SPEC_GFLOP_224
        rows: list[dict[str, Any]] = []
        run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fastmeal-bench-run-")))

        def write() -> dict[str, Any]:
            _add_ratios(rows)
            return harness.write_result(args.json, benchmark="train_step", settings=settings,
                                        rows=[{k: _round(v) for k, v in r.items()} for r in rows], notes=notes,
                                        device=device)

        skipped = []
        last_run: dict[str, tuple[int, float]] = {}  # mode -> (batch, seconds) of its last run
        for batch in size.batches:
            for mode in (m for m in RUN_ORDER if m in modes):
                cfg_b = bench_config(size, root=root, num_classes=num_classes, batch=batch, workers=workers,
                                     backend=args.backend, device=device, cudnn_benchmark=cudnn_benchmark,
                                     compile="off" if mode == "fastmeal_eager" else args.compile)
                # Predicted from this mode's last run, scaled by the batch (its fixed costs, paid then, are not).
                predicted = last_run[mode][1] * batch / last_run[mode][0] if mode in last_run else 0.0
                if time.perf_counter() + 0.8 * predicted > deadline:
                    skipped.append(f"{mode}@{batch}")
                    continue
                if on_cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device) if on_cuda else 0
                torch.manual_seed(cfg.runtime.seed)
                student, discriminator = copy.deepcopy(student0), copy.deepcopy(discriminator0)
                t0 = time.perf_counter()
                if mode == "reference":
                    run: Any = ReferenceRun(cfg_b, student=student, discriminator=discriminator, teachers=ref_teachers,
                                            device=device)
                elif mode == "bank":
                    run = BankRun(cfg_b, student=student, discriminator=discriminator, device=device, run_dir=run_dir)
                else:
                    run = FastmealRun(cfg_b, student=student, discriminator=discriminator, teachers=fm_teachers,
                                      device=device, run_dir=run_dir, mode=mode)
                if mode != "reference" and run.loader_backend != "dali" and not any("DALI" in n for n in notes):
                    notes.append(f"fastmeal mode used the {run.loader_backend} loader, not DALI (data.backend="
                                 f"{args.backend}, DALI {'installed' if dali_available() else 'absent'}): PIL on "
                                 "the same workers as the reference, so its end-to-end numbers are bounded by CPU "
                                 "JPEG decoding; step_images_per_s shows the step without the loader.")
                mode_flops = flops["student_fwd_bwd"] if mode == "bank" else flops["total"]  # bank: no teachers
                row = measure(run, size, batch, device, mode_flops, peak["peak_tflops"], deadline)
                row["peak_mib"] = _peak_mib(device, base)
                row["cold_s"] = row.pop("cold_done") - t0
                row["run_s"] = time.perf_counter() - t0
                row["failure"] = run.failure() if isinstance(run, FastmealRun) else None
                if row["failure"]:
                    row.update(dict.fromkeys(SPEED_COLUMNS))
                last_run[mode] = (batch, row["run_s"])
                rows.append(row)
                del run, student, discriminator
                gc.collect()
                write()
                if row["failure"]:
                    print(f"  {mode:14s} batch {batch:4d}: FAILED: {row['failure']}", flush=True)
                    continue
                step_only = f"{row['step_images_per_s']:8.4g}" if row["step_images_per_s"] else "     n/a"
                print(f"  {mode:14s} batch {batch:4d}: {row['images_per_s']:8.4g} img/s end to end, "
                      f"{step_only} img/s step only, data wait {row['data_wait_pct']:.1f}%, "
                      f"MFU {row['mfu_pct']:.3g}% ({row['run_s']:.1f}s)"
                      + (f"  [shortened: {', '.join(row['truncated'])}]" if row["truncated"] else ""), flush=True)
        if skipped:
            notes.append(f"--budget-s {args.budget_s:g}: not started (would not fit): {', '.join(skipped)}")
        if any(r["truncated"] for r in rows):
            notes.append("rows with 'truncated' were shortened to fit --budget-s; their other numbers are measured")
        failed = [f"{r['mode']}@{r['batch']}: {r['failure']}" for r in rows if r["failure"]]
        if failed:
            notes.append("FAILED (no speed reported): " + "; ".join(failed))
        if fm_teachers is not None:
            settings["teacher_engine"] = fm_teachers.report
        doc = write()

    print()
    harness.print_table(doc["rows"], COLUMNS)
    for batch in size.batches:
        pair = {r["mode"]: r for r in doc["rows"] if r["batch"] == batch and not r.get("failure")}
        if {"reference", "fastmeal"} <= pair.keys():
            step = pair["fastmeal"]["step_speedup_vs_ref"]
            print(f"batch {batch}: fastmeal {pair['fastmeal']['images_per_s']:.4g} img/s vs reference "
                  f"{pair['reference']['images_per_s']:.4g} img/s = {pair['fastmeal']['speedup_vs_ref']:.2f}x "
                  f"end to end ({f'{step:.2f}x' if step else 'n/a'} step only)")
        if {"fastmeal", "bank"} <= pair.keys():
            step = (pair["bank"]["step_images_per_s"] / pair["fastmeal"]["step_images_per_s"]
                    if pair["bank"]["step_images_per_s"] and pair["fastmeal"]["step_images_per_s"] else None)
            print(f"batch {batch}: bank {pair['bank']['images_per_s']:.4g} img/s = "
                  f"{pair['bank']['images_per_s'] / pair['fastmeal']['images_per_s']:.2f}x the online fastmeal step "
                  f"end to end ({f'{step:.2f}x' if step else 'n/a'} step only)")
    for note in notes:
        print("note:", note)
    return doc


if __name__ == "__main__":
    sys.exit(1 if any(r.get("failure") for r in main().get("rows", [])) else 0)
