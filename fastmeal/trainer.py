"""The training loop: step, epoch, evaluation, checkpoints. No model- or data-specific code.

One MEAL V2 step (SPEC, "The algorithm, exactly"): the frozen teachers and the student see the
same batch; the loss is :func:`fastmeal.losses.meal_v2_loss` (soft CE to the mean teacher softmax +
the discriminator's BCE); **one** backward and **one** SGD step over student and discriminator
together. ``loss.mode=ce`` trains the same loop on hard labels (no teachers, no discriminator): the
demo's teachers and baseline.

Layout for DDP: the student and the discriminator live in one :class:`DistillationModel` (one DDP
wrapper, one gradient all-reduce); the teachers stay outside (frozen, never saved). Rank 0 logs and
writes; evaluation sums counts over ranks.

Extension points (issue 7: preemption, profiler windows): :class:`TrainerHook` objects are called
around every step and epoch, and :meth:`Trainer.request_stop` ends the run after the current step
with a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from fastmeal.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    CheckpointManager,
    atomic_write_bytes,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from fastmeal.config import Config
from fastmeal.console import format_duration, progress_enabled
from fastmeal.distributed import DistInfo, broadcast_buffers, check_ranks_agree, configure_device
from fastmeal.evaluate import autocast_context, evaluate, resolve_precision
from fastmeal.losses import bank_meal_v2_loss, meal_v2_loss
from fastmeal.metrics import (
    DeviceMeans,
    MetricsWriter,
    finite_json,
    jsonable,
    topk_correct,
)
from fastmeal.models.factory import load_state_dict_checked, model_num_classes
from fastmeal.profiling import phase
from fastmeal.rundir import RunDirError, RunDirLock, RunDirVanishedError, clear_run, previous_run
from fastmeal.signals import raise_if_interrupted

log = logging.getLogger("fastmeal.trainer")

TeacherFn = Callable[[Tensor], Tensor]  # [B, 3, S, S] -> [K, B, C]


class SetupError(ValueError):
    """Parts of a run that do not fit together (class counts, a mode without its teachers); says how to fix it."""


class NonFiniteError(RuntimeError):
    """The loss or the weights became NaN/inf; nothing was written from them (the message names the last good save)."""


# --------------------------------------------------------------------------------------------
# Pieces of a step
# --------------------------------------------------------------------------------------------


def build_optimizer(cfg: Config, model: DistillationModel, device: torch.device) -> torch.optim.Optimizer:
    """One SGD over the student's and the discriminator's parameters (two named groups, SPEC step 9).

    ``optim.impl``: ``auto`` = torch's fused SGD on CUDA, foreach on the CPU; ``torch`` = torch's
    default implementation (the reference's); ``apex`` = apex's FusedSGD (fails with the install
    command when apex is absent).
    """
    groups = [{"params": [p for p in model.student.parameters() if p.requires_grad], "name": "student"}]
    if model.discriminator is not None:
        groups.append({"params": list(model.discriminator.parameters()), "name": "discriminator"})
    o = cfg.optim
    kwargs: dict[str, Any] = {"lr": cfg.lr_at(0), "momentum": o.momentum, "nesterov": o.nesterov,
                              "weight_decay": o.weight_decay}
    if o.impl == "apex":
        if device.type != "cuda":
            raise RuntimeError("optim.impl=apex needs CUDA; use optim.impl=auto on the CPU")
        try:
            from apex.optimizers import FusedSGD
        except ImportError as err:
            raise RuntimeError("optim.impl=apex needs NVIDIA apex built with --cuda_ext: "
                               "pip install -v --no-build-isolation --config-settings '--build-option=--cpp_ext' "
                               "--config-settings '--build-option=--cuda_ext' git+https://github.com/NVIDIA/apex; "
                               "or use optim.impl=auto (torch's fused SGD)") from err
        return FusedSGD(groups, **kwargs)
    if o.impl == "auto":
        kwargs["fused" if device.type == "cuda" else "foreach"] = True
    optimizer = torch.optim.SGD(groups, **kwargs)
    init_momentum_buffers(optimizer)
    return optimizer


@torch.no_grad()
def init_momentum_buffers(optimizer: torch.optim.SGD) -> None:
    """Give every parameter a zero momentum buffer before the first step (SGD with momentum, no dampening).

    torch's fused SGD allocates the buffers of its first step with ``empty_like`` and lets the kernel fill
    them; when a GradScaler finds an overflow on that step (fp16's first steps usually do) the kernel
    returns early, ``SGD.step`` stores the unwritten buffers anyway, and the next step reads uninitialised
    memory. With zeros there is no "first step": ``buf = momentum · 0 + grad`` is exactly the first-step
    rule ``buf = grad`` (dampening is 0), so every implementation computes the same numbers as before.
    """
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        if group.get("dampening", 0) != 0:
            raise ValueError("zero-initialised momentum needs dampening 0 (the first step would differ)")
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The same LR for every parameter group, the discriminator's included (SPEC: set once per epoch)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def cutmix_(images: Tensor, *, seed: int, epoch: int, step: int) -> tuple[Tensor, float, Tensor]:
    """MEAL V2's CutMix, in place: one box per batch pasted from a permutation of the batch.

    λ, the box and the permutation are :func:`fastmeal.data.plan.plan_cutmix`'s for (seed, epoch, step):
    λ ~ Beta(1, 1) (uniform), a box of area ≈ (1-λ)·H·W with a uniform centre, clipped to the image (the
    CutMix reference's ``rand_bbox``). A keyed draw, not torch's RNG: a resumed run mixes exactly as the
    uninterrupted one, and no host sync is needed.

    Args:
        images: ``[B, 3, H, W]``; modified in place (teachers and student both see the result).
        seed, epoch, step: ``runtime.seed`` and the step's position (step within the epoch, 0-based).

    Returns:
        ``(images, lam, perm)``: ``lam`` is the share of each image that is still its own (after
        clipping), ``perm`` ``[B]`` says whose pixels fill the box of each row.
    """
    from fastmeal.data.plan import plan_cutmix

    batch, _, height, width = images.shape
    lam, (y1, y2, x1, x2), perm = plan_cutmix(seed, epoch, step, batch, height=height, width=width)
    perm = torch.from_numpy(perm).to(images.device, non_blocking=True)
    # The right side is an advanced-indexing copy, so overlapping rows read the unmixed pixels.
    images[:, :, y1:y2, x1:x2] = images[perm, :, y1:y2, x1:x2]
    return images, lam, perm


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``runtime.compile``: ``on``, ``off``, or ``auto`` (on CUDA only)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


# torch.compile's arguments for the student's step. dynamic=False: the batch shape is fixed (a kept partial
# last batch compiles once more). Tests swap the backend for "aot_eager" (graph capture and AOT autograd,
# without Inductor's code generation).
COMPILE_OPTIONS: dict[str, Any] = {"dynamic": False}


def _phase(name: str) -> contextlib.AbstractContextManager:
    """:func:`phase` in eager code; nothing while torch.compile traces (the NVTX calls would break the graph)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else phase(name)


class DistillationModel(nn.Module):
    """The trained parts in one module: the student and the discriminator (one DDP wrapper, one state).

    ``forward`` returns the loss parts as a dict (timm's distillation task): ``loss`` (what is
    back-propagated) and, in MEAL V2 mode, ``kd``, ``d``, ``kl``; ``logits`` is the student's output.

    Args:
        student: maps ``[B, 3, S, S]`` to ``[B, C]`` logits.
        discriminator: the MEAL V2 discriminator, or None.
        mode: ``meal_v2`` or ``ce`` (``loss.mode``).
        loss_impl: ``loss.impl`` (``auto``/``torch``/``triton``).
        autocast_dtype: the student's autocast dtype (None: fp32). The loss is computed in fp32.
    """

    def __init__(self, student: nn.Module, discriminator: nn.Module | None, *, mode: str = "meal_v2",
                 loss_impl: str = "auto", autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if mode not in ("meal_v2", "ce"):
            raise ValueError(f"loss.mode={mode!r} is not one of meal_v2, ce")
        self.student = student
        self.discriminator = discriminator
        self.mode = mode
        self.loss_impl = loss_impl
        self.autocast_dtype = autocast_dtype

    def forward(self, images: Tensor, teacher_logits: Tensor | None = None, labels: Tensor | None = None,
                mix: tuple[float, Tensor] | None = None,
                records: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """Student forward and loss.

        Args:
            images: ``[B, 3, S, S]``.
            teacher_logits: ``[K, B, C]`` (MEAL V2 mode).
            labels: ``[B]`` int64 (CE mode; MEAL V2 ignores them: no hard-label term, SPEC step 8).
            mix: ``(lam, perm)`` from CutMix in CE mode: the labels are mixed as CutMix does. MEAL V2
                needs nothing (the teachers saw the same mixed images).
            records: ``(probs, classes)`` ``[B, K]`` soft-label bank records (MEAL V2 from a bank,
                instead of ``teacher_logits``): :func:`fastmeal.losses.bank_meal_v2_loss`.

        Returns:
            Scalar fp32 loss parts and ``logits`` ``[B, C]``.
        """
        with _phase("student_fwd"), autocast_context(images.device, self.autocast_dtype):
            logits = self.student(images)
        with _phase("loss"):
            if self.mode == "meal_v2" and records is not None:
                out = bank_meal_v2_loss(logits, *records, self.discriminator, impl=self.loss_impl)
            elif self.mode == "meal_v2":
                if teacher_logits is None:
                    raise ValueError("loss.mode=meal_v2 needs teacher logits")
                out = meal_v2_loss(logits, teacher_logits, self.discriminator, impl=self.loss_impl)
            else:
                if labels is None:
                    raise ValueError("loss.mode=ce needs labels")
                out = {"loss": _mixed_ce(logits.float(), labels, mix)}
        out["logits"] = logits
        return out


def _mixed_ce(logits: Tensor, labels: Tensor, mix: tuple[float, Tensor] | None) -> Tensor:
    if mix is None:
        return F.cross_entropy(logits, labels)
    lam, perm = mix
    return lam * F.cross_entropy(logits, labels) + (1.0 - lam) * F.cross_entropy(logits, labels[perm])


class TrainerHook:
    """Called by :class:`Trainer` at fixed points; override what you need. All methods are no-ops here.

    ``trainer.global_step`` counts the optimiser steps done, ``trainer.epoch`` is the current epoch
    (0-based) and ``trainer.step_in_epoch`` the steps done in it.
    """

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step (after any resume)."""

    def before_step(self, trainer: Trainer) -> None:
        """Before a step fetches its batch; ``trainer.global_step`` is the step about to run."""

    def after_step(self, trainer: Trainer, parts: dict[str, Tensor]) -> None:
        """After the optimiser step; ``parts`` are the step's loss tensors (on the device: no sync)."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After an epoch's evaluation and checkpoint; ``record`` is the epoch's JSONL record."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last epoch, or after a requested stop (always called)."""


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Runs epochs of steps with per-epoch evaluation and checkpoints.

    Models and loaders are arguments, so tests can pass tiny in-memory ones; :func:`train` builds
    the real ones from a config.

    Args:
        cfg: the resolved config (written to ``run_dir/config.json`` and into every checkpoint).
        student: the student network, ``[B, 3, S, S] → [B, C]``; moved to the device here.
        discriminator: the MEAL V2 discriminator, or None (``loss.mode=ce`` or without one).
        teachers: a frozen callable ``[B, 3, S, S] → [K, B, C]`` (a ``TeacherEnsemble``), or None in CE
            mode. Not saved, not optimised, not wrapped in DDP.
        train_loader, val_loader: the Loader protocol (``fastmeal.data.Loader``); ``val_loader`` may
            be None to skip evaluation.
        dist: this process's place in the world (default: a single CPU/GPU process on ``runtime.device``).
        run_dir: where metrics, config and checkpoints go (default ``cfg.resolved_run_dir``).
        hooks: :class:`TrainerHook` objects.
    """

    def __init__(self, cfg: Config, *, student: nn.Module, discriminator: nn.Module | None,
                 teachers: TeacherFn | None, train_loader: Any, val_loader: Any | None,
                 dist: DistInfo | None = None, run_dir: str | os.PathLike | None = None,
                 hooks: Sequence[TrainerHook] = ()) -> None:
        from fastmeal.distributed import resolve_device

        self.cfg = cfg
        self.dist = dist or DistInfo(device=resolve_device(cfg.runtime.device))
        self.device = self.dist.device
        self.run_dir = Path(run_dir if run_dir is not None else cfg.resolved_run_dir)
        self.hooks = list(hooks)
        self.mode = cfg.loss.mode
        if self.mode == "meal_v2" and teachers is None and not cfg.bank.path:
            raise SetupError("loss.mode=meal_v2 needs teachers (build_teachers); use loss.mode=ce for hard labels")
        self.teachers = teachers if self.mode == "meal_v2" else None
        if cfg.loss.impl == "triton" and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SetupError(f"loss.impl=triton runs its kernel on a CUDA GPU, and this run is on {self.device}; use "
                             "loss.impl=auto (Triton on CUDA, PyTorch elsewhere) or loss.impl=torch")
        self.train_loader, self.val_loader = train_loader, val_loader
        self._check_classes(student, train_loader, val_loader)

        configure_device(cfg.runtime.cudnn_benchmark, self.device)
        self.autocast_dtype, use_scaler = resolve_precision(cfg.precision.mode, self.device)
        self.memory_format = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
        student = student.to(self.device, memory_format=self.memory_format)
        if discriminator is not None:
            discriminator = discriminator.to(self.device)
        self.model = DistillationModel(student, discriminator if self.mode == "meal_v2" else None, mode=self.mode,
                                       loss_impl=cfg.loss.impl, autocast_dtype=self.autocast_dtype)
        self.optimizer = build_optimizer(cfg, self.model, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.compiled = compile_enabled(cfg.runtime.compile, self.device)
        self.eager_model: nn.Module = self.model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # BN statistics stay per GPU (SPEC: no SyncBN); D and the student share one all-reduce.
            # gradient_as_bucket_view: gradients live in the all-reduce buckets (no copy in, no copy out).
            # static_graph: every step uses every parameter the same way (no control flow on the step); not
            # with torch.compile, whose DDP graph splitting has had known problems with it.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.eager_model = DistributedDataParallel(self.model, device_ids=device_ids, gradient_as_bucket_view=True,
                                                       static_graph=not self.compiled)
        # What train_step calls: the compiled step, until a compile failure falls back to eager_model.
        self.train_model: nn.Module = (torch.compile(self.eager_model, **COMPILE_OPTIONS) if self.compiled
                                       else self.eager_model)

        self.part_names = ("loss", "kd", "d", "kl") if self.mode == "meal_v2" else ("loss",)
        if self.mode == "meal_v2" and self.model.discriminator is None:
            self.part_names = ("loss", "kd", "kl")
        self.meter = DeviceMeans((*self.part_names, "train_top1"), self.device)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=cfg.runtime.keep_last,
                                             enabled=self.dist.is_main, export_dir=self.run_dir)
        self.lock = RunDirLock(self.run_dir)
        self._run_dir_open = self._claimed = False
        self._saved_once = False
        self._fit_origin: tuple[float, int] | None = None  # (time, global step) when fit() started: the ETA's pace
        self.writer = MetricsWriter(self.run_dir, enabled=False)  # fit() opens the real one (rank 0)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_top1: float | None = None
        self.last_eval: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        self._stop_reason: str | None = None

    # ---------------------------------------------------------------------------- set-up checks

    def _check_classes(self, student: nn.Module, train_loader: Any, val_loader: Any | None) -> None:
        want = self.cfg.model.num_classes
        got = model_num_classes(student)
        if got != want:
            raise SetupError(f"the student ({self.cfg.model.student}) predicts {got} classes but model.num_classes="
                             f"{want}")
        check_split_classes(self.cfg, train_loader, val_loader)
        check_dataset_classes(self.cfg, train_loader, "train")
        if val_loader is not None:
            check_dataset_classes(self.cfg, val_loader, "val")

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def steps_per_epoch(self) -> int:
        """Batches per epoch on this rank (``runtime.max_steps_per_epoch`` caps it)."""
        steps = len(self.train_loader)
        cap = self.cfg.runtime.max_steps_per_epoch
        return min(steps, cap) if cap else steps

    def open_run_dir(self, *, resuming: bool) -> None:
        """Take the run dir's lock and refuse a run dir that holds another run (unless resuming); idempotent.

        On rank 0; every rank raises the same error (a lone failure would leave the others waiting).
        Temporaries of killed writers are removed once the lock is held (no other writer can be alive).

        Raises:
            RunDirError: the run dir is locked by another process, or holds another run's checkpoints or
                metrics and neither resume nor ``runtime.if_exists`` says what to do with them.
        """
        if self._run_dir_open:
            return
        problem = None
        if self.is_main:
            try:
                self.lock.acquire()
                # A second fit() of this trainer continues its own run: nothing to refuse.
                problem = None if resuming or self._claimed else self._claim_run_dir()
            except RunDirError as err:
                problem = str(err)
        from fastmeal.distributed import all_gather_objects

        problem = all_gather_objects(problem)[0]
        if problem:
            self.lock.release()
            raise RunDirError(problem)
        self._run_dir_open = self._claimed = True
        if self.is_main:
            stale = self.checkpoints.remove_stale_temporaries()
            if stale:
                log.warning("removed %d temporary file(s) left by an interrupted write: %s", len(stale),
                            ", ".join(p.name for p in stale))

    def _claim_run_dir(self) -> str | None:
        found = previous_run(self.run_dir)
        if found is None:
            return None
        if self.cfg.runtime.if_exists == "overwrite":
            log.warning("runtime.if_exists=overwrite: removed %s of an earlier run from %s",
                        ", ".join(clear_run(self.run_dir)), self.run_dir)
            return None
        return (f"run dir {self.run_dir} already holds another run ({found}); training into it would mix the two. "
                "Continue that run with --resume auto, train into a new dir with --set runtime.if_exists=new "
                "(or --set runtime.run_dir=DIR), or delete its files first with --set runtime.if_exists=overwrite")

    def close_run_dir(self) -> None:
        """Release the run dir's lock (the end of :meth:`fit`; also when set-up fails after :meth:`resume`)."""
        self.lock.release()
        self._run_dir_open = False

    def request_stop(self, reason: str) -> None:
        """End :meth:`fit` after the current step, with a checkpoint (preemption, a hook's decision)."""
        self._stop_reason = reason

    # ---------------------------------------------------------------------------- one step

    def train_step(self, images: Tensor, labels: Tensor,
                   records: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """One forward/backward/optimiser step on a batch; returns the loss parts (device tensors).

        ``records``: the batch's soft-label bank records (``bank.path``), used instead of the teachers.
        """
        images = images.contiguous(memory_format=self.memory_format)
        mix = None
        if self.cfg.data.cutmix:
            images, lam, perm = cutmix_(images, seed=self.cfg.runtime.seed, epoch=self.epoch, step=self.step_in_epoch)
            mix = (lam, perm)
        teacher_logits = None
        if self.teachers is not None and records is None:
            with phase("teachers"), torch.no_grad():
                teacher_logits = self.teachers(images)
        if not self.compiled:
            out = self._forward_backward(images, teacher_logits, labels, mix, records)
        else:
            try:
                out = self._forward_backward(images, teacher_logits, labels, mix, records)
            except Exception as err:  # noqa: BLE001 - any compile/codegen failure: the same step, eagerly
                self._fall_back_to_eager(err)
                out = self._forward_backward(images, teacher_logits, labels, mix, records)
        with phase("optimizer"):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return {name: value.detach() for name, value in out.items()}  # for logging: no graph kept alive

    def _forward_backward(self, images: Tensor, teacher_logits: Tensor | None, labels: Tensor,
                          mix: tuple[float, Tensor] | None,
                          records: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        if self.compiled and mix is not None:
            # CutMix's λ as a 0-dim tensor: torch.compile specialises on a Python float, a new λ every step.
            mix = (torch.tensor(mix[0], dtype=torch.float32), mix[1])
        # Compiled, the student's forward and the loss are one region (their own phases would break the graph).
        with phase("student_fwd") if self.compiled else contextlib.nullcontext():
            out = self.train_model(images, teacher_logits, labels, mix, records)
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out["loss"]).backward()
        return out

    def _fall_back_to_eager(self, err: Exception) -> None:
        """After a failure of the compiled step (before the optimiser step): continue eagerly, with one warning."""
        self.compiled = False
        self.train_model = self.eager_model
        self.optimizer.zero_grad(set_to_none=True)  # a backward that failed half-way may have left gradients
        # The first lines: torch's wrappers put the cause on the line after "backend=... raised:".
        head = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:400]
        log.warning("torch.compile of the student's step failed (%s: %s); continuing eagerly "
                    "(runtime.compile=off skips the attempt)", type(err).__name__, head)

    # ---------------------------------------------------------------------------- epochs

    def fit(self) -> dict[str, Any]:
        """Train from the current position (fresh, or after :meth:`resume`) to ``schedule.epochs``.

        Returns:
            A summary: ``epochs`` done, ``global_step``, ``last_eval``, ``best_top1``, ``stopped``
            (the stop reason or None), ``train_images_per_s`` (mean over this call's epochs) and
            ``seconds``.
        """
        self.open_run_dir(resuming=False)
        try:
            return self._fit()
        finally:
            self.close_run_dir()

    def _fit(self) -> dict[str, Any]:
        if self.is_main:
            atomic_write_bytes(self.run_dir / "config.json", (self.cfg.to_json() + "\n").encode())
        self.writer = MetricsWriter(self.run_dir, enabled=self.is_main, tensorboard=self.cfg.logging.tensorboard)
        start = time.perf_counter()
        self._fit_origin = (start, self.global_step)
        rates = []
        try:
            with _log_through_tqdm():
                for hook in self.hooks:
                    hook.on_train_start(self)
                # A stop asked for before the first step (a signal during set-up) trains nothing.
                while self.epoch < self.cfg.schedule.epochs and not self._stop_reason:
                    record = self.train_epoch()
                    if record is None:  # stopped mid-epoch
                        break
                    rates.append(record["train_images_per_s"])
        finally:
            for hook in self.hooks:
                hook.on_train_end(self)
            self.writer.close()
        return {"epochs": self.epoch, "global_step": self.global_step, "last_eval": self.last_eval,
                "best_top1": self.best_top1, "stopped": self._stop_reason,
                "train_images_per_s": float(np.mean(rates)) if rates else None,
                "seconds": time.perf_counter() - start}

    def eta_seconds(self) -> float | None:
        """Seconds left for the whole run (every remaining epoch, evaluations included) at this run's pace so far."""
        origin = self._fit_origin
        if origin is None or self.global_step <= origin[1]:
            return None
        total = self.cfg.schedule.epochs * self.steps_per_epoch()
        pace = (time.perf_counter() - origin[0]) / (self.global_step - origin[1])
        return max(total - self.global_step, 0) * pace

    def train_epoch(self) -> dict[str, Any] | None:
        """Run (the rest of) epoch ``self.epoch``, evaluate, checkpoint; returns its record (None if stopped)."""
        cfg, epoch = self.cfg, self.epoch
        lr = cfg.lr_at(epoch)
        set_lr(self.optimizer, lr)
        # Mid-epoch resume: a batch is a function of (seed, epoch, step), so the loader starts at the step
        # after the checkpoint's without reading the batches before it.
        self.train_loader.set_epoch(epoch, start_step=self.step_in_epoch)
        self.model.train()
        num_steps = self.steps_per_epoch()
        batches = iter(self.train_loader)
        if self.step_in_epoch:
            log.info("resuming epoch %d at step %d/%d", epoch, self.step_in_epoch, num_steps)
        bar = tqdm(total=num_steps, initial=self.step_in_epoch, desc=f"epoch {epoch}", dynamic_ncols=True,
                   disable=not (self.is_main and progress_enabled(cfg.logging.progress_bar)), leave=False)
        epoch_start = window_start = time.perf_counter()
        data_wait = epoch_data_wait = 0.0
        epoch_sums: dict[str, float] = {}
        epoch_samples = 0
        while self.step_in_epoch < num_steps:
            raise_if_interrupted()
            for hook in self.hooks:
                hook.before_step(self)
            fetch = time.perf_counter()
            with phase("data"):
                try:
                    images, labels, *records = next(batches)  # a bank loader adds the batch's records
                except StopIteration:
                    break
            data_wait += time.perf_counter() - fetch
            parts = self.train_step(images, labels, records[0] if records else None)
            values = {k: parts[k] for k in self.part_names}
            # A percentage, as val_top1 is (one unit for accuracy everywhere).
            values["train_top1"] = topk_correct(parts["logits"].detach().float(), labels, (1,))[0] * (
                100.0 / labels.shape[0])
            self.meter.update(values, labels.shape[0])
            self.step_in_epoch += 1
            self.global_step += 1
            bar.update(1)
            for hook in self.hooks:
                hook.after_step(self, parts)
            last = self.step_in_epoch == num_steps
            # The only host syncs of the loop: at log intervals (STYLE), and before a stop.
            if self.global_step % cfg.logging.interval == 0 or last or self._stop_reason:
                means, count = self.meter.read(all_ranks=self.dist.distributed)
                self._check_finite_loss(means)
                now = time.perf_counter()
                self._log_interval(means, count, lr, now - window_start, data_wait, bar)
                for k, v in means.items():
                    epoch_sums[k] = epoch_sums.get(k, 0.0) + v * count
                epoch_samples += count
                epoch_data_wait += data_wait
                window_start, data_wait = now, 0.0
            every = cfg.runtime.checkpoint_every_steps
            # A stop on the epoch's last step lets the epoch finish (evaluation, epoch checkpoint) first.
            stop_now = self._stop_reason is not None and not last
            if stop_now or (every and self.global_step % every == 0 and not last):
                self.save_checkpoint()
            if stop_now:
                bar.close()
                log.info("stopping at epoch %d step %d (%s); checkpoint written", epoch, self.step_in_epoch,
                         self._stop_reason)
                return None
        bar.close()
        train_seconds = time.perf_counter() - epoch_start
        means = {k if k == "train_top1" else f"train_{k}": v / max(epoch_samples, 1) for k, v in epoch_sums.items()}
        record: dict[str, Any] = {"epoch": epoch, "global_step": self.global_step, "lr": lr, **means,
                                  "train_samples": epoch_samples, "train_seconds": train_seconds,
                                  "train_images_per_s": epoch_samples / train_seconds if train_seconds else math.nan,
                                  "data_wait": epoch_data_wait / train_seconds if train_seconds else math.nan}
        broadcast_buffers(self.model)  # every rank evaluates rank 0's BN statistics, the ones its checkpoint stores
        if self.val_loader is not None:
            self.last_eval = evaluate(self.model.student, self.val_loader, device=self.device,
                                      autocast_dtype=self.autocast_dtype,
                                      channels_last=self.memory_format == torch.channels_last,
                                      progress=self.is_main and cfg.logging.progress_bar, desc=f"eval {epoch}",
                                      all_ranks=self.dist.distributed)
            record.update({f"val_{k}": v for k, v in self.last_eval.items()})
            expected = getattr(self.val_loader, "dataset_size", None)
            if expected is not None and self.last_eval["count"] != expected:
                log.warning("evaluation counted %d images but the val split has %d", self.last_eval["count"],
                            expected)
            log.info("epoch %d | val top-1 %.2f top-5 %.2f loss %.4f | %d images, %.1f img/s", epoch,
                     self.last_eval["top1"], self.last_eval["top5"], self.last_eval["loss"], self.last_eval["count"],
                     self.last_eval["images_per_s"])
        top1 = self.last_eval["top1"] if self.last_eval is not None and self.val_loader is not None else None
        is_best = top1 is not None and (self.best_top1 is None or top1 > self.best_top1)
        if is_best:
            self.best_top1 = top1
        record["best_top1"] = self.best_top1
        eta = self.eta_seconds()
        if self.is_main:
            log.info("epoch %d done | best top-1 %s | run ETA %s", epoch,
                     "n/a" if self.best_top1 is None else f"{self.best_top1:.2f}", format_duration(eta))
        self.epoch, self.step_in_epoch = epoch + 1, 0
        # The checkpoint carries its own evaluation and epoch record (a resume re-adds a record a kill lost).
        self.save_checkpoint(top1=top1, is_best=is_best, record=record)
        self.history.append(record)
        self.writer.write("epoch", record)
        for hook in self.hooks:
            hook.on_epoch_end(self, record)
        return record

    def _log_interval(self, means: dict[str, float], count: int, lr: float, seconds: float, data_wait: float,
                      bar: tqdm) -> None:
        rate = count / seconds if seconds > 0 else math.nan
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.step_in_epoch, "global_step": self.global_step,
                                  "lr": lr, **means, "samples": count, "images_per_s": rate,
                                  "data_wait": data_wait / seconds if seconds > 0 else math.nan}
        if self.device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.writer.write("train", record)
        parts = " ".join(f"{k} {means[k]:.4f}" for k in self.part_names)
        eta = format_duration(self.eta_seconds())
        bar.set_postfix_str(f"{parts} lr {lr:g} {rate:.0f} img/s wait {100 * record['data_wait']:.0f}% run ETA {eta}",
                            refresh=False)
        if self.is_main:
            mem = f" | mem {record['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in record else ""
            log.info("epoch %d step %d/%d | %s | top-1 %.1f%% | lr %g | %.0f img/s | data wait %.0f%%%s | run ETA %s",
                     self.epoch, self.step_in_epoch, self.steps_per_epoch(), parts, means["train_top1"], lr, rate,
                     100 * record["data_wait"], mem, eta)

    def _check_finite_loss(self, means: dict[str, float]) -> None:
        bad = {k: means[k] for k in self.part_names if not math.isfinite(means[k])}
        if bad:
            raise NonFiniteError(self._non_finite_message("the loss", ", ".join(f"{k}={v}" for k, v in bad.items())))

    def _non_finite_message(self, what: str, detail: str) -> str:
        newest = self.checkpoints.checkpoints()
        good = (f"the last good checkpoint, {newest[0]}, is kept and --resume auto continues from it" if newest
                else "no checkpoint had been written yet")
        return (f"{what} became non-finite ({detail}) by global step {self.global_step} (epoch {self.epoch}): "
                f"stopped without writing a checkpoint or export from it; {good}. Lower optim.lr (now "
                f"{self.cfg.lr_at(self.epoch):g}) or check the data, then run again")

    def _check_finite_weights(self) -> None:
        """Before any save: the loss sums since the last log line, then every float tensor of the model (one sync)."""
        if not self.meter.all_finite(all_ranks=self.dist.distributed):
            raise NonFiniteError(self._non_finite_message("the loss", "since the last log line"))
        tensors = [(n, t) for n, t in self.model.state_dict().items() if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()
        bad = [n for (n, _), ok in zip(tensors, finite, strict=True) if not ok]
        if bad:
            raise NonFiniteError(self._non_finite_message("the weights", f"{len(bad)} tensor(s), e.g. {bad[0]}"))

    # ---------------------------------------------------------------------------- checkpoints

    def training_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: models, optimiser (momentum), scaler, position, RNG, config."""
        rng = [capture_rng_state()]
        if self.dist.distributed:
            import torch.distributed as tdist

            rng = [None] * self.dist.world_size
            tdist.all_gather_object(rng, capture_rng_state())  # each rank's own stream
        d = self.model.discriminator
        return {"format": FORMAT, "version": VERSION,
                "student": self.model.student.state_dict(),
                "discriminator": d.state_dict() if d is not None else None,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "best_top1": self.best_top1, "last_eval": self.last_eval, "rng": rng,
                "world_size": self.dist.world_size, "config": self.cfg.to_json()}

    def save_checkpoint(self, *, top1: float | None = None, is_best: bool = False,
                        record: dict[str, Any] | None = None) -> Path | None:
        """Write the full state (rank 0), then ``best.pt`` and the student's weights alone derived from it.

        Nothing is written from non-finite weights (:class:`NonFiniteError`), nor into a run dir that
        vanished (:class:`~fastmeal.rundir.RunDirVanishedError`). Collective in a distributed run (the
        finiteness check and the RNG states): call it on every rank.

        Args:
            top1: this state's validation top-1 (epoch end), or None.
            is_best: whether ``top1`` beats every earlier evaluation of the run.
            record: the epoch's metrics record (epoch end), kept in the checkpoint.
        """
        self._check_finite_weights()
        state = {**self.training_state(), "top1": top1, "is_best": is_best, "epoch_record": record}
        if not self.is_main:
            return None
        self.lock.check()
        if self._saved_once and not self.checkpoints.directory.is_dir():
            raise RunDirVanishedError(f"{self.checkpoints.directory} vanished while training (deleted?): stopping "
                                      "without writing anything; the metrics in the run dir end at global step "
                                      f"{self.global_step}")
        try:
            path = self.checkpoints.save(state, global_step=self.global_step, top1=top1)
        except (FileNotFoundError, CheckpointError):
            self.lock.check()  # deleted under our feet: say so rather than a bare missing temporary
            if self.checkpoints.directory.is_dir():
                raise
            raise RunDirVanishedError(f"{self.checkpoints.directory} vanished during a save (deleted?): stopping "
                                      "without a checkpoint of this step") from None
        self._saved_once = True
        log.info("checkpoint %s (epoch %d, step %d in epoch, global step %d)", path, self.epoch, self.step_in_epoch,
                 self.global_step)
        return path

    def load_training_state(self, state: dict[str, Any], *, source: str = "checkpoint") -> None:
        """Restore what :meth:`training_state` saved (models, optimiser, scaler, position, RNG)."""
        load_state_dict_checked(self.model.student, state["student"], source=f"{source} (student)")
        d = self.model.discriminator
        if d is not None:
            if state.get("discriminator") is None:
                raise CheckpointError(f"{source} has no discriminator but loss.mode=meal_v2 uses one")
            load_state_dict_checked(d, state["discriminator"], source=f"{source} (discriminator)")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{source}: the optimiser state does not fit this run ({err}); was it written "
                                  "with another loss.mode or model?") from err
        init_momentum_buffers(self.optimizer)  # a state saved before any step has none (see build_optimizer)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.best_top1 = state.get("best_top1")
        self.last_eval = state.get("last_eval")
        rng = state.get("rng") or []
        if len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank])
        elif rng:
            log.warning("%s was written by %d rank(s), this run has %d: RNG streams are re-seeded, not restored",
                        source, len(rng), self.dist.world_size)
            seed_everything(self.cfg.runtime.seed + self.global_step + self.dist.rank)

    def resume(self, spec: str) -> Path | None:
        """Continue from a checkpoint: ``auto`` (the newest valid one in the run dir, if any) or a path.

        Returns:
            The checkpoint used, or None (``auto`` with no checkpoint: a fresh start).

        Raises:
            CheckpointError: an explicit path that is damaged, or ``auto`` when every checkpoint is.
        """
        if not spec:
            return None
        self.open_run_dir(resuming=True)
        if spec == "auto":
            path, state, skipped = self.checkpoints.find_latest_valid(map_location="cpu")
            # A run dir that some node does not see would silently start those ranks from scratch.
            check_ranks_agree(path.name if path else None, "the checkpoint to resume from (resume=auto)",
                              hint=f"runtime.run_dir={self.run_dir} must be on a file system every node sees",
                              error=CheckpointError)
            for bad, reason in skipped:
                log.warning("resume: skipped damaged checkpoint %s: %s", bad, reason)
            if path is None:
                if skipped:
                    raise CheckpointError(f"resume=auto: every checkpoint in {self.checkpoints.directory} is "
                                          f"damaged ({len(skipped)} tried; see the warnings above); "
                                          f"{self.checkpoints.describe_best()}")
                self._start_over_warning()
                return None
            if self.is_main:
                for bad, _ in skipped:
                    aside = self.checkpoints.set_aside(bad)
                    log.warning("renamed the damaged checkpoint %s to %s", bad.name, aside.name)
        else:
            path, state = Path(spec), load_checkpoint(spec, map_location="cpu")
        self.load_training_state(state, source=str(path))
        if self.is_main:
            if path.parent.resolve() == self.checkpoints.directory.resolve() and path.name != "best.pt":
                self.checkpoints.heal(path, state)
            self._heal_metrics(state)
        log.info("resumed from %s: epoch %d, step %d in the epoch, global step %d", path, self.epoch,
                 self.step_in_epoch, self.global_step)
        return path

    def _start_over_warning(self) -> None:
        metrics = self.run_dir / "metrics.jsonl"
        if self.is_main and metrics.is_file() and metrics.stat().st_size:
            aside = metrics.with_name(f"metrics-before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            os.replace(metrics, aside)
            log.warning("resume=auto: no checkpoint in %s although %s records an earlier run (checkpoints deleted?): "
                        "starting from step 0; the old metrics are kept as %s", self.checkpoints.directory,
                        metrics.name, aside.name)
        else:
            log.info("resume=auto: no checkpoint in %s; starting from scratch", self.checkpoints.directory)

    def _heal_metrics(self, state: dict[str, Any]) -> None:
        """Make ``metrics.jsonl`` hold exactly the records up to the checkpoint: drop those of steps it will redo,
        re-add the checkpoint's own epoch record when a kill came between the two writes."""
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        rows = []
        for line in lines:
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
        step = int(state["global_step"])
        keep = [r for r in rows if int(r.get("global_step", 0)) <= step]
        record = state.get("epoch_record")
        if record and int(state["step_in_epoch"]) == 0 and not any(
                r.get("kind") == "epoch" and r.get("epoch") == record.get("epoch") for r in keep):
            keep.append({"kind": "epoch", **record})
        if len(keep) != len(lines) or keep != rows:
            text = "".join(json.dumps(finite_json(r), default=jsonable) + "\n" for r in keep)
            atomic_write_bytes(path, text.encode())
            log.info("metrics.jsonl now ends at the checkpoint's global step %d (%d record(s) of later steps "
                     "dropped, %d re-added)", step, len([r for r in rows if int(r.get("global_step", 0)) > step]),
                     len(keep) - len([r for r in rows if int(r.get("global_step", 0)) <= step]))


# --------------------------------------------------------------------------------------------
# From a config
# --------------------------------------------------------------------------------------------


def _log_through_tqdm() -> contextlib.AbstractContextManager:
    """Route console log lines through tqdm so they do not tear the progress bar.

    Only loggers that have a console handler are redirected (tqdm's helper adds a handler to every
    logger it is given, which would print each line twice through a propagating child logger).
    """
    import sys

    from tqdm.contrib.logging import logging_redirect_tqdm

    def console(handler: logging.Handler) -> bool:
        return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)

    loggers = [lg for lg in (logging.root, logging.getLogger("fastmeal")) if any(map(console, lg.handlers))]
    return logging_redirect_tqdm(loggers=loggers) if loggers else contextlib.nullcontext()


def check_split_classes(cfg: Config, train_loader: Any, val_loader: Any | None) -> None:
    """Fail when the train and val splits do not have the same class names (label i means one class in both)."""
    train_classes = getattr(train_loader, "classes", None)
    val_classes = getattr(val_loader, "classes", None) if val_loader is not None else None
    if train_classes is None or val_classes is None or tuple(train_classes) == tuple(val_classes):
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    parts = [f"only in train/: {', '.join(only_train[:10])}" if only_train else "",
             f"only in val/: {', '.join(only_val[:10])}" if only_val else ""]
    differ = "; ".join(p for p in parts if p) or "the same names in another order"
    raise SetupError(f"data.root={cfg.data.root!r}: the train split has {len(train_classes)} classes and the val split "
                     f"{len(val_classes)}, and their names differ ({differ}); labels come from the sorted folder "
                     "names, so both splits must hold the same class folders (fastmeal data check lists them)")


def check_dataset_classes(cfg: Config, loader: Any, split: str) -> None:
    """Fail with the fix when a split's class count differs from ``model.num_classes``."""
    if loader.num_classes != cfg.model.num_classes:
        raise SetupError(f"data.root={cfg.data.root!r}: the {split} split has {loader.num_classes} classes but "
                         f"model.num_classes={cfg.model.num_classes}; set --set model.num_classes={loader.num_classes}"
                         " (teachers, student and dataset must agree)")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_trainer(cfg: Config, *, dist: DistInfo | None = None, hooks: Sequence[TrainerHook] = ()) -> Trainer:
    """Build loaders, student, teachers and discriminator from ``cfg`` and wrap them in a :class:`Trainer`.

    Models are initialised from ``runtime.seed`` (the same on every rank; DDP broadcasts rank 0's
    anyway); after that each rank draws from ``seed + rank`` (CutMix, dropout).
    """
    from fastmeal.data import build_loader
    from fastmeal.distributed import check_global_batches, init_distributed, per_rank_batch, world_size_from_env
    from fastmeal.models.factory import build_discriminator, build_student, build_teachers

    # Before joining the process group, so that every rank fails at once instead of waiting for the others.
    check_global_batches(cfg.data, dist.world_size if dist else world_size_from_env())
    dist = dist or init_distributed(cfg.runtime.device)
    seed_everything(cfg.runtime.seed)
    # Built, not started: no loader thread or worker runs before the teachers' graphs are captured below.
    train_loader = build_loader(cfg, "train", rank=dist.rank, world_size=dist.world_size, device=dist.device)
    val_loader = build_loader(cfg, "val", rank=dist.rank, world_size=dist.world_size, device=dist.device)
    check_split_classes(cfg, train_loader, val_loader)  # before any model is built or downloaded
    check_dataset_classes(cfg, train_loader, "train")
    if cfg.bank.path:  # soft labels from the bank: the teachers are neither built nor loaded
        from fastmeal.bank.replay import BankLoader, open_bank

        train_loader = BankLoader(train_loader, open_bank(cfg, train_loader), dist.device)
    student = build_student(cfg)
    discriminator = build_discriminator(cfg)
    # The per-rank batch's CUDA graphs are captured here (a partial last batch is padded into them).
    teachers = (build_teachers(cfg, dist.device, batch_sizes=[per_rank_batch(cfg.data.batch_size, dist.world_size)])
                if cfg.loss.mode == "meal_v2" and not cfg.bank.path else None)
    seed_everything(cfg.runtime.seed + dist.rank)
    return Trainer(cfg, student=student, discriminator=discriminator, teachers=teachers, train_loader=train_loader,
                   val_loader=val_loader, dist=dist, hooks=hooks)


def train(cfg: Config, *, hooks: Sequence[TrainerHook] = ()) -> dict[str, Any]:
    """``fastmeal train``: build everything from ``cfg``, resume as ``runtime.resume`` says, fit.

    Returns:
        :meth:`Trainer.fit`'s summary, plus ``run_dir`` and ``resumed_from``.
    """
    from fastmeal.data import close_loaders
    from fastmeal.distributed import PreemptionHandler, shutdown
    from fastmeal.hooks import default_hooks
    from fastmeal.rundir import next_free_run_dir

    if cfg.runtime.if_exists == "new" and not cfg.runtime.resume:
        free = next_free_run_dir(Path(cfg.resolved_run_dir))
        if str(free) != cfg.resolved_run_dir:
            log.info("runtime.if_exists=new: %s holds a run; training into %s", cfg.resolved_run_dir, free)
            cfg = cfg.replace({"runtime.run_dir": str(free)})
    # SIGTERM/SIGUSR1 are caught from here to the end of the final exports: a signal during set-up stops
    # the run before its first step, one during the last save lets the save finish (exit 0, not -15).
    handler = PreemptionHandler().install()
    trainer = None
    try:
        # Graceful preemption and the profile.* step windows, then the caller's hooks.
        trainer = build_trainer(cfg, hooks=[*default_hooks(cfg, handler), *hooks])
        resumed = trainer.resume(cfg.runtime.resume)
        summary = trainer.fit()
    finally:
        if trainer is not None:
            trainer.close_run_dir()
        close_loaders()  # the loaders' worker processes end now, on every path (an exception included)
        shutdown()
        handler.uninstall()
    return {**summary, "run_dir": str(trainer.run_dir), "resumed_from": str(resumed) if resumed else None}
