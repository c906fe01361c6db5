"""Trainer hooks: the extension points called around every step and epoch, and the profiler windows.

:func:`default_hooks` is what ``fastmeal train`` runs with: a :class:`ProfilerHook` (``profile.nsys_steps`` /
``profile.torch_steps``). Stops (preemption, Ctrl-C) are not hooks: they go through :mod:`fastmeal.lifecycle`.
A hook is given the trainer (:class:`fastmeal.trainer.Trainer`); this module does not import it.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor

from fastmeal.config import Config, ProfileConfig
from fastmeal.profiling import ProfileWindows

log = logging.getLogger("fastmeal.hooks")


class TrainerHook:
    """Called by the trainer at fixed points; override what you need. All methods are no-ops here.

    ``trainer.global_step`` counts the optimiser steps done, ``trainer.epoch`` is the current epoch
    (0-based) and ``trainer.step_in_epoch`` the steps done in it.
    """

    def on_train_start(self, trainer: Any) -> None:
        """Before the first step (after any resume)."""

    def before_step(self, trainer: Any) -> None:
        """Before a step fetches its batch; ``trainer.global_step`` is the step about to run."""

    def after_step(self, trainer: Any, parts: dict[str, Tensor]) -> None:
        """After the optimiser step; ``parts`` are the step's loss tensors (on the device: no sync)."""

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        """After an epoch's evaluation and checkpoint; ``record`` is the epoch's JSONL record."""

    def on_train_end(self, trainer: Any) -> None:
        """After the last epoch, or after a stop (always called)."""


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

    def on_train_start(self, trainer: Any) -> None:
        p = self.profile
        self.windows = ProfileWindows(p.nsys_window, p.torch_window, trainer.run_dir, rank=trainer.dist.rank,
                                      device=trainer.device)
        if p.nsys_window and trainer.device.type != "cuda" and trainer.is_main:
            log.warning("profile.nsys_steps=%s needs CUDA; ignored on %s", p.nsys_steps, trainer.device)

    def before_step(self, trainer: Any) -> None:
        self.windows.before_step(trainer.global_step)

    def after_step(self, trainer: Any, parts: dict[str, Tensor]) -> None:  # noqa: ARG002 - hook signature
        self.windows.after_step(trainer.global_step - 1)  # the step just done; global_step already counts it

    def on_train_end(self, trainer: Any) -> None:
        if self.windows is None:
            return
        self.windows.close()
        if self.windows.trace_path is not None and trainer.is_main:
            log.info("torch.profiler trace of steps %s: %s (rank 0; every rank writes its own)",
                     self.profile.torch_steps, self.windows.trace_path)


def default_hooks(cfg: Config) -> list[TrainerHook]:
    """The hooks ``fastmeal train`` runs with: the profiler windows of ``cfg.profile``."""
    return [ProfilerHook(cfg.profile)]
