"""Checkpoint files: atomic writes with digests, damage detection, pruning, best, RNG, student weights.

The end-to-end cases (a writer killed mid-write, then ``resume auto``; resume equivalence) are in
test_trainer.py, where a trainer produces the checkpoints.
"""

from __future__ import annotations

import json
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
    import os

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
    import os

    events = _record_syncs(monkeypatch)
    path = tmp_path / "ckpt-000000001.pt"
    atomic_torch_save(fake_state(1), path)
    tmp = str(tmp_path / f".{path.name}.tmp-{os.getpid()}")
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))]


def test_temporaries_of_gone_writers_are_removed_and_a_live_writers_kept(tmp_path):
    import os
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
