"""The training loop: step, epoch, evaluation, logging. No model-, mode- or data-specific code.

One step (SPEC, "The algorithm, exactly"): the batch (CutMix applied when asked), the objective's
eager preparation (the online objective's frozen teachers), then the student's forward and the
objective's loss parts in one (compiled) module, **one** backward and **one** SGD step over the student
and the objective's discriminator together. What the mode is lives in :mod:`fastmeal.objectives`;
building a run in :mod:`fastmeal.run`; checkpoint files and resume in :mod:`fastmeal.checkpoint`; the
stop path in :mod:`fastmeal.lifecycle`.

For DDP the student and the objective are one :class:`~fastmeal.objectives.TrainedModel` (one wrapper, one gradient
all-reduce); teachers stay outside (frozen, never saved). Rank 0 logs and writes; evaluation sums
counts over ranks. :class:`~fastmeal.hooks.TrainerHook` objects are called around every step and epoch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastmeal import lifecycle
from fastmeal.batch import Batch, cutmix_
from fastmeal.checkpoint import FORMAT, VERSION, Checkpointer, CheckpointError, capture_rng_state, restore_rng_state
from fastmeal.config import Config
from fastmeal.console import format_duration, log_through_tqdm, progress_enabled
from fastmeal.data import check_loaders
from fastmeal.distributed import DistInfo, broadcast_buffers, configure_device, resolve_device
from fastmeal.errors import NonFiniteError, OutOfMemoryError, SetupError
from fastmeal.evaluate import evaluate, resolve_precision
from fastmeal.hooks import TrainerHook
from fastmeal.metrics import DeviceMeans, MetricsWriter, topk_correct
from fastmeal.models.factory import load_state_dict_checked, model_num_classes
from fastmeal.objectives import Objective, TrainedModel
from fastmeal.optim import build_optimizer, init_momentum_buffers
from fastmeal.profiling import phase

log = logging.getLogger("fastmeal.trainer")


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``runtime.compile``: ``on``, ``off``, or ``auto`` (on CUDA only)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


# torch.compile's arguments for the student's step. dynamic=False: the batch shape is fixed (a kept partial
# last batch compiles once more). Tests swap the backend for "aot_eager".
COMPILE_OPTIONS: dict[str, Any] = {"dynamic": False}


def _bytes(state: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Runs epochs of steps with per-epoch evaluation and checkpoints.

    Models and loaders are arguments, so tests can pass tiny in-memory ones; :func:`fastmeal.run.build_trainer`
    builds the real ones from a config.

    Args:
        cfg: the resolved config (written to ``run_dir/config.json`` and into every checkpoint).
        student: ``[B, 3, S, S] → [B, C]``; moved to the device here.
        objective: the training mode (:func:`fastmeal.objectives.build_objective`).
        train_loader, val_loader: the Loader protocol (``fastmeal.data.Loader``); ``val_loader`` may
            be None to skip evaluation.
        dist: this process's place in the world (default: a single process on ``runtime.device``).
        run_dir: where metrics, config and checkpoints go (default ``cfg.resolved_run_dir``).
        hooks: :class:`~fastmeal.hooks.TrainerHook` objects.
    """

    def __init__(self, cfg: Config, *, student: nn.Module, objective: Objective, train_loader: Any,
                 val_loader: Any | None, dist: DistInfo | None = None, run_dir: str | os.PathLike | None = None,
                 hooks: Sequence[TrainerHook] = ()) -> None:
        self.cfg = cfg
        self.dist = dist or DistInfo(device=resolve_device(cfg.runtime.device))
        self.device = self.dist.device
        self.run_dir = Path(run_dir if run_dir is not None else cfg.resolved_run_dir)
        self.hooks = list(hooks)
        if model_num_classes(student) != cfg.model.num_classes:
            raise SetupError(f"the student ({cfg.model.student}) predicts {model_num_classes(student)} classes but "
                             f"model.num_classes={cfg.model.num_classes}")
        check_loaders(cfg, train_loader, val_loader)
        if getattr(train_loader, "batch_size", 2) == 1 and any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules()):
            raise SetupError(f"data.batch_size={cfg.data.batch_size} gives 1 image per rank on {self.dist.world_size} "
                             f"rank(s): {cfg.model.student}'s BatchNorm cannot train on a batch of one; use at least "
                             f"2 images per rank (data.batch_size={2 * self.dist.world_size})")
        self.objective = objective
        self.train_loader, self.val_loader = train_loader, val_loader

        configure_device(cfg.runtime.cudnn_benchmark, self.device)
        self.autocast_dtype, use_scaler = resolve_precision(cfg.precision.mode, self.device)
        self.memory_format = torch.channels_last if cfg.precision.channels_last else torch.contiguous_format
        student = student.to(self.device, memory_format=self.memory_format)
        self.model = TrainedModel(student, objective.to(self.device), self.autocast_dtype)
        self.optimizer = build_optimizer(cfg, self.model, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.compiled = compile_enabled(cfg.runtime.compile, self.device)
        self.compile_failure: str | None = None  # why the compiled step fell back to eager, if it did
        self.eager_model: nn.Module = self.model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # BN statistics stay per GPU (SPEC: no SyncBN); D and the student share one all-reduce.
            # gradient_as_bucket_view: gradients live in the all-reduce buckets (no copy in, no copy out).
            # static_graph: every step uses every parameter the same way; not with torch.compile, whose DDP
            # graph splitting has had known problems with it.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.eager_model = DistributedDataParallel(self.model, device_ids=device_ids, gradient_as_bucket_view=True,
                                                       static_graph=not self.compiled)
        self.train_model: nn.Module = (torch.compile(self.eager_model, **COMPILE_OPTIONS) if self.compiled
                                       else self.eager_model)
        self.part_names = objective.part_names
        self.meter = DeviceMeans((*self.part_names, "train_top1"), self.device)
        self.checkpoints = Checkpointer(self.run_dir, keep_last=cfg.runtime.keep_last, dist=self.dist,
                                        if_exists=cfg.runtime.if_exists)
        self.writer = MetricsWriter(self.run_dir, enabled=False)  # fit() opens the real one (rank 0)
        self.stops: lifecycle.StopAgreement | None = None
        self._fit_origin: tuple[float, int] | None = None  # (time, global step) when fit() started: the ETA's pace
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.best_top1: float | None = None
        self.last_eval: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        self._resume_changes: list[Any] | None = None  # None: not resumed

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def steps_per_epoch(self) -> int:
        """Batches per epoch on this rank (``runtime.max_steps_per_epoch`` caps it)."""
        steps, cap = len(self.train_loader), self.cfg.runtime.max_steps_per_epoch
        return min(steps, cap) if cap else steps

    def request_stop(self, reason: str) -> None:
        """End :meth:`fit` after the current step, with a checkpoint (a hook's decision); the stop path of a signal."""
        lifecycle.request_stop(reason)

    # ---------------------------------------------------------------------------- one step

    def train_step(self, batch: Batch) -> dict[str, Tensor]:
        """One forward/backward/optimiser step on a batch; returns the loss parts and ``logits`` (device tensors)."""
        batch.images = batch.images.contiguous(memory_format=self.memory_format)
        if self.cfg.data.cutmix:
            cutmix_(batch, seed=self.cfg.runtime.seed, epoch=self.epoch, step=self.step_in_epoch)
        self.objective.prepare(batch)
        try:
            try:
                out = self._forward_backward(batch)
            except Exception as err:
                if not self.compiled or isinstance(err, torch.cuda.OutOfMemoryError):
                    raise
                self._fall_back_to_eager(err)  # any compile/codegen failure: the same step, eagerly
                out = self._forward_backward(batch)
            with phase("optimizer"):
                self.scaler.step(self.optimizer)
                self.scaler.update()
        except torch.cuda.OutOfMemoryError as err:
            per_rank = batch.images.shape[0]
            raise OutOfMemoryError(
                f"out of GPU memory in a training step of {per_rank} images per rank (data.batch_size="
                f"{self.cfg.data.batch_size} over {self.dist.world_size} rank(s)): lower data.batch_size or use "
                f"more GPUs (the batch the optimiser sees then changes: adjust optim.lr); {err}") from None
        return {name: value.detach() for name, value in out.items()}  # for logging: no graph kept alive

    def _forward_backward(self, batch: Batch) -> dict[str, Tensor]:
        # Compiled, the student's forward and the loss are one region (their own phases would break the graph).
        with phase("student_fwd") if self.compiled else contextlib.nullcontext():
            out = self.train_model(batch.images, batch.labels, batch.targets)
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out["loss"]).backward()
        return out

    def _fall_back_to_eager(self, err: Exception) -> None:
        """After a failure of the compiled step (before the optimiser step): continue eagerly, and say so."""
        self.compiled = False
        self.train_model = self.eager_model
        self.optimizer.zero_grad(set_to_none=True)  # a backward that failed half-way may have left gradients
        # The first lines: torch's wrappers put the cause on the line after "backend=... raised:".
        head = " ".join(line.strip() for line in str(err).splitlines() if line.strip())[:400]
        self.compile_failure = f"{type(err).__name__}: {head}"
        log.warning("torch.compile of the student's step failed at global step %d (%s); continuing eagerly "
                    "(runtime.compile=off skips the attempt)", self.global_step, self.compile_failure)
        self.writer.write("compile_fallback", {"epoch": self.epoch, "step": self.step_in_epoch,
                                               "global_step": self.global_step, "cause": self.compile_failure})

    # ---------------------------------------------------------------------------- epochs

    def fit(self) -> dict[str, Any]:
        """Train from the current position (fresh, or after :meth:`resume`) to ``schedule.epochs``.

        Returns:
            A summary: ``epochs`` done, ``global_step``, ``last_eval``, ``best_top1``, ``stopped`` (how a
            stop request ended it, or None), ``train_images_per_s`` (mean over this call's epochs), ``seconds``.
        """
        with lifecycle.handling_stops():
            self.checkpoints.open(resuming=False)
            try:
                return self._fit()
            finally:
                self.checkpoints.close()

    def _fit(self) -> dict[str, Any]:
        from fastmeal.checkpoint import atomic_write_bytes

        if self.is_main:
            if self._resume_changes is None or not (self.run_dir / "config.json").is_file():  # keep the original
                atomic_write_bytes(self.run_dir / "config.json", (self.cfg.to_json() + "\n").encode())
            self.checkpoints.clear_marker()
            self.checkpoints.report_disk_needs(_bytes(self.model.state_dict()), _bytes(self.model.student.state_dict()))
        self.writer = MetricsWriter(self.run_dir, enabled=self.is_main, tensorboard=self.cfg.logging.tensorboard)
        for change in self._resume_changes or ():  # each accepted change of config, with the step it took effect
            self.writer.write("config_change", {"global_step": self.global_step, "key": change.key,
                                                "old": change.old, "new": change.new})
        start = time.perf_counter()
        self._fit_origin = (start, self.global_step)
        self.stops = lifecycle.StopAgreement()
        rates, stopped = [], None
        try:
            with log_through_tqdm():
                for hook in self.hooks:
                    hook.on_train_start(self)
                # A stop asked for before the first step (a signal during set-up) trains nothing.
                while self.epoch < self.cfg.schedule.epochs and not self._should_stop():
                    record = self.train_epoch()
                    if record is None:  # stopped mid-epoch
                        break
                    rates.append(record["train_images_per_s"])
            stopped = self.stops.reason
            self.stops.finish()  # the last agreement exchange, before any barrier or the process group's end
        finally:  # (after an error the exchange is abandoned: a lost peer would make it wait for the timeout)
            for hook in self.hooks:
                hook.on_train_end(self)
            self.writer.close()
        if stopped is not None:
            self.checkpoints.after_stop(stopped, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                                        global_step=self.global_step)
        return {"epochs": self.epoch, "global_step": self.global_step, "last_eval": self.last_eval,
                "best_top1": self.best_top1, "stopped": lifecycle.describe(stopped) if stopped else None,
                "train_images_per_s": float(np.mean(rates)) if rates else None,
                "seconds": time.perf_counter() - start}

    def _should_stop(self) -> bool:
        """The ranks' agreed answer (one CPU exchange a step; no GPU sync); logs the stop once."""
        before = self.stops.reason
        stop = self.stops.should_stop()
        if stop and before is None:
            log.warning("%s: stopping after global step %d with a checkpoint", lifecycle.describe(self.stops.reason),
                        self.global_step)
        return stop

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
        for group in self.optimizer.param_groups:  # SPEC: one LR for every group, set once per epoch
            group["lr"] = lr
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
            for hook in self.hooks:
                hook.before_step(self)
            fetch = time.perf_counter()
            with phase("data"):
                try:
                    batch = Batch.of(next(batches))
                except StopIteration:
                    break
            data_wait += time.perf_counter() - fetch
            parts = self.train_step(batch)
            values = {k: parts[k] for k in self.part_names}
            values["train_top1"] = topk_correct(parts["logits"].float(), batch.labels, (1,))[0] * (
                100.0 / batch.labels.shape[0])  # a percentage, as val_top1 is
            self.meter.update(values, batch.labels.shape[0])
            self.step_in_epoch += 1
            self.global_step += 1
            bar.update(1)
            for hook in self.hooks:
                hook.after_step(self, parts)
            last = self.step_in_epoch == num_steps
            stop = self._should_stop()
            # The only host syncs of the loop: at log intervals (STYLE), and before a stop.
            if self.global_step % cfg.logging.interval == 0 or last or stop:
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
            if (stop or (every and self.global_step % every == 0)) and not last:
                self.save_checkpoint()
            if stop and not last:
                bar.close()
                return None
        bar.close()
        train_seconds = time.perf_counter() - epoch_start
        means = {k if k == "train_top1" else f"train_{k}": v / max(epoch_samples, 1) for k, v in epoch_sums.items()}
        record: dict[str, Any] = {"epoch": epoch, "global_step": self.global_step, "lr": lr, **means,
                                  "train_samples": epoch_samples, "train_seconds": train_seconds,
                                  "train_images_per_s": epoch_samples / train_seconds if train_seconds else math.nan,
                                  "data_wait": epoch_data_wait / train_seconds if train_seconds else math.nan}
        broadcast_buffers(self.model)  # every rank evaluates rank 0's BN statistics, the ones its checkpoint stores
        self.epoch, self.step_in_epoch = epoch + 1, 0
        if self.val_loader is not None:  # the epoch's training is on disk before its evaluation can fail
            self.save_checkpoint(record=record)
        top1 = self._evaluate(epoch, record)
        is_best = top1 is not None and (self.best_top1 is None or top1 > self.best_top1)
        if is_best:
            self.best_top1 = top1
        record["best_top1"] = self.best_top1
        if self.is_main:
            log.info("epoch %d done | best top-1 %s | run ETA %s", epoch,
                     "n/a" if self.best_top1 is None else f"{self.best_top1:.2f}", format_duration(self.eta_seconds()))
        # The same step's checkpoint again, now with its evaluation and epoch record (a resume re-adds a record a
        # kill lost); best.pt follows it.
        self.save_checkpoint(top1=top1, is_best=is_best, record=record)
        self.history.append(record)
        self.writer.write("epoch", record)
        for hook in self.hooks:
            hook.on_epoch_end(self, record)
        self._should_stop()  # a stop during the evaluation: the epoch's checkpoint, just written, is the resume point
        return record

    def _evaluate(self, epoch: int, record: dict[str, Any]) -> float | None:
        """Evaluate the student on the val split (if any), add ``val_*`` to ``record``; returns the top-1."""
        if self.val_loader is None:
            return None
        self.last_eval = evaluate(self.model.student, self.val_loader, device=self.device,
                                  autocast_dtype=self.autocast_dtype,
                                  channels_last=self.memory_format == torch.channels_last,
                                  progress=self.is_main and self.cfg.logging.progress_bar, desc=f"eval {epoch}",
                                  all_ranks=self.dist.distributed, stoppable=False)
        record.update({f"val_{k}": v for k, v in self.last_eval.items()})
        expected = getattr(self.val_loader, "dataset_size", None)
        if expected is not None and self.last_eval["count"] != expected:
            log.warning("evaluation counted %d images but the val split has %d", self.last_eval["count"], expected)
        log.info("epoch %d | val top-1 %.2f top-5 %.2f loss %.4f | %d images, %.1f img/s", epoch,
                 self.last_eval["top1"], self.last_eval["top5"], self.last_eval["loss"], self.last_eval["count"],
                 self.last_eval["images_per_s"])
        return self.last_eval["top1"]

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
        newest = self.checkpoints.manager.checkpoints()
        good = (f"the last good checkpoint, {newest[0]}, is kept and --resume auto continues from it" if newest
                else "no checkpoint had been written yet")
        return (f"{what} became non-finite ({detail}) by global step {self.global_step} (epoch {self.epoch}): "
                f"stopped without writing a checkpoint or export from it; {good}. Lower optim.lr (now "
                f"{self.cfg.lr_at(self.epoch):g}) or check the data, then run again")

    # ---------------------------------------------------------------------------- state

    def training_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: models, optimiser (momentum), scaler, position, RNG, config."""
        rng = [capture_rng_state()]
        if self.dist.distributed:
            import torch.distributed as tdist

            rng = [None] * self.dist.world_size
            tdist.all_gather_object(rng, capture_rng_state())  # each rank's own stream
        d = self.model.objective.discriminator
        return {"format": FORMAT, "version": VERSION,
                "student": self.model.student.state_dict(),
                "discriminator": d.state_dict() if d is not None else None,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "best_top1": self.best_top1, "last_eval": self.last_eval, "rng": rng,
                "world_size": self.dist.world_size, "config": self.cfg.to_json()}

    def save_checkpoint(self, *, top1: float | None = None, is_best: bool = False,
                        record: dict[str, Any] | None = None) -> Path | None:
        """Write the full state (rank 0), then ``best.pt`` and the exports derived from it; collective.

        Nothing is written from non-finite weights (:class:`~fastmeal.errors.NonFiniteError`).

        Args:
            top1: this state's validation top-1 (epoch end), or None.
            is_best: whether ``top1`` beats every earlier evaluation of the run.
            record: the epoch's metrics record (epoch end), kept in the checkpoint.
        """
        if not self.meter.all_finite(all_ranks=self.dist.distributed):
            raise NonFiniteError(self._non_finite_message("the loss", "since the last log line"))
        tensors = [(n, t) for n, t in self.model.state_dict().items() if t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]).tolist()  # one sync
        bad = [n for (n, _), ok in zip(tensors, finite, strict=True) if not ok]
        if bad:
            raise NonFiniteError(self._non_finite_message("the weights", f"{len(bad)} tensor(s), e.g. {bad[0]}"))
        state = {**self.training_state(), "top1": top1, "is_best": is_best, "epoch_record": record}
        return self.checkpoints.save(state)

    def load_training_state(self, state: dict[str, Any], *, source: str = "checkpoint") -> None:
        """Restore what :meth:`training_state` saved (models, optimiser, scaler, position, RNG)."""
        load_state_dict_checked(self.model.student, state["student"], source=f"{source} (student)")
        d = self.model.objective.discriminator
        if d is not None:
            if state.get("discriminator") is None:
                raise CheckpointError(f"{source} has no discriminator but loss.mode={self.cfg.loss.mode} uses one")
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

    def resume(self, spec: str, *, allowed: frozenset[str] = frozenset()) -> Path | None:
        """Continue from a checkpoint: ``auto`` (the newest valid one in the run dir, if any) or a path.

        The checkpoint's config and this run's are compared key by key (:func:`fastmeal.config.resume_changes`):
        a change of what the run computes is refused unless ``allowed`` names it (``--allow-changed``); the
        accepted ones are logged and recorded in ``metrics.jsonl`` with the step they take effect at.

        Returns:
            The checkpoint used, or None (``auto`` with no checkpoint: a fresh start).
        """
        if not spec:
            return None
        self.checkpoints.open(resuming=True)
        path, state = self.checkpoints.resume(spec)
        if state is None:
            return None
        self._resume_changes = self.checkpoints.accept_config(state, self.cfg, allowed=allowed)
        self.load_training_state(state, source=str(path))
        self.checkpoints.repair(path, state)
        log.info("resumed from %s: epoch %d, step %d in the epoch, global step %d", path, self.epoch,
                 self.step_in_epoch, self.global_step)
        return path
