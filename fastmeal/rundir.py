"""One run per run dir: a lock held while a run writes, and the refusal to mix two runs' files.

``fastmeal train`` takes ``RUN_DIR/.lock`` (``flock``) on rank 0 before it reads or writes anything
in the run dir. The kernel releases the lock when the process dies, however it dies (SIGKILL
included), so a crashed run never blocks the next one; a second process on the same run dir is
refused with the holder's pid, host and start time. On NFS, Linux implements ``flock`` with NFS
byte-range locks; a file system without locks gets a warning that the run dir is unprotected.

A run dir that already holds another run's checkpoints or metrics is refused unless the user says
what to do with it: ``--resume auto`` (continue it), ``runtime.if_exists=overwrite`` (delete its
files first) or ``runtime.if_exists=new`` (train into ``RUN_DIR-2``, ``RUN_DIR-3``, ...).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
import weakref
from pathlib import Path

log = logging.getLogger("fastmeal.rundir")

LOCK_NAME = ".lock"
# What a run writes at the run dir's top level; `overwrite` removes exactly these (and checkpoints/).
RUN_FILES = ("metrics.jsonl", "config.json", "preempted.json", "student_last.pth", "student_last.safetensors",
             "student_best.pth", "student_best.safetensors")


class RunDirError(RuntimeError):
    """A run dir that cannot be used as asked (in use, holding another run); the message says what to do."""


class RunDirVanishedError(RuntimeError):
    """The run dir (or its checkpoints) disappeared while the run was writing to it."""


class RunDirLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock``, released by the kernel when the process dies.

    A ``flock`` belongs to the open file, which a forked child (a DataLoader worker) shares; so a forked
    child drops its copy at once (:func:`_drop_locks_in_child`), and the lock ends with the process that
    took it, not with the last of its children.

    Args:
        run_dir: the run directory (created if needed).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._inode: int | None = None
        _LOCKS.add(self)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunDirLock:
        """Take the lock, or raise :class:`RunDirError` naming the process that holds it."""
        if self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(f"run dir {self.run_dir} is in use by {holder}; two runs in one run dir would mix "
                              "their checkpoints: wait for it to end (or stop it), or train into another run dir "
                              "with --set runtime.run_dir=DIR") from None
        except (ImportError, OSError) as err:
            if isinstance(err, OSError) and err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS,
                                                               errno.EINVAL):
                os.close(fd)
                raise
            log.warning("cannot lock %s (%s: this file system offers no locks): nothing stops a second run from "
                        "using the same run dir, so make sure only one does", self.path, err)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self._fd, self._inode = fd, os.fstat(fd).st_ino
        return self

    def check(self) -> None:
        """Raise :class:`RunDirVanishedError` when the run dir was deleted or replaced since :meth:`acquire`."""
        if self._fd is None:
            return
        try:
            same = os.stat(self.path).st_ino == self._inode
        except OSError:
            same = False
        if not same:
            raise RunDirVanishedError(f"the run dir {self.run_dir} vanished while training (deleted, moved or "
                                      "unmounted?): stopping without writing anything")

    def release(self) -> None:
        # The file stays: unlinking it would let a third process lock a new file while a second waits on the old.
        if self._fd is not None:
            with contextlib.suppress(OSError, ImportError):
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_UN)  # for every sharer of the open file, not only this fd
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


_LOCKS: weakref.WeakSet[RunDirLock] = weakref.WeakSet()


def _drop_locks_in_child() -> None:
    """After a fork, in the child: close its copies of the held locks' files (the parent keeps the locks)."""
    for lock in list(_LOCKS):
        if lock._fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock._fd)
            lock._fd = None


os.register_at_fork(after_in_child=_drop_locks_in_child)


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        if info:
            return f"pid {info.get('pid')} on {info.get('host')} (started {info.get('started')})"
    return "another process"


def previous_run(run_dir: Path) -> str | None:
    """What an earlier run left in ``run_dir`` (checkpoints, metrics), described in words; None if nothing."""
    found = []
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        names = sorted(p.name for p in checkpoints.iterdir() if p.name.endswith(".pt") and not p.name.startswith("."))
        if names:
            found.append(f"{len(names)} checkpoint file(s) in checkpoints/ ({', '.join(names[-3:])})")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        found.append("metrics.jsonl")
    return " and ".join(found) or None


def clear_run(run_dir: Path) -> list[str]:
    """``runtime.if_exists=overwrite``: delete what a run writes in ``run_dir``; returns the names removed."""
    removed = []
    if (run_dir / "checkpoints").is_dir():
        shutil.rmtree(run_dir / "checkpoints")
        removed.append("checkpoints/")
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
            removed.append(name)
    return removed


def next_free_run_dir(run_dir: Path) -> Path:
    """``runtime.if_exists=new``: ``run_dir`` itself when it holds no run, else the first free ``run_dir-N``."""
    candidate, n = run_dir, 1
    while previous_run(candidate) is not None:
        n += 1
        candidate = run_dir.with_name(f"{run_dir.name}-{n}")
    return candidate


class RunDir:
    """A run's claim on its run dir: the lock, and the refusal to mix two runs (``runtime.if_exists``).

    Args:
        run_dir: the run directory.
        if_exists: ``runtime.if_exists`` (``error``: refuse another run's files; ``overwrite``: delete them).
        is_main: rank 0 locks and claims; every rank raises the same error.
    """

    def __init__(self, run_dir: Path, *, if_exists: str = "error", is_main: bool = True) -> None:
        self.path = Path(run_dir)
        self.if_exists = if_exists
        self.is_main = is_main
        self.lock = RunDirLock(self.path)
        self._open = self._claimed = False

    def open(self, *, resuming: bool) -> None:
        """Take the lock and refuse a run dir that holds another run (unless resuming); idempotent; collective.

        Raises:
            RunDirError: locked by another process, or holding another run's checkpoints or metrics that
                neither resume nor ``runtime.if_exists`` says what to do with.
        """
        if self._open:
            return
        problem = None
        if self.is_main:
            try:
                self.lock.acquire()
                # A second fit() of the same trainer continues its own run: nothing to refuse.
                problem = None if resuming or self._claimed else self._claim()
            except RunDirError as err:
                problem = str(err)
        from fastmeal.distributed import all_gather_objects

        problem = all_gather_objects(problem)[0]
        if problem:
            self.lock.release()
            raise RunDirError(problem)
        self._open = self._claimed = True

    def _claim(self) -> str | None:
        found = previous_run(self.path)
        if found is None:
            return None
        if self.if_exists == "overwrite":
            log.warning("runtime.if_exists=overwrite: removed %s of an earlier run from %s",
                        ", ".join(clear_run(self.path)), self.path)
            return None
        return (f"run dir {self.path} already holds another run ({found}); training into it would mix the two. "
                "Continue that run with --resume auto, train into a new dir with --set runtime.if_exists=new "
                "(or --set runtime.run_dir=DIR), or delete its files first with --set runtime.if_exists=overwrite")

    def close(self) -> None:
        """Release the lock (the end of a fit; also when set-up fails after a resume)."""
        self.lock.release()
        self._open = False
