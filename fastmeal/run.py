"""``fastmeal train``: a config in, a finished (or cleanly stopped) run out.

:func:`build_trainer` builds a run's parts from its config (process group, loaders, student, the
objective of ``loss.mode`` with its teachers or bank), :func:`train` resumes and fits it. Stop requests
(Ctrl-C, SIGTERM, SIGUSR1) are recorded from the CLI's start on (:mod:`fastmeal.lifecycle`): one during
set-up ends it at the next phase, one during training after the current step, with a checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastmeal import lifecycle
from fastmeal.config import Config
from fastmeal.distributed import DistInfo
from fastmeal.hooks import TrainerHook, default_hooks
from fastmeal.trainer import Trainer, seed_everything

log = logging.getLogger("fastmeal.run")


def build_trainer(cfg: Config, *, dist: DistInfo | None = None, hooks: Sequence[TrainerHook] = ()) -> Trainer:
    """Build loaders, student and objective from ``cfg`` and wrap them in a :class:`~fastmeal.trainer.Trainer`.

    Models are initialised from ``runtime.seed`` (the same on every rank; DDP broadcasts rank 0's
    anyway); after that each rank draws from ``seed + rank``. Between phases a stop request ends the
    set-up (:class:`~fastmeal.lifecycle.Stopped`).
    """
    from fastmeal.data import build_loader, check_loaders
    from fastmeal.distributed import check_global_batches, init_distributed, per_rank_batch, world_size_from_env
    from fastmeal.models.factory import build_student, check_weights_available
    from fastmeal.objectives import build_objective, needs_teachers

    # Before joining the process group, so that every rank fails at once instead of waiting for the others.
    check_global_batches(cfg.data, dist.world_size if dist else world_size_from_env())
    dist = dist or init_distributed(cfg.runtime.device, timeout_s=cfg.runtime.dist_timeout_s)
    lifecycle.raise_if_stopped()
    seed_everything(cfg.runtime.seed)
    # Built, not started: no loader thread or worker runs before the teachers' graphs are captured below.
    train_loader = build_loader(cfg, "train", rank=dist.rank, world_size=dist.world_size, device=dist.device,
                                drop_single_last=True)
    val_loader = build_loader(cfg, "val", rank=dist.rank, world_size=dist.world_size, device=dist.device)
    check_loaders(cfg, train_loader, val_loader)  # before any model is built or loaded
    lifecycle.raise_if_stopped()
    check_weights_available(cfg, teachers=needs_teachers(cfg))  # every missing file named at once, before any load
    student = build_student(cfg)
    objective = build_objective(cfg, device=dist.device, batch_size=per_rank_batch(cfg.data.batch_size,
                                                                                   dist.world_size))
    lifecycle.raise_if_stopped()
    seed_everything(cfg.runtime.seed + dist.rank)
    return Trainer(cfg, student=student, objective=objective, train_loader=objective.train_loader(train_loader),
                   val_loader=val_loader, dist=dist, hooks=hooks)


def train(cfg: Config, *, hooks: Sequence[TrainerHook] = (), allow_changed: frozenset[str] = frozenset()
          ) -> dict[str, Any]:
    """``fastmeal train``: build everything from ``cfg``, resume as ``runtime.resume`` says, fit.

    ``allow_changed``: config keys a resume may change although they change what the run computes.

    Returns:
        The trainer's summary plus ``run_dir`` and ``resumed_from``. A stop request during set-up gives the
        summary of a run that did not start (``global_step`` of the checkpoint it would have resumed from).
    """
    from fastmeal.distributed import lost_peer_error, shutdown
    from fastmeal.rundir import next_free_run_dir

    if cfg.runtime.if_exists == "new" and not cfg.runtime.resume:
        free = next_free_run_dir(Path(cfg.resolved_run_dir))
        if str(free) != cfg.resolved_run_dir:
            log.info("runtime.if_exists=new: %s holds a run; training into %s", cfg.resolved_run_dir, free)
            cfg = cfg.replace({"runtime.run_dir": str(free)})
    trainer = None
    with lifecycle.handling_stops():
        try:
            trainer = build_trainer(cfg, hooks=[*default_hooks(cfg), *hooks])
            resumed = trainer.resume(cfg.runtime.resume, allowed=allow_changed)
            summary = trainer.fit()
        except lifecycle.Stopped as stop:
            if stop.reason == "SIGINT":
                raise
            log.warning("%s during set-up: stopped before the first step", lifecycle.describe(stop.reason))
            summary = {"epochs": 0, "global_step": 0, "last_eval": None, "best_top1": None,
                       "stopped": lifecycle.describe(stop.reason), "train_images_per_s": None, "seconds": 0.0}
            return {**summary, "run_dir": cfg.resolved_run_dir, "resumed_from": None}
        except Exception as err:
            lost = lost_peer_error(err)
            if lost is None:
                raise
            run_dir = trainer.run_dir if trainer is not None else Path(cfg.resolved_run_dir)
            raise lost.resuming(_resume_point(run_dir)) from err
        finally:
            if trainer is not None:
                trainer.checkpoints.close()
            lifecycle.close_loaders()  # the loaders' worker processes end now, on every path
            shutdown()
    return {**summary, "run_dir": str(trainer.run_dir), "resumed_from": str(resumed) if resumed else None}


def _resume_point(run_dir: Path) -> str:
    """Where ``--resume auto`` continues: the newest checkpoint's step (what a lost peer's message tells)."""
    from fastmeal.checkpoint import CheckpointManager

    newest = CheckpointManager(Path(run_dir) / "checkpoints").checkpoints()
    if not newest:
        return "a restart with --resume auto starts from step 0 (no checkpoint was written yet)"
    return f"a restart with --resume auto continues from step {int(newest[0].stem.removeprefix('ckpt-'))}"
