"""Checkpoints that survive being killed mid-write, and resume from the newest one that is intact.

Layout of ``RUN_DIR/checkpoints/``:

* ``ckpt-<global step, 9 digits>.pt``: the full training state (see :func:`training_state` in the
  trainer: student, discriminator, optimiser, grad scaler, epoch, step within the epoch, RNG states,
  resolved config), next to ``ckpt-....pt.sha256``, the SHA-256 of its bytes. The last
  ``runtime.keep_last`` are kept.
* ``best.pt`` (+ ``.sha256``, ``best.json``): the checkpoint with the best validation top-1.

Every file is written atomically: to a hidden temporary file in the same directory, flushed and
fsync'ed, then renamed over the target (a rename within one file system is atomic), then the
directory is fsync'ed. A process killed at any point leaves either the old file or the new one,
plus at worst a stale ``.*.tmp-*`` file that listing ignores. The digest catches what atomicity
cannot: a file truncated or damaged later (a full disk on a copy, a bad sync) — ``torch.load``
alone reads a flipped byte in a tensor without complaint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

FORMAT = "fastmeal-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "student", "optimizer", "epoch", "step_in_epoch", "global_step", "config")
_CKPT_RE = re.compile(r"^ckpt-(\d{9})\.pt$")
_CHUNK = 1 << 20

log = logging.getLogger("fastmeal.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


class _HashingWriter:
    """A binary file wrapper that hashes what passes through ``write``."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk (POSIX); Windows cannot open dirs.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Yield a file to write; on success it is flushed, fsync'ed and renamed to ``path``; on error removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, flush + fsync, rename)."""
    with _atomic_file(Path(path)) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: str | os.PathLike, *,
                      save: Callable[[Any, Any], None] = torch.save) -> str:
    """``torch.save`` ``obj`` to ``path`` atomically, with a ``.sha256`` sidecar; returns the hex digest.

    The sidecar is written (atomically) before the checkpoint is renamed into place, so a checkpoint
    that exists always has its digest.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            writer = _HashingWriter(f)
            save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        digest = writer.sha256.hexdigest()
        atomic_write_bytes(_sidecar(path), f"{digest}  {path.name}\n".encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Reading and validating
# --------------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a full checkpoint (digest, readability, format, required keys).

    Loaded with ``weights_only=True``: a checkpoint holds only tensors and plain Python data.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    sidecar = _sidecar(path)
    if sidecar.is_file():
        expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
        actual = file_sha256(path)
        if expected != actual:
            raise CheckpointError(f"checkpoint {path} is damaged or truncated: its SHA-256 {actual[:12]}… does "
                                  f"not match {sidecar.name} ({expected[:12]}…), size {path.stat().st_size} bytes")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); truncated?") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastmeal checkpoint (no format={FORMAT!r} entry); to start "
                              "from a plain weights file use model.student_weights=FILE instead")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    if state["version"] > VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state['version']}; this fastmeal reads "
                              f"up to {VERSION}: upgrade fastmeal")
    return state


# --------------------------------------------------------------------------------------------
# RNG states (all tensors or plain data, so that weights_only=True can read them back)
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), NumPy and Python RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`. CUDA states are restored only when the device count matches."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple | list) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------------
# Student weights alone
# --------------------------------------------------------------------------------------------


def save_student_weights(state_dict: dict[str, torch.Tensor], stem: str | os.PathLike) -> tuple[Path, Path]:
    """Write the bare student's weights as ``STEM.safetensors`` and ``STEM.pth``, atomically.

    Both load with ``timm.create_model(tag, checkpoint_path=FILE)`` and with
    ``model.student_weights=FILE``. Tensors are stored contiguous (safetensors requires it; a
    channels-last layout is a runtime choice, not part of the weights).

    Returns:
        The two paths.
    """
    from safetensors.torch import save as safetensors_save

    stem = Path(stem)
    plain = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    st_path, pth_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".pth")
    atomic_write_bytes(st_path, safetensors_save(plain, metadata={"format": "pt"}))
    with _atomic_file(pth_path) as f:
        torch.save(plain, f)
    return st_path, pth_path


# --------------------------------------------------------------------------------------------
# The directory of checkpoints
# --------------------------------------------------------------------------------------------


class CheckpointManager:
    """Writes, prunes and finds the checkpoints of one run.

    Args:
        directory: ``RUN_DIR/checkpoints``.
        keep_last: how many ``ckpt-*.pt`` to keep (``best.pt`` is kept besides).
        enabled: False on ranks other than 0: saving is a no-op there; finding still works.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3, enabled: bool = True) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.enabled = enabled

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def path_for(self, global_step: int) -> Path:
        return self.directory / f"ckpt-{global_step:09d}.pt"

    def checkpoints(self) -> list[Path]:
        """The ``ckpt-*.pt`` files, newest (highest global step) first; temporary files are ignored."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _CKPT_RE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def best_top1(self) -> float | None:
        """The validation top-1 of ``best.pt``, or None when there is none yet."""
        info = self.directory / "best.json"
        if not info.is_file():
            return None
        try:
            return float(json.loads(info.read_text())["top1"])
        except (ValueError, KeyError, TypeError):
            return None

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete ``.*.tmp-*`` files left by a killed writer; returns them (call before a run writes)."""
        if not self.enabled or not self.directory.is_dir():
            return []
        stale = [p for p in self.directory.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def save(self, state: dict[str, Any], *, global_step: int, top1: float | None = None,
             save: Callable[[Any, Any], None] = torch.save) -> Path | None:
        """Write ``state`` as ``ckpt-<global_step>.pt``; copy it to ``best.pt`` when ``top1`` is a new best; prune.

        Args:
            state: the full training state (must carry ``format``/``version`` and the required keys).
            global_step: optimiser steps done so far (names the file, orders checkpoints).
            top1: validation top-1 of this state (epoch-end checkpoints), or None.
            save: the serialiser (``torch.save``); tests substitute one that gets killed midway.

        Returns:
            The checkpoint's path, or None on a disabled (non-zero rank) manager.
        """
        if not self.enabled:
            return None
        path = self.path_for(global_step)
        atomic_torch_save(state, path, save=save)
        best = self.best_top1()
        if top1 is not None and (best is None or top1 > best):
            self._link_best(path, top1, global_step)
        self._prune()
        return path

    def _link_best(self, path: Path, top1: float, global_step: int) -> None:
        # A hard link is an atomic, free copy; a file system without links gets a real copy.
        for src, dst in ((_sidecar(path), _sidecar(self.best_path)), (path, self.best_path)):
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                atomic_write_bytes(tmp, src.read_bytes())
            os.replace(tmp, dst)
        atomic_write_bytes(self.directory / "best.json",
                           json.dumps({"top1": top1, "global_step": global_step, "from": path.name}).encode())

    def _prune(self) -> None:
        for old in self.checkpoints()[self.keep_last:]:
            old.unlink(missing_ok=True)
            _sidecar(old).unlink(missing_ok=True)

    def find_latest_valid(self, *, map_location: str | torch.device = "cpu",
                          ) -> tuple[Path | None, dict[str, Any] | None, list[tuple[Path, str]]]:
        """The newest checkpoint that loads and validates, walking back past damaged ones.

        Returns:
            ``(path, state, skipped)``: ``path``/``state`` are None when no valid checkpoint exists;
            ``skipped`` lists ``(path, reason)`` for each newer checkpoint that was rejected.
        """
        skipped: list[tuple[Path, str]] = []
        for path in self.checkpoints():
            try:
                return path, load_checkpoint(path, map_location=map_location), skipped
            except CheckpointError as err:
                log.warning("skipping checkpoint %s: %s", path, err)
                skipped.append((path, str(err)))
        return None, None, skipped
