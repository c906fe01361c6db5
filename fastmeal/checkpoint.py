"""Checkpoints that survive being killed mid-write, and resume from the newest one that is intact.

Layout of ``RUN_DIR/checkpoints/``:

* ``ckpt-<global step, 9 digits>.pt``: the full training state (see :func:`training_state` in the
  trainer: student, discriminator, optimiser, grad scaler, epoch, step within the epoch, RNG states,
  resolved config, the evaluation it was written after) with ``digest``, a SHA-256 of its own content
  (:func:`state_digest`), inside. The last ``runtime.keep_last`` are kept.
* ``best.pt`` (a hard link to, or a copy of, the checkpoint with the best validation top-1) and
  ``best.json`` (its top-1, global step and source file).
* ``manifest.json``, written last by every save: the newest checkpoint and the global step each derived
  file (``best.pt``, ``RUN_DIR/student_last.*``, ``RUN_DIR/student_best.*``) was made from.

A save is one commit followed by derived files: the checkpoint is renamed into place first (from then
on it is the truth), then ``best.pt``/``best.json``, the student exports and the manifest are derived
from it, then old checkpoints are pruned. Each file is written atomically (a hidden temporary file in
the same directory, flushed and fsync'ed, renamed over the target, the directory fsync'ed), so a
process killed at any point leaves only whole files; the derived files may then lag the newest
checkpoint, which :meth:`CheckpointManager.heal` (run when a run resumes) re-derives. The digest
catches what atomicity cannot: a file damaged later (a bad copy, a bad sync) — ``torch.load`` alone
reads a flipped byte in a tensor without complaint. Checkpoints of older fastmeal versions carry a
``.sha256`` file instead; it is still checked.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from fastmeal.rundir import RunDir, RunDirVanishedError

FORMAT = "fastmeal-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "student", "optimizer", "epoch", "step_in_epoch", "global_step", "config")
_CKPT_RE = re.compile(r"^ckpt-(\d{9})\.pt$")
MANIFEST = "manifest.json"
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


class DiskFullError(OSError):
    """No space left (or quota exceeded) while writing ``path``; the message names it and the free space."""

    def __str__(self) -> str:
        return str(self.strerror)


def _disk_full(err: OSError, path: Path) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(err.errno, f"no space left on the device while writing {path} ({free} on "
                                    f"{path.parent}); nothing was replaced: free some space and resume")


def _disk_full_cause(err: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT ``OSError`` behind ``err`` (torch.save wraps it in a RuntimeError), or None."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """Yield a file to write; on success it is flushed, fsync'ed and renamed to ``path``; on error removed.

    The temporary file is ``.NAME.tmp-PID`` next to ``path``: :func:`remove_temporaries` removes those
    whose writer is gone. A full disk raises :class:`DiskFullError` naming ``path``. The directory must
    exist: a run dir deleted under a run fails its next write instead of coming back empty.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        full = _disk_full_cause(err)
        if full is not None and not isinstance(err, DiskFullError):
            raise _disk_full(full, path) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, make_parents: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, flush + fsync, rename)."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(path) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, save: Callable[[Any, Any], None] = torch.save,
                      make_parents: bool = True) -> str:
    """``torch.save`` ``obj`` to ``path`` atomically; returns the SHA-256 of the file's bytes.

    A fastmeal checkpoint (``format`` entry) gets its content digest (:func:`state_digest`) stored
    inside as ``digest``, which :func:`load_checkpoint` checks.
    """
    path = Path(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = {**obj, "digest": state_digest(obj)}
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(path) as f:
        writer = _HashingWriter(f)
        save(obj, writer)
    return writer.sha256.hexdigest()


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 over a checkpoint's content (every tensor's dtype, shape and bytes, every plain value).

    Independent of the file's bytes, so it can live inside the file it describes; the ``digest``
    entry itself is left out.
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):  # optimizer states mix int and str keys
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, list | tuple):  # pickling keeps tuples, but treat both alike
        h.update(f"L{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"V{obj!r}".encode())


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the ``.NAME.tmp-PID`` files of writers that are gone (no process PID); returns them.

    A run holds its run dir's lock (:class:`fastmeal.rundir.RunDirLock`) while it writes, so a
    temporary left there is a killed writer's; the PID check also spares a live writer on this host.
    """
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        head, sep, pid = p.name.rpartition(".tmp-")
        if not (p.name.startswith(".") and sep and pid.isdigit()):
            continue
        if int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


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
    except Exception as err:  # a damaged zip fails in many ways (RuntimeError, EOFError, KeyError, ...)
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
    if "digest" in state:
        actual = state_digest(state)
        if actual != state["digest"]:
            raise CheckpointError(f"checkpoint {path} is damaged or truncated: the SHA-256 of its content "
                                  f"{actual[:12]}… does not match the digest stored in it "
                                  f"({str(state['digest'])[:12]}…)")
    elif not sidecar.is_file():
        log.warning("checkpoint %s carries no digest (written by an older fastmeal, or by hand): its content "
                    "cannot be verified", path)
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


def save_student_weights(state_dict: dict[str, torch.Tensor], stem: str | os.PathLike, *,
                         global_step: int | None = None, make_parents: bool = True) -> tuple[Path, Path]:
    """Write the bare student's weights as ``STEM.safetensors`` and ``STEM.pth``, atomically.

    Both load with ``timm.create_model(tag, checkpoint_path=FILE)`` and with
    ``model.student_weights=FILE``. Tensors are stored contiguous (safetensors requires it; a
    channels-last layout is a runtime choice, not part of the weights). ``global_step`` goes into the
    safetensors metadata (the checkpoint the weights come from).

    Returns:
        The two paths.
    """
    from safetensors.torch import save as safetensors_save

    stem = Path(stem)
    plain = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    st_path, pth_path = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".pth")
    metadata = {"format": "pt", **({"global_step": str(global_step)} if global_step is not None else {})}
    atomic_write_bytes(st_path, safetensors_save(plain, metadata=metadata), make_parents=make_parents)
    with _atomic_file(pth_path) as f:
        torch.save(plain, f)
    return st_path, pth_path


# --------------------------------------------------------------------------------------------
# The directory of checkpoints
# --------------------------------------------------------------------------------------------


class CheckpointManager:
    """Writes, prunes, heals and finds the checkpoints of one run.

    Args:
        directory: ``RUN_DIR/checkpoints``.
        keep_last: how many ``ckpt-*.pt`` to keep (``best.pt`` is kept besides).
        enabled: False on ranks other than 0: saving is a no-op there; finding still works.
        export_dir: where the student's weights alone are exported after each save (``student_last.*``,
            ``student_best.*``); None exports nothing.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 3, enabled: bool = True,
                 export_dir: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.enabled = enabled
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self._made = False

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def path_for(self, global_step: int) -> Path:
        return self.directory / f"ckpt-{global_step:09d}.pt"

    def checkpoints(self) -> list[Path]:
        """The ``ckpt-*.pt`` files, newest (highest global step) first; temporary files are ignored."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _CKPT_RE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def best_info(self) -> dict[str, Any] | None:
        """``best.json``: ``{"top1", "global_step", "from"}`` of ``best.pt``, or None when there is none yet."""
        info = self.directory / "best.json"
        try:
            data = json.loads(info.read_text())
            float(data["top1"])
            return data
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def best_top1(self) -> float | None:
        """The validation top-1 of ``best.pt``, or None when there is none yet."""
        info = self.best_info()
        return float(info["top1"]) if info else None

    def manifest(self) -> dict[str, Any] | None:
        """``manifest.json`` (what the last completed save derived), or None."""
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporaries of gone writers here and in ``export_dir``; returns them (call before a run writes)."""
        if not self.enabled:
            return []
        found = remove_temporaries(self.directory)
        if self.export_dir is not None:
            found += remove_temporaries(self.export_dir)
        return found

    def save(self, state: dict[str, Any], *, global_step: int, top1: float | None = None,
             save: Callable[[Any, Any], None] = torch.save) -> Path | None:
        """Write ``state`` as ``ckpt-<global_step>.pt``, then derive ``best.pt``, the exports and the manifest; prune.

        Args:
            state: the full training state (must carry ``format``/``version`` and the required keys).
                ``state["is_best"]``, when present, says whether it is a new best; otherwise ``top1`` is
                compared with ``best.json``.
            global_step: optimiser steps done so far (names the file, orders checkpoints).
            top1: validation top-1 of this state (epoch-end checkpoints), or None.
            save: the serialiser (``torch.save``); tests substitute one that gets killed midway.

        Returns:
            The checkpoint's path, or None on a disabled (non-zero rank) manager.
        """
        if not self.enabled:
            return None
        if "is_best" not in state:
            best = self.best_top1()
            state = {**state, "top1": top1, "is_best": top1 is not None and (best is None or top1 > best)}
        path = self.path_for(global_step)
        if not self._made:  # later saves never re-create it: a deleted run dir fails instead of restarting empty
            self.directory.mkdir(parents=True, exist_ok=True)
            self._made = True
        atomic_torch_save(state, path, save=save, make_parents=False)
        self.publish(path, state)
        return path

    def publish(self, path: Path, state: dict[str, Any]) -> None:
        """Derive everything else from the valid checkpoint ``path`` (holding ``state``); idempotent.

        ``best.pt``/``best.json`` when it is a new best, the student exports, ``manifest.json`` (last),
        then the pruning of old checkpoints.
        """
        step = int(state["global_step"])
        best = self.best_info()
        if state.get("is_best") and state.get("top1") is not None:
            if not (best and best.get("global_step") == step and self.best_path.is_file()):
                self._link(path, self.best_path)
            best = {"top1": float(state["top1"]), "global_step": step, "from": path.name}
            atomic_write_bytes(self.directory / "best.json", json.dumps(best).encode(), make_parents=False)
        exports: dict[str, int] = {}
        if self.export_dir is not None:
            save_student_weights(state["student"], self.export_dir / "student_last", global_step=step,
                                 make_parents=False)
            exports["student_last"] = step
            if best is not None:
                if best["global_step"] == step:
                    save_student_weights(state["student"], self.export_dir / "student_best", global_step=step,
                                         make_parents=False)
                elif not self._export_current("student_best", best["global_step"]):
                    # A kill left the exports behind best.pt: re-derive them from it.
                    save_student_weights(load_checkpoint(self.best_path)["student"],
                                         self.export_dir / "student_best", global_step=best["global_step"],
                                         make_parents=False)
                exports["student_best"] = best["global_step"]
        # top1: an epoch's checkpoint is written twice, before and after its evaluation (same name): it tells
        # which of the two the manifest describes.
        manifest = {"format": "fastmeal-manifest", "latest": path.name, "global_step": step,
                    "epoch": int(state["epoch"]), "step_in_epoch": int(state["step_in_epoch"]),
                    "top1": state.get("top1"), "best": best, "exports": exports}
        atomic_write_bytes(self.manifest_path, (json.dumps(manifest, indent=1) + "\n").encode(), make_parents=False)
        self._prune()

    def _export_current(self, stem: str, step: int) -> bool:
        exports = (self.manifest() or {}).get("exports", {})
        return exports.get(stem) == step and self.export_dir is not None and all(
            (self.export_dir / f"{stem}.{ext}").is_file() for ext in ("pth", "safetensors"))

    def set_aside(self, path: Path) -> Path:
        """Rename a damaged checkpoint to ``damaged-NAME`` (kept for inspection, out of resume's and pruning's way)."""
        target = path.with_name(f"damaged-{path.name}")
        os.replace(path, target)
        _sidecar(path).unlink(missing_ok=True)
        return target

    def heal(self, path: Path, state: dict[str, Any]) -> bool:
        """Re-derive what a killed save left behind, from ``path`` (the newest valid checkpoint, resumed from).

        Returns:
            True when something had to be re-derived (the manifest did not describe ``path``).
        """
        if not self.enabled:
            return False
        for sidecar in self.directory.glob("*.pt.sha256"):  # left by a prune killed between its unlinks
            if not sidecar.with_name(sidecar.name[:-len(".sha256")]).exists():
                sidecar.unlink(missing_ok=True)
        manifest = self.manifest() or {}
        best = self.best_info()
        lost_best = best is not None and not self.best_path.is_file()
        if lost_best:
            best = self._recover_best(best)
        consistent = (not lost_best and manifest.get("latest") == path.name
                      and manifest.get("top1") == state.get("top1") and manifest.get("best") == best)
        if self.export_dir is not None:
            consistent = consistent and all(self._export_current(stem, step)
                                            for stem, step in manifest.get("exports", {}).items())
        if consistent:
            return False
        log.warning("the last save before this start did not finish: re-deriving best.pt, the exports and %s from %s",
                    MANIFEST, path.name)
        self.publish(path, state)
        return True

    def _recover_best(self, best: dict[str, Any]) -> dict[str, Any] | None:
        """``best.pt`` is gone (deleted by hand; a kill cannot do it): link it again from its checkpoint, or, when
        that was pruned, forget the best (``best.json``) so that the next evaluation starts a new one."""
        source = self.path_for(int(best["global_step"]))
        if source.is_file():
            self._link(source, self.best_path)
            return best
        (self.directory / "best.json").unlink()
        log.warning("best.pt is missing and its checkpoint %s is pruned: the best so far (top-1 %s at global step %d) "
                    "is forgotten; the next evaluation starts a new best", source.name, best.get("top1"),
                    int(best["global_step"]))
        return None

    def _link(self, src: Path, dst: Path) -> None:
        # A hard link is an atomic, free copy; a file system without links gets a real copy.
        if dst.exists() and os.path.samefile(src, dst):
            return  # rename() of two links to one file would do nothing and leave the temporary behind
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            with _atomic_file(tmp) as f, src.open("rb") as s:
                shutil.copyfileobj(s, f, _CHUNK)
        os.replace(tmp, dst)
        _fsync_dir(dst.parent)

    def _prune(self) -> None:
        for old in self.checkpoints()[self.keep_last:]:
            old.unlink(missing_ok=True)
            _sidecar(old).unlink(missing_ok=True)  # of checkpoints written by older versions
        _sidecar(self.best_path).unlink(missing_ok=True)

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

    def describe_best(self) -> str:
        """Whether ``best.pt`` is intact and how to resume from it (for when every checkpoint is damaged)."""
        if not self.best_path.is_file():
            return "there is no best.pt either"
        try:
            state = load_checkpoint(self.best_path)
        except CheckpointError as err:
            return f"best.pt is damaged too ({err})"
        return (f"best.pt is intact (global step {state['global_step']}, epoch {state['epoch']}): continue from it "
                f"with --resume {self.best_path}")


