"""Shared set-up of the GPU step tests (test_host_syncs.py, test_gpu_default_config.py): tiny on-disk runs.

A JPEG dataset, two random timm teachers and (for bank mode) a soft-label bank built from them, then trainers
built by :func:`fastmeal.run.build_trainer` from the configuration users get (``loss.impl=auto``,
``precision.mode=amp``, ``runtime.compile=auto``, ``data.backend=auto``), on CUDA or, for the CPU
counterparts, on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import DISK_CLASSES, jpeg_dataset, teacher_files

from fastmeal.batch import Batch
from fastmeal.config import build_config
from fastmeal.distributed import DistInfo
from fastmeal.run import build_trainer
from fastmeal.trainer import Trainer

MODES = ("online", "bank")
BATCH = 8


def make_files(root: Path) -> tuple[Path, list[Path]]:
    """``(dataset root, teacher weight files)`` under ``root``."""
    return jpeg_dataset(root / "data", train_per_class=8, val_per_class=2), teacher_files(root / "teachers")


def default_config(files: tuple[Path, list[Path]], run_dir: Path, device: str, **overrides):
    """The product's defaults (AMP, the Triton loss where it applies, compile=auto) on the tiny run."""
    data, teachers = files
    settings = {
        "data.root": str(data), "data.image_size": 32, "data.batch_size": BATCH, "data.workers": 0,
        "data.last_batch": "drop", "model.student": "test_resnet", "model.pretrained": "false",
        "model.num_classes": DISK_CLASSES, "model.teachers": ",".join(f"test_resnet@{p}" for p in teachers),
        "precision.mode": "amp", "loss.impl": "auto", "runtime.compile": "auto", "data.backend": "auto",
        "runtime.device": device, "runtime.run_dir": str(run_dir), "runtime.seed": 3,
        "logging.progress_bar": "false", "schedule.lr_steps": "", "schedule.epochs": 1, "bank.top_k": 2,
    }
    settings.update({k: str(v) for k, v in overrides.items()})
    return build_config("demo", overrides=settings)


def build_bank_for(files: tuple[Path, list[Path]], out: Path, device: str) -> Path:
    """The soft-label bank of :func:`default_config`'s run (its teachers, crops and epochs) in ``out``."""
    from fastmeal.bank.build import build_bank

    cfg = default_config(files, out.parent / "bank-run", device)
    build_bank(cfg, out, dist=DistInfo(device=torch.device(device)), progress=False, top_k=cfg.bank.top_k,
               chunk_records=cfg.bank.chunk_records)
    return out


def mode_trainer(files, run_dir: Path, device: str, mode: str, bank: Path | None, **overrides) -> Trainer:
    """A trainer of ``mode`` (``online`` or ``bank``) built as ``fastmeal train`` builds it."""
    if mode == "bank":
        overrides["bank.path"] = str(bank)
    cfg = default_config(files, run_dir, device, **overrides)
    return build_trainer(cfg, dist=DistInfo(device=torch.device(device)))


def batches(trainer: Trainer):
    """The trainer's train batches, endlessly, as the loader gives them (make each a step's with :func:`step_batch`)."""
    while True:
        yield from trainer.train_loader


def step_batch(item) -> Batch:
    """A loader's item as a fresh :class:`~fastmeal.batch.Batch` (a step adds to its targets: one per step)."""
    batch = Batch.of(item)
    return Batch(batch.images, batch.labels, dict(batch.targets))
