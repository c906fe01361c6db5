"""Graceful preemption: SIGTERM / SIGUSR1 → finish the step, checkpoint on every rank's agreement, exit 0, resume.

In-process tests pin the exact step and check that the resumed run equals one that was never
interrupted (mid-epoch: the done steps of the epoch are skipped, in the same order). The
``python -m fastmeal train`` test signals a real training process from outside, as SLURM does, and the
2-rank test signals one rank only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gloo_world import World, run_world
from tiny import cli_train_args, cli_worker, jpeg_dataset, make_trainer, one_intraop_thread, teacher_files, tiny_config

from fastmeal.checkpoint import PREEMPTED_MARKER, load_checkpoint
from fastmeal.hooks import TrainerHook
from fastmeal.metrics import read_jsonl
from fastmeal.trainer import Trainer

pytestmark = pytest.mark.usefixtures(one_intraop_thread.__name__)


class SignalSelf(TrainerHook):
    """Sends ``signum`` to this process while global step ``at`` runs (before it fetches its batch)."""

    def __init__(self, at: int, signum: int) -> None:
        self.at, self.signum = at, signum

    def before_step(self, trainer: Trainer) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), self.signum)


def assert_same_state(a: Trainer, b: Trainer) -> None:
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), f"{name} differs"
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        assert torch.equal(sa[key]["momentum_buffer"], sb[key]["momentum_buffer"])
    assert (a.epoch, a.step_in_epoch, a.global_step) == (b.epoch, b.step_in_epoch, b.global_step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_stops_after_the_current_step_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, signum):
    cfg = tiny_config(tmp_path / "run")  # 24 images, global batch 8: 3 steps per epoch, 2 epochs
    stopped = make_trainer(cfg, batchnorm=True, hooks=[SignalSelf(at=1, signum=signum)])
    summary = stopped.fit()
    name = signal.Signals(signum).name
    # The signal came during global step 1 (0-based): that step finished, no other started.
    assert summary["stopped"] == f"preempted by {name}" and summary["global_step"] == 2
    checkpoint = tmp_path / "run" / "checkpoints" / "ckpt-000000002.pt"
    state = load_checkpoint(checkpoint)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)  # mid-epoch
    marker = json.loads((tmp_path / "run" / PREEMPTED_MARKER).read_text())
    assert marker == {"signal": name, "epoch": 0, "step_in_epoch": 2, "global_step": 2, "checkpoint": str(checkpoint)}
    assert signal.getsignal(signum) is signal.SIG_DFL  # handlers removed when training ends

    resumed = make_trainer(cfg, batchnorm=True, seed=99)  # other init: all from the file
    assert resumed.resume("auto") == checkpoint
    assert resumed.fit()["stopped"] is None
    assert not (tmp_path / "run" / PREEMPTED_MARKER).exists()  # a run that starts clears it

    straight = make_trainer(tiny_config(tmp_path / "straight"), batchnorm=True)
    straight.fit()
    assert_same_state(straight, resumed)


class SignalOnEval:
    """A val loader that sends SIGUSR1 to this process as the evaluation starts."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        os.kill(os.getpid(), signal.SIGUSR1)
        yield from self.loader


def test_signal_during_evaluation_stops_at_the_epoch_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    trainer = make_trainer(cfg, val_loader_wrapper=SignalOnEval)
    summary = trainer.fit()
    assert summary["stopped"] == "preempted by SIGUSR1"
    assert (summary["epochs"], summary["global_step"]) == (1, 3)  # epoch 0 done, evaluated, no step of epoch 1
    assert summary["last_eval"]["count"] == 13  # the evaluation the signal arrived in was completed
    marker = json.loads((tmp_path / "run" / PREEMPTED_MARKER).read_text())
    assert (marker["epoch"], marker["step_in_epoch"], marker["global_step"]) == (1, 0, 3)


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value is not None:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the training process exited ({proc.returncode}) before {what}: "
                                 f"{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _last_train_step(metrics: Path) -> int | None:
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    steps = [r["global_step"] for r in rows if r["kind"] == "train"]
    return steps[-1] if steps else None


@pytest.fixture(scope="module")
def disk_run(tmp_path_factory):
    """48 train JPEGs (global batch 4: 12 steps per epoch), 9 val, two teacher weights files."""
    root = tmp_path_factory.mktemp("preempt")
    return jpeg_dataset(root / "data", train_per_class=16, val_per_class=3), teacher_files(root / "weights")