PREEMPTED_MARKER = "preempted.json"


class Checkpointer:
    """A run's checkpoints as the trainer sees them: the run-dir claim, saves, resume and its repairs, and the
    marker a preempted run leaves for its job script.

    Args:
        run_dir: the run directory (``checkpoints/`` and the student's exports go there).
        keep_last: ``runtime.keep_last``.
        dist: this process's place in the world (rank 0 writes; resume is collective).
        if_exists: ``runtime.if_exists``.
    """

    def __init__(self, run_dir: Path, *, keep_last: int, dist: Any, if_exists: str = "error") -> None:
        self.run_dir = Path(run_dir)
        self.dist = dist
        self.rundir = RunDir(self.run_dir, if_exists=if_exists, is_main=dist.is_main)
        self.manager = CheckpointManager(self.run_dir / "checkpoints", keep_last=keep_last, enabled=dist.is_main,
                                         export_dir=self.run_dir)
        self._saved_once = False

    def open(self, *, resuming: bool) -> None:
        """Claim the run dir (:meth:`fastmeal.rundir.RunDir.open`), then remove the temporaries of killed writers."""
        self.rundir.open(resuming=resuming)
        stale = self.manager.remove_stale_temporaries()
        if stale:
            log.warning("removed %d temporary file(s) left by an interrupted write: %s", len(stale),
                        ", ".join(p.name for p in stale))

    def close(self) -> None:
        self.rundir.close()

    def save(self, state: dict[str, Any]) -> Path | None:
        """Write ``state`` (rank 0; None elsewhere); never into a run dir that vanished while training."""
        if not self.dist.is_main:
            return None
        self.rundir.lock.check()
        directory = self.manager.directory
        if self._saved_once and not directory.is_dir():
            raise RunDirVanishedError(f"{directory} vanished while training (deleted?): stopping without writing "
                                      f"anything; the metrics in the run dir end at global step {state['global_step']}")
        try:
            path = self.manager.save(state, global_step=int(state["global_step"]), top1=state.get("top1"))
        except (FileNotFoundError, CheckpointError):
            self.rundir.lock.check()  # deleted under our feet: say so rather than a bare missing temporary
            if directory.is_dir():
                raise
            raise RunDirVanishedError(f"{directory} vanished during a save (deleted?): stopping without a "
                                      "checkpoint of this step") from None
        self._saved_once = True
        log.info("checkpoint %s (epoch %d, step %d in epoch, global step %d)", path, state["epoch"],
                 state["step_in_epoch"], state["global_step"])
        return path

    def resume(self, spec: str) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint to continue from: ``auto`` (the newest valid one, damaged ones set aside) or a path.

        Returns:
            ``(path, state)``, or ``(None, None)`` for ``auto`` with no checkpoint (a fresh start).

        Raises:
            CheckpointError: an explicit path that is damaged, or ``auto`` when every checkpoint is.
        """
        from fastmeal.distributed import check_ranks_agree

        if spec != "auto":
            return Path(spec), load_checkpoint(spec, map_location="cpu")
        path, state, skipped = self.manager.find_latest_valid(map_location="cpu")
        # A run dir that some node does not see would silently start those ranks from scratch.
        check_ranks_agree(path.name if path else None, "the checkpoint to resume from (resume=auto)",
                          hint=f"runtime.run_dir={self.run_dir} must be on a file system every node sees",
                          error=CheckpointError)
        for bad, reason in skipped:
            log.warning("resume: skipped damaged checkpoint %s: %s", bad, reason)
        if path is None:
            if skipped:
                raise CheckpointError(f"resume=auto: every checkpoint in {self.manager.directory} is damaged "
                                      f"({len(skipped)} tried; see the warnings above); {self.manager.describe_best()}")
            self._start_over()
            return None, None
        if self.dist.is_main:
            for bad, _ in skipped:
                log.warning("renamed the damaged checkpoint %s to %s", bad.name, self.manager.set_aside(bad).name)
        return path, state

    def accept_config(self, state: dict[str, Any], cfg: Any, *, allowed: frozenset[str] = frozenset()) -> list[Any]:
        """The changes of config from ``state``'s to ``cfg`` that a resume accepts (logged); raises on the others.

        A change of what the run computes is refused unless ``allowed`` names it (``--allow-changed``,
        :func:`fastmeal.config.check_resume_config`); a batch size only changes at an epoch's start.
        """
        from fastmeal.config import Config, ConfigError, check_resume_config

        old = Config.from_dict(json.loads(state["config"]))
        changes = check_resume_config(old, cfg, allowed=allowed)
        if int(state["step_in_epoch"]) and old.data.batch_size != cfg.data.batch_size:
            raise ConfigError(f"data.batch_size: {old.data.batch_size} -> {cfg.data.batch_size} can only take "
                              f"effect at an epoch's start, and the checkpoint is at step {state['step_in_epoch']} of "
                              f"epoch {state['epoch']}: resume with the old batch size to the epoch's end first")
        for change in changes:
            log.warning("resume: %s (accepted; from global step %d)", change, int(state["global_step"]))
        return changes

    def _start_over(self) -> None:
        metrics = self.run_dir / "metrics.jsonl"
        if self.dist.is_main and metrics.is_file() and metrics.stat().st_size:
            aside = metrics.with_name(f"metrics-before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            os.replace(metrics, aside)
            log.warning("resume=auto: no checkpoint in %s although %s records an earlier run (checkpoints deleted?): "
                        "starting from step 0; the old metrics are kept as %s", self.manager.directory,
                        metrics.name, aside.name)
        else:
            log.info("resume=auto: no checkpoint in %s; starting from scratch", self.manager.directory)

    def repair(self, path: Path, state: dict[str, Any]) -> None:
        """After resuming from ``path``: re-derive what a killed save left behind, and make ``metrics.jsonl`` hold
        exactly the records up to it (drop those of steps it will redo, re-add its own epoch record when a kill
        came between the two writes)."""
        if not self.dist.is_main:
            return
        if path.parent.resolve() == self.manager.directory.resolve() and path.name != "best.pt":
            self.manager.heal(path, state)
        metrics = self.run_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        rows = []
        for line in lines:
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
        step = int(state["global_step"])
        keep = [r for r in rows if int(r.get("global_step", 0)) <= step]
        dropped = len(rows) - len(keep)
        record = state.get("epoch_record")
        if record and int(state["step_in_epoch"]) == 0 and not any(
                r.get("kind") == "epoch" and r.get("epoch") == record.get("epoch") for r in keep):
            keep.append({"kind": "epoch", **record})
        if len(keep) != len(lines) or keep != rows:
            from fastmeal.metrics import finite_json, jsonable

            atomic_write_bytes(metrics, "".join(json.dumps(finite_json(r), default=jsonable) + "\n"
                                                for r in keep).encode())
            log.info("metrics.jsonl now ends at the checkpoint's global step %d (%d record(s) of later steps "
                     "dropped, %d re-added)", step, dropped, len(keep) + dropped - len(rows))

    def report_disk_needs(self, state_bytes: int, student_bytes: int) -> None:
        """Log (rank 0) what the run dir will hold at most next to the free space; warn when it does not fit.

        Args:
            state_bytes: the trained tensors (student and discriminator); a checkpoint holds them twice
                (weights and SGD momentum).
            student_bytes: the student's weights alone (four exports: last and best, .pth and .safetensors).
        """
        if not self.dist.is_main:
            return
        checkpoint = 2 * state_bytes
        need = checkpoint * (self.manager.keep_last + 1) + 4 * student_bytes
        try:
            free = shutil.disk_usage(self.run_dir).free
        except OSError:
            return
        gib = 2**30
        line = (f"run dir {self.run_dir}: up to {need / gib:.2f} GiB ({self.manager.keep_last} checkpoints of "
                f"{checkpoint / gib:.2f} GiB, best.pt, 4 student exports); {free / gib:.1f} GiB free")
        if need > free:
            log.warning("%s: not enough for the whole run (lower runtime.keep_last or free some space)", line)
        else:
            log.info(line)

    def clear_marker(self) -> None:
        """A starting run is not preempted (rank 0)."""
        if self.dist.is_main:
            (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)

    def after_stop(self, reason: str, *, epoch: int, step_in_epoch: int, global_step: int) -> None:
        """After a stop request ended the fit: rank 0 writes ``preempted.json`` for a preemption (the signal, the
        position and the checkpoint: a job script requeues on it), then no rank leaves before it is written
        (torchrun exits non-zero after a forwarded signal; ``srun --kill-on-bad-exit`` would cut the write)."""
        from fastmeal.distributed import barrier

        if self.dist.is_main and reason in ("SIGTERM", "SIGUSR1", "peer"):
            checkpoint = self.manager.path_for(global_step)
            if checkpoint.is_file():
                marker = {"signal": reason, "epoch": epoch, "step_in_epoch": step_in_epoch,
                          "global_step": global_step, "checkpoint": str(checkpoint)}
                atomic_write_bytes(self.run_dir / PREEMPTED_MARKER, (json.dumps(marker) + "\n").encode())
                log.warning("preempted at epoch %d step %d (global step %d); resume with --resume auto", epoch,
                            step_in_epoch, global_step)
            elif global_step == 0:
                log.warning("stopped by %s before the first step: nothing to resume from", reason)
            else:
                log.error("stopped by %s but no checkpoint for global step %d exists in %s", reason, global_step,
                          checkpoint.parent)
        barrier()
