"""Trainer hooks for runs that last days: graceful preemption and profiler step windows.

:func:`default_hooks` is what ``fastmeal train`` runs with: a :class:`PreemptionHook` (SIGTERM /
SIGUSR1 → finish the step, checkpoint on every rank's agreement, return normally so the process exits
0) and a :class:`ProfilerHook` (``profile.nsys_steps`` / ``profile.torch_steps``). They live here, not
in ``distributed.py`` / ``profiling.py``, because they subclass :class:`~fastmeal.trainer.TrainerHook`
and the trainer imports those two modules.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from torch import Tensor

from fastmeal.checkpoint import atomic_write_bytes
from fastmeal.config import Config, ProfileConfig
from fastmeal.distributed import PreemptionHandler, barrier
from fastmeal.profiling import ProfileWindows
from fastmeal.trainer import Trainer, TrainerHook

log = logging.getLogger("fastmeal.hooks")

PREEMPTED_MARKER = "preempted.json"


class PreemptionHook(TrainerHook):
    """Stops the run after the step during which SIGTERM or SIGUSR1 arrived, with a checkpoint.

    The signal handlers are installed when training starts (a signal during set-up keeps its default
    action). DataLoader workers, which torchrun (it signals each rank's process group) and SLURM (every
    process of a step) reach too, ignore the signals
    (:func:`~fastmeal.distributed.ignore_preemption_signals`). After every step the ranks agree
    (:meth:`PreemptionHandler.should_stop`, one CPU all-reduce), so a signal that reached one rank
    stops all of them at the same step; :meth:`Trainer.request_stop` then writes the checkpoint
    (mid-epoch: it records the step within the epoch) and :meth:`Trainer.fit` returns.

    When the stop came from a signal, rank 0 writes ``run_dir/preempted.json`` (the signal, the
    position and the checkpoint), which a job script reads to requeue itself; a starting run removes
    it. ``--resume auto`` continues from that checkpoint.

    Args:
        handler: the signal handler (default: a new :class:`PreemptionHandler`).
    """

    def __init__(self, handler: PreemptionHandler | None = None) -> None:
        self._owns_handler = handler is None
        self.handler = handler or PreemptionHandler()
        self.stop_requested = False

    def on_train_start(self, trainer: Trainer) -> None:
        self.handler.install()
        if trainer.is_main:
            (trainer.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        self._check(trainer)  # a signal that arrived during set-up: stop before the first step

    def after_step(self, trainer: Trainer, parts: dict[str, Tensor]) -> None:  # noqa: ARG002 - hook signature
        self._check(trainer)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:  # noqa: ARG002 - hook signature
        # A signal during the evaluation: the epoch's checkpoint, just written, is the resume point.
        self._check(trainer)

    def _check(self, trainer: Trainer) -> None:
        if not self.stop_requested and self.handler.should_stop():
            self.stop_requested = True
            trainer.request_stop(f"preempted by {self.handler.signal_name}")
            log.warning("%s received: stopping after global step %d with a checkpoint", self.handler.signal_name,
                        trainer.global_step)

    def on_train_end(self, trainer: Trainer) -> None:
        self.handler.finish()  # the last agreement exchange, before any barrier or the process group's end
        if self._owns_handler:
            self.handler.uninstall()
        if not self.stop_requested:
            return
        if trainer.is_main:
            self._write_marker(trainer)
        # No rank leaves before rank 0 has written the checkpoint and the marker: torchrun exits non-zero
        # after a forwarded signal, and a launcher that kills the job when one node's process fails
        # (srun --kill-on-bad-exit) would otherwise cut rank 0's write short.
        barrier()

    def _write_marker(self, trainer: Trainer) -> None:
        # Only a stop that reached its checkpoint is a preemption to resume from (fit may have raised).
        checkpoint = trainer.checkpoints.path_for(trainer.global_step)
        if not checkpoint.is_file():
            if trainer.global_step == 0:
                log.warning("stopped by %s before the first step: nothing to resume from", self.handler.signal_name)
                return
            log.error("stopped by %s but no checkpoint for global step %d exists in %s", self.handler.signal_name,
                      trainer.global_step, checkpoint.parent)
            return
        marker = {"signal": self.handler.signal_name, "epoch": trainer.epoch, "step_in_epoch": trainer.step_in_epoch,
                  "global_step": trainer.global_step, "checkpoint": str(checkpoint)}
        atomic_write_bytes(trainer.run_dir / PREEMPTED_MARKER, (json.dumps(marker) + "\n").encode())
        log.warning("preempted at epoch %d step %d (global step %d); resume with --resume auto", trainer.epoch,
                    trainer.step_in_epoch, trainer.global_step)


class ProfilerHook(TrainerHook):
    """Drives :class:`ProfileWindows` from the loop: ``profile.nsys_steps`` and ``profile.torch_steps``.

    Steps are global optimiser steps counted from the start of the run (a resumed run keeps counting).
    The torch.profiler trace goes to ``run_dir/trace_rank{rank}.json``.

    Args:
        profile: the ``profile`` section of the config.
    """

    def __init__(self, profile: ProfileConfig) -> None:
        self.profile = profile
        self.windows: ProfileWindows | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        p = self.profile
        self.windows = ProfileWindows(p.nsys_window, p.torch_window, trainer.run_dir, rank=trainer.dist.rank,
                                      device=trainer.device)
        if p.nsys_window and trainer.device.type != "cuda" and trainer.is_main:
            log.warning("profile.nsys_steps=%s needs CUDA; ignored on %s", p.nsys_steps, trainer.device)

    def before_step(self, trainer: Trainer) -> None:
        self.windows.before_step(trainer.global_step)

    def after_step(self, trainer: Trainer, parts: dict[str, Tensor]) -> None:  # noqa: ARG002 - hook signature
        self.windows.after_step(trainer.global_step - 1)  # the step just done; global_step already counts it

    def on_train_end(self, trainer: Trainer) -> None:
        if self.windows is None:
            return
        self.windows.close()
        if self.windows.trace_path is not None and trainer.is_main:
            log.info("torch.profiler trace of steps %s: %s (rank 0; every rank writes its own)",
                     self.profile.torch_steps, self.windows.trace_path)


def default_hooks(cfg: Config, handler: PreemptionHandler | None = None) -> list[TrainerHook]:
    """The hooks ``fastmeal train`` runs with: graceful preemption and the profiler windows of ``cfg.profile``.

    Args:
        handler: an installed handler that outlives the fit (``train`` installs it before set-up and
            removes it after the final exports); None: the hook installs and removes its own.
    """
    return [PreemptionHook(handler), ProfilerHook(cfg.profile)]
