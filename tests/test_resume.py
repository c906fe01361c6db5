"""Exact resume on the real loaders: a run stopped and resumed ends bit-equal to the uninterrupted run.

The augmentation is the crop plan (a function of seed, epoch and image) and CutMix is keyed by (seed,
epoch, step), so nothing a checkpoint does not hold decides a batch. Each case runs the same training
three ways on JPEGs through ``build_trainer`` (both backends, ``data.workers`` 0 and 2, CutMix on):

* straight through, 2 epochs of 6 steps;
* interrupted twice: a graceful stop (what SIGTERM does, ``test_preemption.py`` sends the signal) on the
  last step of epoch 0 — the epoch-end checkpoint, so the next run starts epoch 1 from a fresh loader —
  then killed (an exception, no checkpoint at the kill) at step 5 of epoch 1, after the periodic
  checkpoint of step 3; resumed with ``resume=auto`` from that mid-epoch checkpoint to the end.

The final model (the student, and in the MEAL V2 modes the discriminator) and optimiser state equal the
straight run's bit for bit, and the last resume reads exactly the files of steps 3..5 of epoch 1 (and
DALI's prefetch of epoch 2, which the straight run reads too): no skipped batch is decoded. Three modes:
hard labels (``ce``), online MEAL V2 (two teachers and the discriminator; CutMix on, so the teachers see
the mixed batch) and MEAL V2 from a soft-label bank (CutMix off: a bank cannot hold it).
"""

from __future__ import annotations

import pytest
import torch
from test_preemption import assert_same_state
from tiny import DISK_CLASSES, jpeg_dataset, one_intraop_thread, teacher_files

from fastmeal.bank.build import build_bank
from fastmeal.config import build_config
from fastmeal.data import dali as dali_module
from fastmeal.data import torchvision as tv_module
from fastmeal.distributed import DistInfo
from fastmeal.hooks import TrainerHook
from fastmeal.lifecycle import close_loaders
from fastmeal.run import build_trainer
from fastmeal.trainer import Trainer

pytestmark = pytest.mark.usefixtures(one_intraop_thread.__name__)

STEPS = 6  # 24 train images, batch 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return jpeg_dataset(tmp_path_factory.mktemp("resume") / "data", train_per_class=8, val_per_class=1)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return teacher_files(tmp_path_factory.mktemp("resume") / "teachers")


@pytest.fixture(scope="module")
def bank(data, teachers, tmp_path_factory):
    """The soft-label bank of the MEAL V2 runs' teachers, both epochs (built once for every backend)."""
    out = tmp_path_factory.mktemp("resume") / "bank"
    cfg = _config(data, out.parent / "run", "torchvision", 0, **_MODES["meal_v2"](teachers), **{"data.cutmix": "false"})
    build_bank(cfg, out, dist=DistInfo(), progress=False, top_k=2, chunk_records=8)
    return out


_MODES = {
    "ce": lambda teachers: {"loss.mode": "ce"},
    "meal_v2": lambda teachers: {"loss.mode": "meal_v2", "teacher_engine.fold_bn": "false", "loss.impl": "torch",
                                 "model.teachers": ",".join(f"test_resnet@{p}" for p in teachers)},
}


def _mode_settings(mode, teachers, bank_path):
    if mode == "bank":
        return {**_MODES["meal_v2"](teachers), "data.cutmix": "false", "bank.path": str(bank_path), "bank.top_k": "2"}
    return _MODES[mode](teachers)


def _config(data, run_dir, backend, workers, **extra):
    settings = {"data.root": str(data), "data.image_size": "32", "data.batch_size": "4", "data.workers": str(workers),
                "data.backend": backend, "data.cutmix": "true", "model.student": "test_resnet",
                "model.pretrained": "false", "model.num_classes": str(DISK_CLASSES),
                "precision.mode": "fp32", "precision.channels_last": "false", "runtime.device": "cpu",
                "runtime.run_dir": str(run_dir), "runtime.keep_last": "10", "schedule.epochs": "2",
                # Seed 1: the discriminator trains in every mode (with the demo's seed its last ReLU is dead from
                # the start in bank mode, and a discriminator left out of the resume would go unseen).
                "runtime.seed": "1",
                "schedule.lr_steps": "", "logging.interval": "3", "logging.progress_bar": "false"}
    settings.update(extra)
    return build_config("demo", overrides=settings)


