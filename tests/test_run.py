"""`fastmeal train` as a user breaks it: a val image that does not decode, a batch of one, the disk it needs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny import cli_train_args, jpeg_dataset

from fastmeal.checkpoint import load_checkpoint
from fastmeal.cli import main


def _args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """A hard-label run of the BatchNorm student test_resnet (no teachers)."""
    return cli_train_args(data, [Path("unused.pth")], run_dir, "loss.mode=ce", *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return jpeg_dataset(tmp_path_factory.mktemp("run") / "data", train_per_class=4, val_per_class=2)


def _copy(data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns(".fastmeal-index"))
    return copy


def test_a_val_image_that_does_not_decode_costs_no_training(data, tmp_path, capsys):
    """Its header reads (so the start-up check passes it), its data is cut: the evaluation fails after epoch 0, whose
    checkpoint is already written; with the file repaired, --resume auto continues with epoch 1."""
    root = _copy(data, tmp_path)
    victim = sorted((root / "val").rglob("*.JPEG"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good[:len(good) // 3])
    run_dir = tmp_path / "run"
    assert main(_args(root, run_dir, "schedule.epochs=2")) == 2
    assert str(victim) in capsys.readouterr().err
    state = load_checkpoint(run_dir / "checkpoints" / "ckpt-000000003.pt")
    assert (state["epoch"], state["step_in_epoch"], state["top1"]) == (1, 0, None)

    victim.write_bytes(good)
    assert main([*_args(root, run_dir, "schedule.epochs=2"), "--resume", "auto"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed_from"].endswith("ckpt-000000003.pt") and summary["global_step"] == 6
    assert summary["last_eval"]["count"] == 6


def test_a_val_image_without_a_header_fails_at_start_up(data, tmp_path, capsys):
    root = _copy(data, tmp_path)
    victim = sorted((root / "val").rglob("*.JPEG"))[-1]
    victim.write_bytes(b"not an image")
    assert main(_args(root, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and "data.skip_corrupt=true" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_a_last_batch_of_one_image_is_left_out_and_a_batch_of_one_is_refused(data, tmp_path, capsys, caplog):
    # 12 train images, batch 11: the second batch of every epoch would be one image, which BatchNorm refuses.
    assert main(_args(data, tmp_path / "a", "data.batch_size=11", "schedule.epochs=2")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["global_step"] == 2  # one batch of 11 per epoch
    assert "1 image per rank" in caplog.text and "left out" in caplog.text
    # The same run resumed mid-way sees the same batches: the rule is a function of the split and the batch.
    assert main(_args(data, tmp_path / "b", "data.batch_size=11", "schedule.epochs=1")) == 0
    capsys.readouterr()
    assert main([*_args(data, tmp_path / "b", "data.batch_size=11", "schedule.epochs=2"), "--resume", "auto"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "ckpt-000000002.pt")["student"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "ckpt-000000002.pt")["student"]
    assert resumed["global_step"] == 2 and all((a[k] == b[k]).all() for k in a)

    assert main(_args(data, tmp_path / "c", "data.batch_size=1")) == 2
    assert "cannot train on a batch of one" in capsys.readouterr().err


def test_the_disk_a_run_needs_is_said_at_start_up(data, tmp_path, caplog):
    assert main(_args(data, tmp_path / "run")) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("run dir "))
    assert "GiB free" in line and "checkpoints of" in line


def test_a_resume_refuses_a_changed_computation_unless_allowed_and_keeps_the_original_config(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(_args(data, run_dir, "schedule.epochs=1", "runtime.seed=1")) == 0
    original = (run_dir / "config.json").read_text()
    capsys.readouterr()
    changed = _args(data, run_dir, "schedule.epochs=2", "runtime.seed=2", "logging.interval=2")
    assert main([*changed, "--resume", "auto"]) == 2  # the seed changes what the run computes
    err = capsys.readouterr().err
    assert "runtime.seed: 1 -> 2" in err and "--allow-changed" in err and "schedule.epochs" not in err
    assert main([*changed, "--resume", "auto", "--allow-changed", "runtime.seed"]) == 0
    assert json.loads(capsys.readouterr().out)["global_step"] == 6
    assert (run_dir / "config.json").read_text() == original  # the run's history: its first config
    from fastmeal.metrics import read_jsonl

    recorded = {r["key"]: (r["old"], r["new"], r["global_step"]) for r in read_jsonl(run_dir / "metrics.jsonl",
                                                                                   "config_change")}
    assert recorded == {"runtime.seed": (1, 2, 3), "schedule.epochs": (1, 2, 3), "logging.interval": (1, 2, 3)}


def test_a_batch_size_change_waits_for_an_epoch_boundary(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    settings = ("runtime.checkpoint_every_steps=1", "runtime.max_steps_per_epoch=2", "schedule.epochs=1")
    assert main(_args(data, run_dir, *settings)) == 0
    capsys.readouterr()
    mid_epoch = run_dir / "checkpoints" / "ckpt-000000001.pt"  # epoch 0, step 1
    args = [*_args(data, run_dir, *settings, "data.batch_size=2"), "--resume", str(mid_epoch),
            "--allow-changed", "data.batch_size"]
    assert main(args) == 2
    assert "can only take effect at an epoch's start" in capsys.readouterr().err
