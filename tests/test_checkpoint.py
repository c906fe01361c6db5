"""Checkpoint files: atomic writes with digests, damage detection, pruning, best, RNG, student weights; what a save
derives (best.pt, best.json, the exports, the manifest) and what heal repairs after a save cut short; a full disk.

The end-to-end cases (a writer killed mid-write, then ``resume auto``; resume equivalence) are in
test_trainer.py, where a trainer produces the checkpoints.
"""

from __future__ import annotations

import errno
import json
import os
import random
import struct
import zipfile

import numpy as np
import pytest
import timm
import torch
from tiny import make_trainer, tiny_config

from fastmeal.checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    CheckpointManager,
    atomic_torch_save,
    capture_rng_state,
    file_sha256,
    load_checkpoint,
    remove_temporaries,
    restore_rng_state,
    save_student_weights,
    state_digest,
)


def fake_state(step: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "student": {"w": torch.full((64, 64), float(step))},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": step // 10, "step_in_epoch": step % 10,
            "global_step": step, "config": "{}"}


def test_atomic_save_keeps_the_digest_inside_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt-000000001.pt"
    digest = atomic_torch_save(fake_state(1), path)
    assert digest == file_sha256(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000001.pt"]  # one file: no sidecar to lose
    state = load_checkpoint(path)
    assert state["digest"] == state_digest(fake_state(1)) and state_digest(state) == state["digest"]
    assert torch.equal(state["student"]["w"], torch.full((64, 64), 1.0))


def test_a_checkpoint_without_any_digest_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.pt"
    torch.save(fake_state(1), path)  # as a hand-made or pre-digest file
    with caplog.at_level("WARNING", logger="fastmeal.checkpoint"):
        assert load_checkpoint(path)["global_step"] == 1
    assert "carries no digest" in caplog.text and "cannot be verified" in caplog.text


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "ckpt-000000001.pt"
    atomic_torch_save(fake_state(1), path)
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save(fake_state(2), path, save=broken_save)
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_flipped_byte_is_detected_although_torch_load_would_accept_it(tmp_path):
    path = tmp_path / "ckpt-000000001.pt"
    atomic_torch_save(fake_state(1), path)
    data = bytearray(path.read_bytes())
    # Flip a byte inside the tensor payload (the 64x64 block of 1.0s), where the zip stays valid.
    index = bytes(data).find(np.float32(1.0).tobytes() * 8) + 2
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["student"]["w"], torch.full((64, 64), 1.0))
    with pytest.raises(CheckpointError, match="damaged or truncated.*digest stored in it"):
        load_checkpoint(path)


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    """A real trainer checkpoint: MEAL V2 with its discriminator, momentum, amp-fp16's grad scaler, RNG states."""
    run = tmp_path_factory.mktemp("trainer_ckpt") / "run"
    make_trainer(tiny_config(run, **{"precision.mode": "amp-fp16", "schedule.epochs": 1})).fit()
    return CheckpointManager(run / "checkpoints").checkpoints()[0]


def _storages(data: bytes) -> list[tuple[str, int, int]]:
    """``(name, offset, size)`` of every tensor storage in a ``torch.save`` zip (stored uncompressed)."""
    import io

    out = []
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size:
                name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
                out.append((info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size))
    return out


