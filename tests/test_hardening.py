"""Bad input and faults, as a new and as a hostile user brings them (issue 14).

Items 1-8 run the real ``python -m fastmeal`` in a subprocess (or kill one) and check the exit code,
the message, the processes left behind (none: each command runs in its own session, whose members
are looked up in /proc afterwards) and what is on disk. The rest run ``fastmeal.cli.main`` in process.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny import (
    DISK_CLASSES,
    cli_train_args,
    jpeg_dataset,
    kill_before_fs_call,
    make_trainer,
    one_intraop_thread,
    tiny_config,
)

from fastmeal.checkpoint import CheckpointManager, load_checkpoint, remove_temporaries
from fastmeal.cli import main
from fastmeal.config import PRESETS, ConfigError, build_config
from fastmeal.console import format_duration
from fastmeal.metrics import finite_json, read_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a command started with start_new_session: its pid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            found.append(int(entry.name))
    return found


def wait_gone(sid: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := session_members(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def start(args: list[str], *, script: str | None = None) -> subprocess.Popen:
    """``python -m fastmeal ARGS`` (or ``python -c SCRIPT ARGS``: a wrapper ending in cli.main), in its own session."""
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "fastmeal", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=ENV)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"fastmeal did not exit within {timeout} s: {err[-3000:]}") from None
    left = wait_gone(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"processes left behind: {left}"
    return proc.returncode, out, err


def run(args: list[str], *, script: str | None = None, timeout: float = 180) -> tuple[int, str, str]:
    return finish(start(args, script=script), timeout)


def wait_for_train_record(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and '"kind": "train"' in metrics.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("no training step was logged")


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """A tiny hard-label run (no teachers): 12 train JPEGs, batch 4, 3 steps per epoch, one epoch by default."""
    return cli_train_args(data, [Path("unused.pth")], run_dir, "loss.mode=ce", "schedule.epochs=1", *extra)


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("fastmeal: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return jpeg_dataset(tmp_path_factory.mktemp("hardening") / "data", train_per_class=4, val_per_class=2)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> tuple[Path, str]:
    """One finished run (subprocess, progress bar asked for, stderr a pipe) and its stderr."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    rc, out, err = run(train_args(data, run_dir, "logging.progress_bar=true"))
    assert rc == 0, err[-3000:]
    assert json.loads(out)["global_step"] == 3
    return run_dir, err


# --------------------------------------------------------------------------------------------
# 1. No hang, no process left behind, on any exception, with loader workers
# --------------------------------------------------------------------------------------------


def test_a_corrupt_image_with_loader_workers_exits_2_at_once_naming_the_file(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    bad = sorted((root / "train").rglob("*.JPEG"))[5]
    bad.write_bytes(bad.read_bytes()[:100])
    started = time.monotonic()
    rc, _, err = run(train_args(root, tmp_path / "run", "data.workers=2"), timeout=120)
    assert rc == 2
    line = one_error_line(err)
    assert str(bad) in line and "data.skip_corrupt=true" in line
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run" / "checkpoints").exists()  # it failed in epoch 0: nothing half-written
    # (A file cut inside its header is found by the dataset index, before the run dir is even made.)
    assert not (tmp_path / "run").exists() or not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]
    val_bad = sorted((root / "val").rglob("*.JPEG"))[0]
    val_bad.write_bytes(b"")
    import timm

    torch.save(timm.create_model("test_resnet", num_classes=DISK_CLASSES).state_dict(), tmp_path / "w.pth")
    rc, _, err = run(["eval", "--model", "test_resnet", "--weights", str(tmp_path / "w.pth"), "--data", str(root),
                      "--res", "32", "--workers", "2",
                      "--backend", "torchvision", "--device", "cpu", "--no-progress"], timeout=120)
    assert rc == 2 and str(val_bad) in one_error_line(err)