class KeepStart(TrainerHook):
    """The discriminator's weights when training starts."""

    def on_train_start(self, trainer: Trainer) -> None:
        d = trainer.model.objective.discriminator
        self.discriminator = {k: v.clone() for k, v in d.state_dict().items()} if d is not None else None


class StopAt(TrainerHook):
    """After global step ``at`` (1-based count of steps done): ask for a graceful stop, or die."""

    def __init__(self, at: int, *, kill: bool = False) -> None:
        self.at, self.kill = at, kill

    def after_step(self, trainer: Trainer, parts) -> None:
        if trainer.global_step == self.at:
            if self.kill:
                raise KeyboardInterrupt("killed")  # as SIGKILL: no checkpoint of this step
            trainer.request_stop("test stop")


def _run(cfg, *hooks, resume: str = "") -> Trainer:
    """What ``fastmeal train`` does: build, resume, fit, and end the loaders' workers on every exit path."""
    try:
        trainer = build_trainer(cfg, hooks=list(hooks))
        trainer.resume(resume)
        trainer.fit()
    finally:
        close_loaders()
    return trainer


@pytest.fixture
def reads(monkeypatch, tmp_path):
    """Every train file each backend reads, logged to a file (DataLoader workers append to it too)."""
    log = tmp_path / "reads.log"
    load_rgb = tv_module.load_rgb

    def logged_load(path):
        with open(log, "a") as f:
            f.write(path + "\n")
        return load_rgb(path)

    monkeypatch.setattr(tv_module, "load_rgb", logged_load)
    source = dali_module.DaliLoader._source

    def logged_source(self):
        out = source(self)
        if self.train:
            with open(log, "a") as f:
                f.writelines(self.paths[self.substitutes.get(i, i)] + "\n" for i in self._inflight[-1].samples)
        return out

    monkeypatch.setattr(dali_module.DaliLoader, "_source", logged_source)

    def take() -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return lines

    return take


@pytest.mark.parametrize("mode", ["ce", "meal_v2", "bank"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=pytest.mark.dali)])
def test_stop_kill_and_resume_end_bit_equal_to_the_straight_run(data, teachers, request, tmp_path, backend, workers,
                                                                 mode, reads):
    settings = _mode_settings(mode, teachers, request.getfixturevalue("bank") if mode == "bank" else None)
    start = KeepStart()
    straight = _run(_config(data, tmp_path / "straight", backend, workers, **settings), start)
    if mode != "ce":
        assert (mode == "bank") == (not hasattr(straight.objective, "teachers"))
        trained = straight.model.objective.discriminator.state_dict()
        assert all(not torch.equal(trained[k], v) for k, v in start.discriminator.items())  # D trains: its state counts
    reads()
    run_dir = tmp_path / "interrupted"
    cfg = _config(data, run_dir, backend, workers, **settings, **{"runtime.checkpoint_every_steps": "3"})
    first = _run(cfg, StopAt(STEPS))  # a stop on the epoch's last step: the epoch-end checkpoint
    assert (first.epoch, first.step_in_epoch) == (1, 0)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, StopAt(STEPS + 5, kill=True), resume="auto")  # killed at step 5 of epoch 1
    reads()
    last = _run(cfg, resume="auto")  # from the periodic checkpoint: epoch 1, step 3
    assert_same_state(straight, last)
    assert (last.epoch, last.step_in_epoch, last.global_step) == (2, 0, 2 * STEPS)
    loader = last.train_loader
    train_reads = [p for p in reads() if f"{data}/train/" in p]  # the val split is read (evaluated) too
    order = loader.epoch_indices(1)
    expected = [loader.index.paths[i] for i in order[3 * 4:]]  # steps 3, 4, 5 of epoch 1
    if backend == "torchvision":
        assert sorted(train_reads) == sorted(expected)  # workers read in any order; each file once
    else:  # DALI feeds in order, and prefetches the next epoch's first batches as the straight run does
        assert train_reads[:len(expected)] == expected
        prefetched = [loader.index.paths[i] for i in loader.epoch_indices(2)]
        assert train_reads[len(expected):] == prefetched[:len(train_reads) - len(expected)]
        assert len(train_reads) - len(expected) <= 4 * last.cfg.data.prefetch