def test_a_flipped_byte_in_any_tensor_of_a_trainer_checkpoint_is_detected(trainer_checkpoint, tmp_path):
    data = trainer_checkpoint.read_bytes()
    state = torch.load(trainer_checkpoint, weights_only=True)
    tensors = [t for t in _leaves(state) if isinstance(t[1], torch.Tensor) and t[1].numel()]
    storages = _storages(data)
    # RNG states (in lists), optimiser momentum, student, discriminator: each tensor has a storage of its own.
    assert len(storages) == len(tensors) and any(p[0] == "rng" for p, _ in tensors)
    for _, offset, size in storages:
        damaged = bytearray(data)
        damaged[offset + size // 2] ^= 0xFF
        path = tmp_path / "ckpt-000000001.pt"
        path.write_bytes(bytes(damaged))
        torch.load(path, weights_only=True)  # torch reads it without complaint ...
        with pytest.raises(CheckpointError, match="digest stored in it"):  # ... the digest does not
            load_checkpoint(path)


def _leaves(obj, path=()):
    """``(path, value)`` of every tensor and plain value; of a long list, its first, middle and last items."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(obj, list | tuple):
        picks = range(len(obj)) if len(obj) <= 6 else (0, len(obj) // 2, len(obj) - 1)
        for i in picks:
            yield from _leaves(obj[i], (*path, i))
    else:
        yield path, obj


def _changed(value):
    """Another value of the same kind: a tensor with one byte flipped, a number moved, a string extended."""
    if isinstance(value, torch.Tensor):
        value = value.clone()
        raw = value.reshape(-1).view(torch.uint8)
        raw[raw.numel() // 2] ^= 0xFF
        return value
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1 if value == value else 0.0
    if isinstance(value, str):
        return value + "x"
    return 0  # None


def _set(obj, path, value):
    for key in path[:-1]:
        obj = obj[key]
    if isinstance(obj, tuple):
        raise TypeError(f"tuple at {path}")  # weights_only loads never give tuples here
    obj[path[-1]] = value


def test_any_changed_field_of_a_trainer_checkpoint_is_detected(trainer_checkpoint, tmp_path):
    """Every field that decides the run (position, config, RNG states in nested lists, optimiser and scaler
    settings, the evaluation) and every tensor: changed and saved without a new digest, the file is refused."""
    state = torch.load(trainer_checkpoint, weights_only=True)
    leaves = [(p, v) for p, v in _leaves(state) if not (isinstance(v, torch.Tensor) and v.numel() == 0)]
    fields = {p[0] for p, _ in leaves}
    assert {"epoch", "step_in_epoch", "global_step", "config", "rng", "scaler", "optimizer", "discriminator",
            "student", "last_eval"} <= fields
    assert any(p[:2] == ("rng", 0) and p[2] == "python" for p, _ in leaves)  # Python's RNG: ints in nested lists
    path = tmp_path / "ckpt-000000001.pt"
    for where, value in leaves:
        _set(state, where, _changed(value))
        torch.save(state, path)
        _set(state, where, value)
        # A changed format or version is refused for that reason before the digest is checked.
        match = "digest stored in it" if where[0] not in ("format", "version") else None
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path)
    torch.save(state, path)
    assert load_checkpoint(path)["global_step"] == state["global_step"]  # restored: accepted again


def test_truncated_foreign_and_future_files_are_rejected(tmp_path):
    good = tmp_path / "good.pt"
    atomic_torch_save(fake_state(1), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])  # no sidecar: torch.load itself must fail
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(cut)
    weights = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(2)}, weights)
    with pytest.raises(CheckpointError, match="not a fastmeal checkpoint.*model.student_weights"):
        load_checkpoint(weights)
    future = tmp_path / "future.pt"
    atomic_torch_save({**fake_state(1), "version": VERSION + 1}, future)
    with pytest.raises(CheckpointError, match="upgrade fastmeal"):
        load_checkpoint(future)
    partial = tmp_path / "partial.pt"
    atomic_torch_save({k: v for k, v in fake_state(1).items() if k != "optimizer"}, partial)
    with pytest.raises(CheckpointError, match="lacks optimizer"):
        load_checkpoint(partial)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_manager_keeps_the_last_k_and_the_best(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpts", keep_last=2)
    for step, top1 in ((10, 50.0), (20, 70.0), (30, 60.0), (40, None)):
        manager.save(fake_state(step), global_step=step, top1=top1)
    assert [p.name for p in manager.checkpoints()] == ["ckpt-000000040.pt", "ckpt-000000030.pt"]
    assert manager.best_top1() == 70.0
    assert load_checkpoint(manager.best_path)["global_step"] == 20  # kept although ckpt-20 was pruned
    assert json.loads((tmp_path / "ckpts" / "best.json").read_text())["from"] == "ckpt-000000020.pt"
    files = sorted(p.name for p in (tmp_path / "ckpts").iterdir())
    assert files == ["best.json", "best.pt", "ckpt-000000030.pt", "ckpt-000000040.pt", "manifest.json"]
    manifest = json.loads((tmp_path / "ckpts" / "manifest.json").read_text())
    assert manifest["latest"] == "ckpt-000000040.pt" and manifest["best"]["global_step"] == 20


def test_find_latest_valid_walks_back_past_damage_and_ignores_temporaries(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        manager.save(fake_state(step), global_step=step)
    (tmp_path / ".ckpt-000000004.pt.tmp-123").write_bytes(b"half")
    newest = tmp_path / "ckpt-000000003.pt"
    newest.write_bytes(newest.read_bytes()[:-100])
    path, state, skipped = manager.find_latest_valid()
    assert path == tmp_path / "ckpt-000000002.pt" and state["global_step"] == 2
    assert [p.name for p, _ in skipped] == ["ckpt-000000003.pt"] and "truncated" in skipped[0][1]
    assert [p.name for p in manager.remove_stale_temporaries()] == [".ckpt-000000004.pt.tmp-123"]


def test_disabled_manager_writes_nothing(tmp_path):
    manager = CheckpointManager(tmp_path / "c", enabled=False)
    assert manager.save(fake_state(1), global_step=1, top1=1.0) is None
    assert not (tmp_path / "c").exists()


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    path = tmp_path / "rng.pt"
    atomic_torch_save({**fake_state(1), "rng": [state]}, path)
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(load_checkpoint(path)["rng"][0])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_student_weights_load_with_timm_checkpoint_path(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4).to(memory_format=torch.channels_last)
    st, pth = save_student_weights(model.state_dict(), tmp_path / "student_last")
    assert (st.name, pth.name) == ("student_last.safetensors", "student_last.pth")
    for path in (st, pth):
        loaded = timm.create_model("test_resnet", num_classes=4, checkpoint_path=str(path))
        for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), (path.name, k)
    assert isinstance(torch.load(pth, weights_only=True), dict)


def _record_syncs(monkeypatch) -> list[tuple[str, ...]]:
    """Log every ``os.fsync`` (by the path of the synced descriptor) and ``os.replace``, in order."""
    events = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    return events


def test_an_atomic_write_syncs_the_file_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    """What survives a power cut rather than a kill (no test can cut the power): the order of the syncs."""
    events = _record_syncs(monkeypatch)
    path = tmp_path / "ckpt-000000001.pt"
    atomic_torch_save(fake_state(1), path)
    tmp = str(tmp_path / f".{path.name}.tmp-{os.getpid()}")
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))]


def test_temporaries_of_gone_writers_are_removed_and_a_live_writers_kept(tmp_path):
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {f".ckpt-000000001.pt.tmp-{pid}": pid for pid in (live.pid, dead.pid, os.getpid())}
        for name in names:
            (tmp_path / name).write_bytes(b"half")
        (tmp_path / "notes.tmp-1").write_bytes(b"not a temporary: no leading dot")
        (tmp_path / ".x.tmp-abc").write_bytes(b"not a temporary: no PID")
        removed = {p.name for p in remove_temporaries(tmp_path)}
        # This process's own leftovers are a killed earlier run's (the run dir's lock is held): removed too.
        assert removed == {f".ckpt-000000001.pt.tmp-{dead.pid}", f".ckpt-000000001.pt.tmp-{os.getpid()}"}
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [".x.tmp-abc", "notes.tmp-1", f".ckpt-000000001.pt.tmp-{live.pid}"])
    finally:
        live.kill()
        live.wait()


class _NotPlainData:
    """An object a weights-only load must refuse (arbitrary pickled code)."""


def test_only_plain_data_is_loaded(tmp_path):
    path = tmp_path / "ckpt-000000001.pt"
    torch.save({**fake_state(1), "extra": _NotPlainData()}, path)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def test_a_renamed_field_of_a_checkpoint_is_detected(tmp_path):
    path = tmp_path / "ckpt-000000001.pt"
    atomic_torch_save({**fake_state(1), "best_top1": 50.0, "last_eval": {"top1": 50.0}}, path)
    state = torch.load(path, weights_only=True)
    state["last_eval"] = {"top5": state["last_eval"]["top1"]}  # same value under another name
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="digest stored in it"):
        load_checkpoint(path)


def test_plain_objects_are_saved_as_given_and_parents_are_made(tmp_path):
    weights = {"w": torch.ones(2)}
    path = tmp_path / "a" / "b" / "weights.pt"
    atomic_torch_save(weights, path)  # not a checkpoint: no digest added
    assert torch.load(path, weights_only=True).keys() == {"w"}
    from fastmeal.checkpoint import atomic_write_bytes

    atomic_write_bytes(tmp_path / "c" / "d" / "x.json", b"{}")
    assert (tmp_path / "c" / "d" / "x.json").read_bytes() == b"{}"


def test_a_checkpoint_of_an_older_version_is_checked_against_its_sha256_file(tmp_path):
    import hashlib

    path = tmp_path / "ckpt-000000001.pt"
    torch.save(fake_state(1), path)  # older versions: no digest inside, a .sha256 file beside
    sidecar = tmp_path / "ckpt-000000001.pt.sha256"
    sidecar.write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    assert load_checkpoint(path)["global_step"] == 1
    for text in (f"{'0' * 64}  {path.name}\n", "\n"):
        sidecar.write_text(text)
        with pytest.raises(CheckpointError, match="does not match ckpt-000000001.pt.sha256"):
            load_checkpoint(path)


# --------------------------------------------------------------------------------------------
# What a save derives from its checkpoint (best.pt, best.json, the exports, the manifest), pruning, healing
# --------------------------------------------------------------------------------------------


def _exported(run_dir, stem) -> tuple[float, int]:
    """``(value of the weights, global step in the metadata)`` of an export; its two files hold the same weights."""
    from safetensors import safe_open

    pth = torch.load(run_dir / f"{stem}.pth", weights_only=True)
    with safe_open(str(run_dir / f"{stem}.safetensors"), "pt") as f:
        st = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        step = int(f.metadata()["global_step"])
    assert pth.keys() == st.keys() == {"w"} and torch.equal(pth["w"], st["w"])
    assert torch.equal(pth["w"], torch.full((64, 64), pth["w"][0, 0].item()))  # fake_state(step)'s weights
    return pth["w"][0, 0].item(), step


def _manifest(step: int, top1, best: dict | None, exports: dict) -> dict:
    """The manifest a save of ``fake_state(step)`` should leave, written out by hand."""
    return {"format": "fastmeal-manifest", "latest": f"ckpt-{step:09d}.pt", "global_step": step, "epoch": step // 10,
            "step_in_epoch": step % 10, "top1": top1, "best": best, "exports": exports}


def _best(step: int, top1: float) -> dict:
    return {"top1": top1, "global_step": step, "from": f"ckpt-{step:09d}.pt"}


def _read_manifest(directory):
    return json.loads((directory / "manifest.json").read_text())


def _best_then_worse(tmp_path, keep_last: int):
    """A run dir whose manager (exports on) saved step 10 (top-1 50, the best), then step 20 (top-1 40)."""
    run = tmp_path / "run"
    run.mkdir()
    ck = run / "checkpoints"
    manager = CheckpointManager(ck, keep_last=keep_last, export_dir=run)
    manager.save(fake_state(10), global_step=10, top1=50.0)
    manager.save(fake_state(20), global_step=20, top1=40.0)
    return run, ck, manager


def test_each_save_derives_best_pt_best_json_the_exports_and_the_manifest(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ck = run / "checkpoints"
    manager = CheckpointManager(ck, keep_last=2, export_dir=run)

    manager.save(fake_state(5), global_step=5)  # no evaluation yet: no best
    assert _read_manifest(ck) == _manifest(5, None, None, {"student_last": 5})
    assert manager.best_info() is None and not (ck / "best.pt").exists() and not (run / "student_best.pth").exists()
    assert _exported(run, "student_last") == (5.0, 5)

    manager.save(fake_state(10), global_step=10, top1=50.0)  # the first evaluation: a new best
    assert manager.best_info() == _best(10, 50.0)
    assert os.path.samefile(ck / "best.pt", ck / "ckpt-000000010.pt")  # a hard link, not a copy
    assert _read_manifest(ck) == _manifest(10, 50.0, _best(10, 50.0), {"student_last": 10, "student_best": 10})
    assert _exported(run, "student_last") == _exported(run, "student_best") == (10.0, 10)
    best_export = (run / "student_best.pth").stat().st_ino

    manager.save(fake_state(20), global_step=20, top1=40.0)  # worse: best.pt, best.json, student_best stay
    assert manager.best_info() == _best(10, 50.0) and load_checkpoint(ck / "best.pt")["global_step"] == 10
    assert _read_manifest(ck) == _manifest(20, 40.0, _best(10, 50.0), {"student_last": 20, "student_best": 10})
    assert _exported(run, "student_last") == (20.0, 20) and _exported(run, "student_best") == (10.0, 10)
    assert (run / "student_best.pth").stat().st_ino == best_export  # current: not written again

    manager.save(fake_state(25), global_step=25)  # mid-epoch
    assert _read_manifest(ck) == _manifest(25, None, _best(10, 50.0), {"student_last": 25, "student_best": 10})

    manager.save(fake_state(30), global_step=30, top1=60.0)  # a new best again
    assert manager.best_info() == _best(30, 60.0)
    assert os.path.samefile(ck / "best.pt", ck / "ckpt-000000030.pt")
    assert _read_manifest(ck) == _manifest(30, 60.0, _best(30, 60.0), {"student_last": 30, "student_best": 30})
    assert _exported(run, "student_last") == _exported(run, "student_best") == (30.0, 30)
    assert sorted(p.name for p in ck.iterdir()) == ["best.json", "best.pt", "ckpt-000000025.pt", "ckpt-000000030.pt",
                                                    "manifest.json"]


def test_the_states_own_is_best_decides_and_needs_a_top1(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=5)
    manager.save({**fake_state(1), "is_best": True}, global_step=1)  # no top1: nothing to rank it by
    manager.save({**fake_state(2), "is_best": False, "top1": 99.0}, global_step=2)
    assert manager.best_info() is None and not manager.best_path.exists()
    assert _read_manifest(tmp_path)["best"] is None and _read_manifest(tmp_path)["top1"] == 99.0
    manager.save({**fake_state(3), "is_best": True, "top1": 1.0}, global_step=3)  # the state says so, even if lower
    assert manager.best_info() == _best(3, 1.0) and load_checkpoint(manager.best_path)["global_step"] == 3


def test_without_hard_links_best_pt_is_a_copy_made_once(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    manager = CheckpointManager(tmp_path, keep_last=5)
    manager.save(fake_state(10), global_step=10, top1=50.0)
    best, ckpt = tmp_path / "best.pt", tmp_path / "ckpt-000000010.pt"
    assert not os.path.samefile(best, ckpt) and best.read_bytes() == ckpt.read_bytes()
    inode = best.stat().st_ino
    manager.publish(ckpt, load_checkpoint(ckpt))  # again (as heal does): best.pt is already this checkpoint
    assert best.stat().st_ino == inode
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_exports_behind_best_pt_are_re_derived_from_it(tmp_path):
    run, ck, manager = _best_then_worse(tmp_path, keep_last=1)  # ckpt-10 pruned: best.pt is the only copy
    state20 = load_checkpoint(ck / "ckpt-000000020.pt")
    for lost in ("student_best.pth", "student_best.safetensors"):
        (run / lost).unlink()
        manager.publish(ck / "ckpt-000000020.pt", state20)
        assert _exported(run, "student_best") == (10.0, 10), lost  # from best.pt, not from the state published
    manifest = _read_manifest(ck)
    manifest["exports"]["student_best"] = 7  # files of another step
    (ck / "manifest.json").write_text(json.dumps(manifest))
    inode = (run / "student_best.pth").stat().st_ino
    manager.publish(ck / "ckpt-000000020.pt", state20)
    assert (run / "student_best.pth").stat().st_ino != inode and _exported(run, "student_best") == (10.0, 10)
    assert _read_manifest(ck) == _manifest(20, 40.0, _best(10, 50.0), {"student_last": 20, "student_best": 10})


def test_an_export_is_current_when_the_manifest_names_its_step_and_both_files_exist(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    manager = CheckpointManager(ck, export_dir=tmp_path)
    assert not manager._export_current("student_best", 10)  # no manifest
    manager.manifest_path.write_text("{}")
    assert not manager._export_current("student_best", 10)  # a manifest without exports
    manager.manifest_path.write_text(json.dumps({"exports": {"student_best": 10}}))
    assert not manager._export_current("student_best", 10)  # no files
    (tmp_path / "student_best.pth").write_bytes(b"")
    assert not manager._export_current("student_best", 10)
    (tmp_path / "student_best.safetensors").write_bytes(b"")
    assert manager._export_current("student_best", 10)
    assert not manager._export_current("student_best", 9) and not manager._export_current("student_last", 10)
    assert not CheckpointManager(ck)._export_current("student_best", 10)  # no export dir
    (tmp_path / "student_best.pth").unlink()
    assert not manager._export_current("student_best", 10)


def test_manifest_is_none_when_missing_or_unreadable(tmp_path):
    manager = CheckpointManager(tmp_path)
    assert manager.manifest() is None
    manager.manifest_path.write_text('{"latest": "ckpt-0')  # cut
    assert manager.manifest() is None
    manager.manifest_path.write_text('{"latest": "ckpt-000000001.pt"}')
    assert manager.manifest() == {"latest": "ckpt-000000001.pt"}


def test_prune_keeps_the_newest_and_removes_the_sha256_files_of_the_others(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4, 5):
        (tmp_path / f"ckpt-{step:09d}.pt").write_bytes(b"")
    for step in (1, 4):  # older versions' checkpoints carry one; today's do not
        (tmp_path / f"ckpt-{step:09d}.pt.sha256").write_text("x")
    (tmp_path / "best.pt").write_bytes(b"")
    (tmp_path / "best.pt.sha256").write_text("x")
    manager._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "ckpt-000000004.pt", "ckpt-000000004.pt.sha256",
                                                          "ckpt-000000005.pt"]


def test_heal_re_derives_whatever_the_manifest_does_not_describe(tmp_path):
    run, ck, manager = _best_then_worse(tmp_path, keep_last=3)
    path = ck / "ckpt-000000020.pt"
    state = load_checkpoint(path)
    good = _manifest(20, 40.0, _best(10, 50.0), {"student_last": 20, "student_best": 10})
    inode = manager.manifest_path.stat().st_ino

    (ck / "ckpt-000000005.pt.sha256").write_text("x")  # a prune killed between its two unlinks
    (ck / "ckpt-000000020.pt.sha256").write_text("x")  # of an existing checkpoint: kept
    assert manager.heal(path, state) is False  # consistent: nothing written
    assert manager.manifest_path.stat().st_ino == inode
    assert sorted(p.name for p in ck.glob("*.sha256")) == ["ckpt-000000020.pt.sha256"]
    (ck / "ckpt-000000020.pt.sha256").unlink()

    def damage_manifest(key, value):
        def damage():
            manifest = _read_manifest(ck)
            manifest[key] = value
            manager.manifest_path.write_text(json.dumps(manifest))
        return damage

    damages = {
        "no manifest": manager.manifest_path.unlink,
        "the previous checkpoint's": damage_manifest("latest", "ckpt-000000010.pt"),
        "the same checkpoint before its evaluation": damage_manifest("top1", None),
        "another best": damage_manifest("best", None),
        "no student_last.safetensors": (run / "student_last.safetensors").unlink,
        "no student_best.pth": (run / "student_best.pth").unlink,
    }
    for what, damage in damages.items():
        damage()
        assert manager.heal(path, state) is True, what
        assert _read_manifest(ck) == good, what
        assert _exported(run, "student_last") == (20.0, 20) and _exported(run, "student_best") == (10.0, 10), what
        assert manager.heal(path, state) is False, what

    # Without an export dir the exports are not looked at.
    (run / "student_last.pth").unlink()
    assert CheckpointManager(ck, keep_last=3).heal(path, state) is False
    # A manager of another rank never heals.
    manager.manifest_path.unlink()
    assert CheckpointManager(ck, keep_last=3, export_dir=run, enabled=False).heal(path, state) is False
    assert not manager.manifest_path.exists()

    # best.pt lost while the newest checkpoint is the best: linked again.
    manager.save(fake_state(30), global_step=30, top1=60.0)
    path, state = ck / "ckpt-000000030.pt", load_checkpoint(ck / "ckpt-000000030.pt")
    manager.best_path.unlink()
    assert manager.heal(path, state) is True
    assert os.path.samefile(manager.best_path, path) and manager.heal(path, state) is False


def test_best_pt_deleted_by_hand_is_linked_again_from_its_checkpoint_or_forgotten_when_that_is_pruned(tmp_path, caplog):
    run, ck, manager = _best_then_worse(tmp_path, keep_last=2)
    path, state = ck / "ckpt-000000020.pt", load_checkpoint(ck / "ckpt-000000020.pt")

    # Its checkpoint is still there: best.pt is that file again, the best unchanged.
    manager.best_path.unlink()
    assert manager.heal(path, state) is True
    assert os.path.samefile(manager.best_path, ck / "ckpt-000000010.pt")
    assert json.loads((ck / "best.json").read_text()) == _best(10, 50.0)
    assert manager.heal(path, state) is False

    # Pruned (a third save), then best.pt and student_best deleted: the resume must not fail on them. The best is
    # forgotten, said once; the manifest and the exports describe the newest checkpoint alone.
    manager.save(fake_state(30), global_step=30, top1=45.0)
    assert not (ck / "ckpt-000000010.pt").exists()
    path, state = ck / "ckpt-000000030.pt", load_checkpoint(ck / "ckpt-000000030.pt")
    manager.best_path.unlink()
    (run / "student_best.pth").unlink()
    with caplog.at_level("WARNING", logger="fastmeal.checkpoint"):
        assert manager.heal(path, state) is True
    assert "the best so far (top-1 50.0 at global step 10) is forgotten" in caplog.text
    assert not (ck / "best.json").exists() and not manager.best_path.exists() and manager.best_top1() is None
    assert _read_manifest(ck) == _manifest(30, 45.0, None, {"student_last": 30})
    assert _exported(run, "student_last") == (30.0, 30)
    assert manager.heal(path, state) is False
    # The next evaluation is a new best.
    manager.save(fake_state(40), global_step=40, top1=41.0)
    assert os.path.samefile(manager.best_path, ck / "ckpt-000000040.pt") and manager.best_top1() == 41.0


class _Interrupted(BaseException):
    """Stands for a kill: raised before the n-th file-system call of a save (nothing catches a BaseException)."""


def _interrupt_before_fs_call(monkeypatch, n: int, calls: list[tuple[str, str]]) -> None:
    """Log every file-system call (``os`` functions that change files, and every ``open``); raise before the n-th."""
    import io
    def wrap(name, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, str(args[-1] if name in ("replace", "rename", "link") else args[0])))
            if len(calls) - 1 == n:
                raise _Interrupted(name)
            return fn(*args, **kwargs)
        return wrapper

    for name in ("open", "replace", "rename", "link", "unlink", "fsync", "mkdir", "rmdir", "ftruncate", "write"):
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    monkeypatch.setattr(io, "open", wrap("open", io.open))


@pytest.mark.parametrize("top1", [60.0, None], ids=["new-best", "no-evaluation"])
def test_a_save_interrupted_before_each_file_system_call_is_healed_from_the_newest_checkpoint(tmp_path, monkeypatch,
                                                                                          top1):
    import shutil

    base = tmp_path / "base"
    base.mkdir()
    first = CheckpointManager(base / "checkpoints", keep_last=2, export_dir=base)
    first.save(fake_state(10), global_step=10, top1=50.0)
    first.save(fake_state(20), global_step=20, top1=40.0)

    def interrupted_save(work, n):
        calls: list[tuple[str, str]] = []
        manager = CheckpointManager(work / "checkpoints", keep_last=2, export_dir=work)
        with monkeypatch.context() as m:
            _interrupt_before_fs_call(m, n, calls)
            try:
                manager.save(fake_state(30), global_step=30, top1=top1)
            except _Interrupted:
                pass
            else:
                assert n < 0, n
        return calls

    shutil.copytree(base, tmp_path / "whole")
    calls = interrupted_save(tmp_path / "whole", -1)
    commit = calls.index(("replace", str(tmp_path / "whole" / "checkpoints" / "ckpt-000000030.pt")))
    manifest_written = calls.index(("replace", str(tmp_path / "whole" / "checkpoints" / "manifest.json")))
    assert 0 < commit < manifest_written < len(calls) - 1  # the pruning comes after the manifest
    for n in range(len(calls)):
        work = tmp_path / f"n{n}"
        shutil.copytree(base, work)
        interrupted_save(work, n)
        ck = work / "checkpoints"
        manager = CheckpointManager(ck, keep_last=2, export_dir=work)
        path, state, skipped = manager.find_latest_valid()
        assert not skipped, (n, skipped)
        latest = 30 if n > commit else 20
        assert path.name == f"ckpt-{latest:09d}.pt", n
        assert manager.heal(path, state) is (commit < n <= manifest_written), (n, calls[n])
        best = _best(30, 60.0) if latest == 30 and top1 is not None else _best(10, 50.0)
        assert manager.best_info() == best, n
        assert load_checkpoint(manager.best_path)["global_step"] == best["global_step"], n
        assert best["global_step"] == 10 or os.path.samefile(manager.best_path, ck / best["from"]), n  # 10: pruned
        exports = {"student_last": latest, "student_best": best["global_step"]}
        assert _read_manifest(ck) == _manifest(latest, {20: 40.0, 30: top1}[latest], best, exports), n
        assert _exported(work, "student_last") == (float(latest), latest), n
        assert _exported(work, "student_best") == (float(best["global_step"]), best["global_step"]), n
        shutil.rmtree(work)


# --------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------


def _wrapped(err: BaseException, depth: int, link: str = "__cause__") -> BaseException:
    for _ in range(depth):
        outer = RuntimeError("wrapped")
        setattr(outer, link, err)
        err = outer
    return err


def test_the_full_disk_cause_is_enospc_or_edquot_among_the_first_eight_errors_of_the_chain():
    from fastmeal.checkpoint import DiskFullError, _disk_full_cause

    for code in (errno.ENOSPC, errno.EDQUOT):
        full = OSError(code, "full")
        assert _disk_full_cause(full) is full
        for link in ("__cause__", "__context__"):  # `raise ... from err`, or an error raised while handling one
            assert _disk_full_cause(_wrapped(full, 1, link)) is full, link
            assert _disk_full_cause(_wrapped(full, 7, link)) is full, link  # the 8th error of the chain
            assert _disk_full_cause(_wrapped(full, 8, link)) is None, link  # the 9th is not looked at
    disk_full = DiskFullError(errno.ENOSPC, "no space")
    assert _disk_full_cause(_wrapped(disk_full, 2)) is disk_full
    for other in (OSError(errno.EIO, "I/O error"), OSError("no errno"), RuntimeError("not an OSError")):
        assert _disk_full_cause(_wrapped(other, 2)) is None
    assert _disk_full_cause(None) is None
    loop = RuntimeError("its own cause")
    loop.__cause__ = loop
    assert _disk_full_cause(loop) is None  # ends


def test_a_full_disk_error_names_the_file_and_the_free_space_and_keeps_the_errno(tmp_path, monkeypatch):
    import shutil

    from fastmeal.checkpoint import DiskFullError, _disk_full

    asked = []

    def usage(path):
        asked.append(path)
        return shutil._ntuple_diskusage(100 * 2**20, 92 * 2**20, int(7.6 * 2**20))

    monkeypatch.setattr(shutil, "disk_usage", usage)
    path = tmp_path / "checkpoints" / "ckpt-000000001.pt"
    err = _disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), path)
    assert isinstance(err, DiskFullError) and isinstance(err, OSError) and err.errno == errno.EDQUOT
    assert str(err) == (f"no space left on the device while writing {path} (8 MiB free on {path.parent}); "
                        "nothing was replaced: free some space and resume")
    assert asked == [path.parent]

    def unknown(path):
        raise OSError(errno.ENOENT, "gone")

    monkeypatch.setattr(shutil, "disk_usage", unknown)
    err = _disk_full(OSError(errno.ENOSPC, "No space left on device"), path)
    assert err.errno == errno.ENOSPC and str(err) == (
        f"no space left on the device while writing {path} (free space unknown on {path.parent}); "
        "nothing was replaced: free some space and resume")


def test_a_full_disk_during_a_write_is_one_error_naming_the_target_and_replaces_nothing(tmp_path, monkeypatch):
    from fastmeal.checkpoint import DiskFullError, atomic_write_bytes

    target = tmp_path / "best.json"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        with pytest.raises(DiskFullError, match=f"while writing {target} ") as info:
            atomic_write_bytes(target, b"new")
    assert info.value.errno == errno.ENOSPC and info.value.__cause__ is None
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]

    def torch_save_on_a_full_disk(obj, f):  # torch.save wraps the OSError in a RuntimeError
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing") from err

    path = tmp_path / "ckpt-000000001.pt"
    with pytest.raises(DiskFullError, match=f"while writing {path} ") as info:
        atomic_torch_save(fake_state(1), path, save=torch_save_on_a_full_disk)
    assert info.value.errno == errno.EDQUOT and not path.exists()

    def broken(obj, f):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError) as info:  # any other error goes through unchanged
        atomic_torch_save(fake_state(1), path, save=broken)
    assert type(info.value) is OSError and info.value.errno == errno.EIO
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]


def test_fsync_dir_passes_over_a_directory_it_cannot_open(tmp_path):
    from fastmeal.checkpoint import _fsync_dir

    assert _fsync_dir(tmp_path / "missing") is None


def test_a_deleted_export_dir_fails_the_next_save_instead_of_coming_back_empty(tmp_path):
    import shutil

    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2, export_dir=tmp_path / "exports")
    (tmp_path / "exports").mkdir()
    manager.save(fake_state(10), global_step=10, top1=50.0)
    shutil.rmtree(tmp_path / "exports")
    with pytest.raises(FileNotFoundError):
        manager.save(fake_state(20), global_step=20, top1=60.0)
    assert not (tmp_path / "exports").exists()


def test_a_temporary_removed_by_someone_else_meanwhile_is_passed_over(tmp_path, monkeypatch):
    from pathlib import Path

    gone = tmp_path / f".ckpt-000000001.pt.tmp-{os.getpid()}"  # listed, then removed before this unlinks it
    left = tmp_path / f".ckpt-000000002.pt.tmp-{os.getpid()}"
    left.write_bytes(b"half")
    iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: iter([gone, *iterdir(self)]))
    assert remove_temporaries(tmp_path) == [left]
    assert not left.exists()