def test_an_unexpected_error_exits_1_with_its_traceback_and_ends_the_workers(data, tmp_path, capsys, monkeypatch):
    import multiprocessing

    from fastmeal.trainer import Trainer

    def fail(self, **kwargs):
        raise RuntimeError("simulated failure inside a checkpoint write")

    monkeypatch.setattr(Trainer, "save_checkpoint", fail)
    assert main(train_args(data, tmp_path / "run", "data.workers=2")) == 1
    err = capsys.readouterr().err
    assert "simulated failure inside a checkpoint write" in err and "Traceback" in err  # a bug: keep its traceback
    assert "fastmeal: error: unexpected RuntimeError" in err
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_sigterm_with_loader_workers_exits_0_and_leaves_no_process(data, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(train_args(data, run_dir, "data.workers=2", "schedule.epochs=100000"))
    wait_for_train_record(run_dir, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as torchrun forwards it: the rank and its workers
    rc, out, _ = finish(proc, timeout=120)
    assert rc == 0 and json.loads(out)["stopped"] == "preempted by SIGTERM"
    assert load_checkpoint(json.loads((run_dir / "preempted.json").read_text())["checkpoint"])


# --------------------------------------------------------------------------------------------
# 2. A run dir that holds another run
# --------------------------------------------------------------------------------------------


def test_a_second_run_into_a_finished_run_dir_is_refused_and_changes_nothing(finished, data, tmp_path, capsys):
    source, _ = finished
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    before = snapshot(run_dir)
    rc, _, err = run(train_args(data, run_dir))
    assert rc == 2
    line = one_error_line(err)
    assert "already holds another run" in line and "ckpt-000000003.pt" in line
    assert "--resume auto" in line and "runtime.if_exists=new" in line and "runtime.if_exists=overwrite" in line
    assert snapshot(run_dir) == before

    # Asked for explicitly: a new dir next to it, or the old run's files deleted first.
    assert main([*train_args(data, run_dir, "runtime.if_exists=new"), "--set", "logging.progress_bar=false"]) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == f"{run_dir}-2"
    assert snapshot(run_dir) == before
    assert main(train_args(data, run_dir, "runtime.if_exists=overwrite", "schedule.epochs=2")) == 0
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl", "epoch")] == [0, 1]  # one run, not two
    assert [r["global_step"] for r in read_jsonl(run_dir / "metrics.jsonl", "train")] == list(range(1, 7))


# --------------------------------------------------------------------------------------------
# 3. One process per run dir; temporaries; a run dir deleted while training
# --------------------------------------------------------------------------------------------


def test_a_second_process_on_a_busy_run_dir_is_refused_naming_the_holder(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # Far more epochs than it can finish while the second process starts on a loaded machine.
    first = start(train_args(data, run_dir, "schedule.epochs=100000", "runtime.checkpoint_every_steps=1"))
    try:
        wait_for_train_record(run_dir, first)
        rc, _, err = run([*train_args(data, run_dir), "--resume", "auto"])
        assert rc == 2
        line = one_error_line(err)
        assert f"is in use by pid {first.pid}" in line and "runtime.run_dir" in line
        # The checkpoints deleted while it trains (moved away in one step: rm -rf races with its writes) after
        # its first save: it stops with that message, exit 1, nothing left running.
        deadline = time.monotonic() + 60
        while not (run_dir / "checkpoints" / "manifest.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.rename(run_dir / "checkpoints", tmp_path / "deleted")
        rc, _, err = finish(first, timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert rc == 1, err[-2000:]
    assert "vanished" in one_error_line(err)
    assert not (run_dir / "checkpoints").exists()
    # The next --resume auto says that it starts over (and keeps the old metrics), not silently.
    capsys.readouterr()
    assert main([*train_args(data, run_dir), "--resume", "auto"]) == 0
    assert "although metrics.jsonl records an earlier run" in capsys.readouterr().err
    assert list(run_dir.glob("metrics-before-*.jsonl"))


def test_the_lock_of_a_sigkilled_run_is_released_and_its_temporaries_removed(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = start(train_args(data, run_dir, "schedule.epochs=100000", "data.workers=2"))
    wait_for_train_record(run_dir, proc)
    deadline = time.monotonic() + 120  # killed after the first epoch's checkpoint, so the resume below has one to read
    while not any(run_dir.rglob("ckpt-*.pt")):
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint was written"
        time.sleep(0.05)
    assert [p for p in session_members(proc.pid) if p != proc.pid], "expected DataLoader worker processes"
    os.kill(proc.pid, signal.SIGKILL)  # the rank alone: its workers, which ignore SIGTERM, must not be orphaned
    proc.communicate(timeout=30)
    assert wait_gone(proc.pid) == []
    dead = run_dir / f".student_last.pth.tmp-{proc.pid}"  # what a kill inside a write leaves
    dead.write_bytes(b"partial")
    alive = run_dir / f".student_last.pth.tmp-{os.getppid()}"  # a live writer's (pytest's parent)
    alive.write_bytes(b"in progress")
    removed = remove_temporaries(run_dir)  # the kill may also have cut a real write of the run's: those go too
    assert dead in removed and {p.name.rsplit("-", 1)[1] for p in removed} == {str(proc.pid)} and alive.exists()
    alive.unlink()
    dead.write_bytes(b"partial")
    # the kernel released the lock (the epoch count is cut back to end the run: a change the resume must be told of)
    assert main([*train_args(data, run_dir), "--resume", "auto", "--allow-changed", "schedule.epochs"]) == 0
    assert not dead.exists() and not list(run_dir.rglob(f"*.tmp-{proc.pid}"))


def test_the_lock_ends_with_the_run_not_with_a_forked_child_that_outlives_it(tmp_path):
    """A flock belongs to the open file, which forked children share: a child left alive kept it held."""
    from fastmeal.rundir import RunDirError, RunDirLock

    script = textwrap.dedent("""
        import multiprocessing, os, sys, time
        from fastmeal.rundir import RunDirLock
        lock = RunDirLock(sys.argv[1]).acquire()
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        child.start()
        print(child.pid, flush=True)
        if sys.argv[2] == "release":
            lock.release()
            time.sleep(60)  # alive, the lock released, the child still running
        os._exit(0)  # dies holding the lock (as a SIGKILL would), the child left behind
    """)
    for how in ("die", "release"):
        run_dir = tmp_path / how
        proc = subprocess.Popen([sys.executable, "-c", script, str(run_dir), how], stdout=subprocess.PIPE, text=True,
                                env=ENV, start_new_session=True)
        try:
            child = int(proc.stdout.readline())
            if how == "die":
                proc.wait(30)
            assert os.kill(child, 0) is None  # still alive
            deadline = time.monotonic() + 10
            while True:
                try:
                    RunDirLock(run_dir).acquire().release()
                    break
                except RunDirError:
                    assert time.monotonic() < deadline, f"{how}: the lock is still held with the child alive"
                    time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


# --------------------------------------------------------------------------------------------
# 4. NaN / inf
# --------------------------------------------------------------------------------------------


def test_non_finite_config_numbers_are_refused(capsys):
    for key, value in (("optim.lr", "nan"), ("optim.lr", "inf"), ("schedule.lr_steps", "101:nan"),
                       ("schedule.lr_steps", "inf:0.1"), ("optim.momentum", "nan")):
        with pytest.raises(ConfigError, match="finite"):
            build_config("demo", overrides={key: value})
    assert main(["config", "show", "--set", "optim.lr=nan"]) == 2
    assert "optim.lr='nan' must be a finite number" in one_error_line(capsys.readouterr().err)


def test_a_diverging_run_stops_without_writing_from_non_finite_weights(data, tmp_path):
    run_dir = tmp_path / "run"
    # Epoch 0 at a sane LR (its checkpoint is the last good one), then an LR that overflows the weights.
    rc, out, err = run(train_args(data, run_dir, "schedule.epochs=3", "schedule.lr_steps=1:1e30"))
    assert rc == 1 and out == ""
    line = one_error_line(err)
    assert "became non-finite" in line and "ckpt-000000003.pt" in line and "--resume auto" in line
    manager = CheckpointManager(run_dir / "checkpoints")
    assert [p.name for p in manager.checkpoints()] == ["ckpt-000000003.pt"]
    for path in (*manager.checkpoints(), manager.best_path):
        assert all_finite(load_checkpoint(path)["student"])
    for name in ("student_last.pth", "student_best.pth"):
        assert all_finite(torch.load(run_dir / name, weights_only=True))
    assert manager.find_latest_valid()[0].name == "ckpt-000000003.pt"  # what --resume auto continues from

    def no_nan(token):
        raise AssertionError(f"invalid JSON constant {token}")

    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=no_nan)


def test_summaries_and_metrics_are_valid_json():
    assert finite_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}}) == {"a": None, "b": [1.0, None],
                                                                                        "c": {"d": 2}}


# --------------------------------------------------------------------------------------------
# 5. Train and val class names
# --------------------------------------------------------------------------------------------


def test_train_and_val_class_names_are_compared_at_start_up(data, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    renamed = sorted((root / "val").iterdir())[1]
    renamed.rename(renamed.with_name("zz_renamed"))  # same count, other name
    rc, _, err = run(train_args(root, tmp_path / "run"))
    assert rc == 2
    line = one_error_line(err)
    assert f"only in train/: {renamed.name}" in line and "only in val/: zz_renamed" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written
    shutil.rmtree(root / "val" / "zz_renamed")  # a val split missing a class: one message, not two contradictory
    assert main(train_args(root, tmp_path / "run2")) == 2
    err = capsys.readouterr().err
    assert f"only in train/: {renamed.name}" in err and "set --set model.num_classes" not in err


# --------------------------------------------------------------------------------------------
# 6. A save killed before each of its file-system calls
# --------------------------------------------------------------------------------------------

def _epoch_one_in_a_child(run_dir: Path, kill_at: int, count_file: Path) -> int:
    """Fork: resume ``run_dir`` and train epoch 1, killed before FS call ``kill_at`` of its epoch-end save."""
    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:
        logging.disable(logging.CRITICAL)  # the child's log lines would interleave with pytest's capture
        trainer = make_trainer(tiny_config(run_dir / "run"))
        trainer.resume("auto")
        trainer.best_top1 = -1.0  # epoch 1 is a new best: best.pt, best.json and student_best are written too
        counter = [0]
        save = trainer.save_checkpoint

        def armed_save(**kwargs):
            if kwargs.get("top1") is not None:
                kill_before_fs_call(kill_at, counter)
            return save(**kwargs)

        trainer.save_checkpoint = armed_save
        trainer.fit()
        count_file.write_text(str(counter[0]))
    finally:
        os._exit(0)


def _assert_whole_and_consistent(run_dir: Path) -> None:
    directory = run_dir / "checkpoints"
    manager = CheckpointManager(directory)
    # A reader sees only whole files, whatever the kill interrupted.
    for path in manager.checkpoints():
        load_checkpoint(path)
    best = load_checkpoint(manager.best_path)
    assert json.loads((directory / "manifest.json").read_text())["format"] == "fastmeal-manifest"

    # The next start heals what the kill left: everything derives from the newest checkpoint again.
    trainer = make_trainer(tiny_config(run_dir))
    resumed = trainer.resume("auto")
    trainer.checkpoints.close()
    latest = load_checkpoint(resumed)
    manifest = json.loads((directory / "manifest.json").read_text())
    best_info = json.loads((directory / "best.json").read_text())
    best = load_checkpoint(manager.best_path)
    assert manifest["latest"] == resumed.name == manager.checkpoints()[0].name
    assert best_info["global_step"] == best["global_step"] == manifest["best"]["global_step"]
    assert best["is_best"] and best_info["top1"] == best["top1"] == best["best_top1"]
    from safetensors import safe_open

    for stem, state in (("student_last", latest), ("student_best", best)):
        exported = torch.load(run_dir / f"{stem}.pth", weights_only=True)
        assert all(torch.equal(exported[k], v) for k, v in state["student"].items()), stem
        with safe_open(str(run_dir / f"{stem}.safetensors"), "pt") as f:
            assert int(f.metadata()["global_step"]) == state["global_step"], stem
    assert not [p for p in (*run_dir.iterdir(), *directory.iterdir()) if ".tmp-" in p.name]
    assert not list(directory.glob("*.sha256"))
    epochs = [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl", "epoch")]
    assert epochs == list(range(latest["epoch"])), epochs  # exactly the epochs the checkpoint has done
    assert max(r["global_step"] for r in read_jsonl(run_dir / "metrics.jsonl")) == latest["global_step"]


@pytest.mark.usefixtures(one_intraop_thread.__name__)
def test_a_save_killed_before_each_file_system_call_leaves_whole_files_healed_at_the_next_start(tmp_path):
    base = tmp_path / "base"
    make_trainer(tiny_config(base / "run", **{"schedule.epochs": 1})).fit()  # epoch 0: ckpt-3, best.pt, exports
    count_file = tmp_path / "count"
    shutil.copytree(base, tmp_path / "counted")
    assert _epoch_one_in_a_child(tmp_path / "counted", -1, count_file) == 0
    total = int(count_file.read_text())
    assert total >= 20  # checkpoint, best link, best.json, 4 exports, manifest, epoch record: ~5 calls each
    for k in range(total):
        work = tmp_path / f"k{k}"
        shutil.copytree(base, work)
        status = _epoch_one_in_a_child(work, k, count_file)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)
        _assert_whole_and_consistent(work / "run")
        shutil.rmtree(work)


# --------------------------------------------------------------------------------------------
# 7. Digests; every checkpoint damaged
# --------------------------------------------------------------------------------------------


def test_every_checkpoint_damaged_says_whether_best_pt_is_intact_and_how_to_resume(finished, data, tmp_path, capsys):
    source, _ = finished
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    for path in CheckpointManager(run_dir / "checkpoints").checkpoints():
        data_bytes = bytearray(path.read_bytes())
        data_bytes[len(data_bytes) // 2] ^= 0xFF
        path.unlink()  # a bad copy is a new file: best.pt (a hard link to the old one) stays intact
        path.write_bytes(bytes(data_bytes))
    rc, _, err = run([*train_args(data, run_dir), "--resume", "auto"])
    assert rc == 2
    line = one_error_line(err)
    best = run_dir / "checkpoints" / "best.pt"
    assert "every checkpoint" in line and "best.pt is intact (global step 3" in line and f"--resume {best}" in line
    assert len(CheckpointManager(run_dir / "checkpoints").checkpoints()) == 1  # the damaged file is kept
    assert main([*train_args(data, run_dir, "schedule.epochs=2"), "--resume", str(best)]) == 0
    assert json.loads(capsys.readouterr().out)["global_step"] == 6


# --------------------------------------------------------------------------------------------
# 8. SIGTERM at any moment of the run, set-up and final exports included
# --------------------------------------------------------------------------------------------

_SIGTERM_WHEN = textwrap.dedent("""
    import os, signal, sys
    from fastmeal import checkpoint
    from fastmeal.cli import main
    from fastmeal.models import factory

    when = sys.argv.pop(1)
    if when == "setup":
        build = factory.build_student

        def build_student(cfg):
            os.killpg(0, signal.SIGTERM)
            return build(cfg)

        factory.build_student = build_student
    else:  # during the last export of the last save
        export = checkpoint.save_student_weights

        def save_student_weights(state_dict, stem, **kwargs):
            paths = export(state_dict, stem, **kwargs)
            if stem.name == "student_last" and kwargs.get("global_step") == 6:
                os.killpg(0, signal.SIGTERM)
            return paths

        checkpoint.save_student_weights = save_student_weights
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_during_the_final_exports_exits_0_with_everything_written(data, tmp_path):
    run_dir = tmp_path / "run"
    rc, out, err = run(["last-save", *train_args(data, run_dir, "schedule.epochs=2", "data.workers=1")],
                       script=_SIGTERM_WHEN)
    assert rc == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["epochs"] == 2 and summary["stopped"] == "preempted by SIGTERM"
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker["global_step"] == 6 and load_checkpoint(marker["checkpoint"])["epoch"] == 2
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    assert manifest["latest"] == "ckpt-000000006.pt" and manifest["exports"]["student_last"] == 6


def test_sigterm_during_set_up_stops_before_the_first_step(data, tmp_path):
    run_dir = tmp_path / "run"
    rc, out, err = run(["setup", *train_args(data, run_dir, "data.workers=1")], script=_SIGTERM_WHEN)
    assert rc == 0, err[-3000:]
    assert json.loads(out)["global_step"] == 0 and "before the first step" in err
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "preempted.json").exists()


# --------------------------------------------------------------------------------------------
# 9-13. Clear errors instead of tracebacks
# --------------------------------------------------------------------------------------------


def test_dali_names_and_skips_a_text_file_named_jpeg(data, tmp_path):
    pytest.importorskip("nvidia.dali")
    from fastmeal.data import CorruptImageError, build_loader

    root = tmp_path / "data"
    shutil.copytree(data, root)
    text = sorted((root / "train").rglob("*.JPEG"))[4]
    text.write_text("this is not an image\n" * 20)
    overrides = {"data.root": str(root), "data.backend": "dali", "data.image_size": 32, "data.batch_size": 4,
                 "data.workers": 1, "runtime.device": "cpu", "model.num_classes": DISK_CLASSES}
    loader = build_loader(build_config("demo", overrides={**overrides, "data.skip_corrupt": "true"}), "train")
    assert sum(len(labels) for _, labels in loader) == 12 and loader.num_skipped == 1
    with pytest.raises(CorruptImageError, match=f"{text}.*data.skip_corrupt=true"):
        list(build_loader(build_config("demo", overrides=overrides), "train"))  # the index finds it at once


def test_bad_weight_files_are_named_and_explained(data, tmp_path, capsys):
    from safetensors.torch import save_file

    from fastmeal.models.factory import WeightsError, read_weights_file

    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "tiny.bin").write_bytes(b"abc")
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    save_file({"w": torch.ones(2)}, str(tmp_path / "renamed.pth"))  # a safetensors file under another extension
    for name, message in (("empty.pth", r"is empty \(0 bytes\)"), ("tiny.bin", "is neither a PyTorch file"),
                          ("random.pth", "is neither a PyTorch file")):
        with pytest.raises(WeightsError, match=message):
            read_weights_file(tmp_path / name)
    assert torch.equal(read_weights_file(tmp_path / "renamed.pth")["w"], torch.ones(2))
    assert main(["eval", "--model", "test_resnet", "--weights", str(tmp_path / "empty.pth"), "--data", str(data),
                 "--res", "32", "--workers", "0", "--device", "cpu", "--no-progress"]) == 2
    assert "empty.pth is empty" in capsys.readouterr().err


def test_config_file_syntax_errors_name_the_file_and_the_line(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[optim]\nlr = 0.02\nmomentum = = 0.9\n")
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: [0.02\n")
    (tmp_path / "bad.json").write_text('{"optim": {"lr": }}')
    for name, what in (("bad.toml", "TOML"), ("bad.yaml", "YAML"), ("bad.json", "JSON")):
        assert main(["config", "show", "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"{name} is not valid {what}" in err and "line" in err and "Traceback" not in err


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_show_prints_toml_that_config_reads_back(preset, tmp_path, capsys):
    overrides = ["--set", "optim.lr=0.02", "--set", "schedule.lr_steps=3:0.001,9:1e-05",
                 "--set", 'data.root=/data/with "quotes" and \\ backslash']
    assert main(["config", "show", "--preset", preset, *overrides]) == 0
    (tmp_path / "shown.toml").write_text(capsys.readouterr().out)
    expected = build_config(preset, overrides={"optim.lr": "0.02", "schedule.lr_steps": "3:0.001,9:1e-05",
                                               "data.root": '/data/with "quotes" and \\ backslash'})
    assert build_config("r50_224", config_file=tmp_path / "shown.toml") == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_and_triton_without_a_gpu_are_refused_with_the_fix(data, tmp_path, capsys, monkeypatch):
    assert main(train_args(data, tmp_path / "a", "runtime.device=cuda")) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from fastmeal.errors import SetupError

    with pytest.raises(SetupError, match="loss.impl=triton.*loss.impl=auto"):
        make_trainer(tiny_config(tmp_path / "b", **{"loss.impl": "triton"}))


def test_ctrl_c_prints_one_line_and_exits_130(data, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(train_args(data, run_dir, "schedule.epochs=100000", "data.workers=1"))
    wait_for_train_record(run_dir, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground process group
    rc, _, err = finish(proc, timeout=60)
    assert rc == 130 and "interrupted (Ctrl-C)" in one_error_line(err)


_CTRL_C_IN_TORCH_IMPORT = textwrap.dedent("""
    import os, signal, sys
    from fastmeal.cli import main

    how, where = sys.argv.pop(1), sys.argv.pop(1)
    assert "torch" not in sys.modules  # the CLI imports it inside the command


    class CtrlC:  # Ctrl-C while torch (or DALI) imports its submodules (start-up takes seconds)
        def find_spec(self, name, path=None, target=None):
            if name == where:
                sys.meta_path.remove(self)
                if how == "raised":  # as if Python had turned a SIGINT into KeyboardInterrupt right here
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGINT)  # the real thing: Python raises at its next bytecode
            return None


    sys.meta_path.insert(0, CtrlC())
    code = main()
    if how == "signal":  # the import was let finish: torch works after the Ctrl-C
        import torch

        print(torch.ones(2).sum().item())
    raise SystemExit(code)
""")


@pytest.mark.parametrize(("how", "where"), [
    ("signal", "torch.multiprocessing"), ("raised", "torch.multiprocessing"),
    pytest.param("signal", "nvidia.dali.fn", marks=pytest.mark.dali)])
def test_ctrl_c_during_start_up_inside_torchs_import_is_the_same_one_line(data, tmp_path, how, where):
    """A SIGINT during torch's or DALI's import is only recorded: the import finishes (a half-imported torch breaks
    every later import of it, the exit path's included) and the run stops at its next step boundary; a
    KeyboardInterrupt raised inside one is still one line."""
    backend = "dali" if where.startswith("nvidia") else "torchvision"
    rc, out, err = run([how, where, *train_args(data, tmp_path / "run", f"data.backend={backend}")],
                       script=_CTRL_C_IN_TORCH_IMPORT)
    assert rc == 130 and "interrupted (Ctrl-C)" in one_error_line(err)
    assert out.strip().endswith("2.0") == (how == "signal")  # torch works after the Ctrl-C
    if backend == "torchvision":
        assert not (tmp_path / "run").exists()  # torch imports at start-up: stopped before the run began
    else:  # DALI's modules import when its pipeline is built, at the first step: stopped after it, with a checkpoint
        assert json.loads(out[:out.rindex("}") + 1])["global_step"] == 1
        assert (tmp_path / "run" / "checkpoints" / "ckpt-000000001.pt").is_file()


def test_a_full_disk_is_one_line_naming_the_file_and_the_free_space(data, tmp_path, capsys, monkeypatch):
    import fastmeal.checkpoint

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fastmeal.checkpoint.os, "fsync", full)
    assert main(train_args(data, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert line.startswith("fastmeal: error: no space left on the device while writing ")
    assert str(tmp_path / "run") in line and "MiB free" in line


def test_a_closed_pipe_ends_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fastmeal", "config", "show"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()  # `| head` that has read what it wanted, before anything is written
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and b"Traceback" not in err and b"BrokenPipe" not in err


# --------------------------------------------------------------------------------------------
# 14-18. What a user expects
# --------------------------------------------------------------------------------------------


def test_logs_to_a_pipe_are_plain_lines_with_a_run_eta_and_percent_accuracy(finished):
    run_dir, err = finished
    assert "\r" not in err  # no tqdm frames when stderr is not a terminal, though logging.progress_bar=true
    assert "run ETA" in err and "epoch 0 done" in err
    assert err.count("data.backend=") <= 1  # said once, not once per split
    epoch = read_jsonl(run_dir / "metrics.jsonl", "epoch")[0]
    train = read_jsonl(run_dir / "metrics.jsonl", "train")
    # One unit: percent, like val_top1 (a fraction would never exceed 1; 12 images of 3 classes are > 1/12 right).
    assert all(0.0 <= r["train_top1"] <= 100.0 for r in train) and epoch["train_top1"] > 1.0
    assert format_duration(3725) == "1:02:05" and format_duration(90061) == "1d 1:01:01"


def test_workers_default_to_what_the_machine_has(caplog, monkeypatch):
    import fastmeal.data.common
    from fastmeal.data.common import available_cpus, clamp_workers

    monkeypatch.setattr(fastmeal.data.common, "_clamp_logged", set())  # earlier tests of this process may have said it
    cpus = available_cpus()
    with caplog.at_level("INFO", logger="fastmeal"):
        assert clamp_workers(cpus + 6) == cpus and clamp_workers(cpus + 6) == cpus
        assert clamp_workers(1) == 1
    assert caplog.text.count("loader workers") == 1  # said once