def test_sigterm_to_fastmeal_train_checkpoints_exits_0_and_resume_auto_continues(tmp_path, disk_run):
    data, teachers = disk_run
    run_dir = tmp_path / "run"
    # With a DataLoader worker process, signalled as torchrun forwards a signal: to the rank's whole
    # process group (os.killpg), so the worker gets it too and must survive it.
    args = cli_train_args(data, teachers, run_dir, "schedule.epochs=2", "data.workers=1")
    proc = subprocess.Popen([sys.executable, "-m", "fastmeal", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        seen = _wait_for(lambda: _last_train_step(run_dir / "metrics.jsonl"), 180, "the first logged step", proc)
        os.killpg(proc.pid, signal.SIGTERM)
        signalled = time.monotonic()
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    exit_seconds = time.monotonic() - signalled
    assert proc.returncode == 0, output
    marker = json.loads((run_dir / PREEMPTED_MARKER).read_text())
    stop = marker["global_step"]
    # Step `seen` was logged after its stop check, so the signal arrived during step seen+1 (or, if
    # this poll lagged by a whole step, seen+2): that step finished and no further step began.
    assert seen + 1 <= stop <= seen + 2, (seen, stop)
    assert marker["signal"] == "SIGTERM" and 0 < marker["step_in_epoch"] < 12  # mid-epoch
    state = load_checkpoint(marker["checkpoint"])
    assert state["global_step"] == stop and state["step_in_epoch"] == marker["step_in_epoch"]
    assert max(r["global_step"] for r in read_jsonl(run_dir / "metrics.jsonl", "train")) == stop
    assert exit_seconds < 60, f"{exit_seconds:.1f} s from SIGTERM to exit"

    rc, stdout = run_world(cli_worker, 1, [*args, "--resume", "auto"], timeout=240)[0]
    assert rc == 0
    summary = json.loads(stdout)
    assert summary["resumed_from"] == marker["checkpoint"] and summary["global_step"] == 24
    records = read_jsonl(run_dir / "metrics.jsonl", "train")
    after = [r for r in records if r["global_step"] > stop]
    # The resumed run starts with the step after the checkpoint, in the same epoch, and does each once.
    assert (after[0]["epoch"], after[0]["step"]) == (marker["epoch"], marker["step_in_epoch"] + 1)
    assert [r["global_step"] for r in after] == list(range(stop + 1, 25))
    assert not (run_dir / PREEMPTED_MARKER).exists()


def _rank1_in_its_own_process_group(rank: int, world_size: int, args: list[str], run_dir: Path):
    if rank == 1:
        os.setpgrp()  # so that the test can signal rank 1 and its DataLoader worker, and nothing else
    rc, stdout = cli_worker(rank, world_size, args)
    return rc, stdout, (run_dir / PREEMPTED_MARKER).exists()  # rank 0's marker is on disk before any rank leaves


def test_signal_to_one_rank_stops_both_at_the_same_step_and_both_resume(tmp_path, disk_run):
    data, teachers = disk_run
    run_dir = tmp_path / "run"
    args = cli_train_args(data, teachers, run_dir, "schedule.epochs=1", "data.workers=1")
    world = World(_rank1_in_its_own_process_group, 2, args, run_dir)
    try:
        _wait_for(lambda: _last_train_step(run_dir / "metrics.jsonl"), 180, "the first logged step")
        # Rank 1 and its DataLoader worker, as `--signal=USR1@120` signals every process of a SLURM
        # step: the worker ignores it (lifecycle.worker_init) and serves on.
        os.killpg(world.procs[1].pid, signal.SIGUSR1)
    finally:
        results = world.results(timeout=240)
    assert [(rc, marker_seen) for rc, _, marker_seen in results] == [(0, True), (0, True)]
    summaries = [json.loads(out) for _, out, _ in results]
    stop = summaries[0]["global_step"]
    assert summaries[1]["global_step"] == stop < 12
    assert summaries[0]["stopped"] == "preempted by peer" and summaries[1]["stopped"] == "preempted by SIGUSR1"
    marker = json.loads((run_dir / PREEMPTED_MARKER).read_text())
    assert marker["global_step"] == stop and marker["signal"] == "peer"  # rank 0 wrote it

    results = World(cli_worker, 2, [*args, "--resume", "auto"]).results(timeout=240)
    assert [rc for rc, _ in results] == [0, 0]
    for _, out in results:
        summary = json.loads(out)
        assert summary["resumed_from"] == marker["checkpoint"] and summary["global_step"] == 12
        assert summary["last_eval"]["count"] == 9
