"""The one stop path: signals only record a stop request; loops end at their next step boundary.

The first Ctrl-C (SIGINT), SIGTERM or SIGUSR1 (what torchrun and SLURM send before they kill a job) is
recorded by :func:`handling_stops`'s handlers and nothing else happens in the handler: no exception is
raised in the middle of an import, a ``torch.save``, a DataLoader's start or a library's clean-up, so
none of those can be cut half-way. Every loop asks at its step boundaries:

* the trainer, through :class:`StopAgreement` (every rank stops at the same step), finishes the step,
  writes a checkpoint and returns (exit 0 for SIGTERM/SIGUSR1, 130 for Ctrl-C);
* every other loop (start-up phases, evaluation, bank building, dataset tools) calls
  :func:`raise_if_stopped`, whose :class:`Stopped` reaches the CLI's one exit path.

A second Ctrl-C exits at once with 130 (``os._exit``: files are only ever replaced whole, so a write it
cuts leaves the previous file and a temporary that the next start removes). The loaders' worker
processes ignore these signals from their first instant (:func:`workers_starting`,
:func:`worker_init`) and die with their rank (``PR_SET_PDEATHSIG``); :func:`close_loaders` ends them
on every exit path. This is the only module of fastmeal that sets signal handlers. No torch import at
module level: the CLI uses it before torch is imported.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")
EXIT_INTERRUPTED = 130
_HARD_EXIT = (b"fastmeal: interrupted again (Ctrl-C): exiting at once; files already written are intact "
              b"(--resume auto continues from the last checkpoint)\n")

_requests: list[str] = []  # signal names (or a caller's reasons) in arrival order; the first one counts
_previous: dict[int, Any] = {}
_depth = 0


class Stopped(Exception):  # noqa: N818 - a request, not an error
    """A stop request ended a command at a point where it had nothing to save (set-up, evaluation, a tool)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    @property
    def exit_code(self) -> int:
        """130 for Ctrl-C, 128 + the signal's number for SIGTERM/SIGUSR1 (what a shell reports for them)."""
        signum = getattr(signal, self.reason, None)
        return EXIT_INTERRUPTED if self.reason == "SIGINT" or signum is None else 128 + int(signum)

    def __str__(self) -> str:
        if self.reason == "SIGINT":
            return ("interrupted (Ctrl-C); checkpoints already written are intact: continue a training run with "
                    "--resume auto")
        return f"stopped by {self.reason}; files already written are intact (the same command continues)"


def describe(reason: str) -> str:
    """How a run's summary names its stop: ``interrupted (Ctrl-C)``, ``preempted by SIGTERM``, ``preempted by peer``."""
    if reason == "SIGINT":
        return "interrupted (Ctrl-C)"
    return f"preempted by {reason}" if reason in (*STOP_SIGNALS, "peer") else reason


def _record(signum: int, frame: object) -> None:  # noqa: ARG001 - a signal handler's signature
    name = signal.Signals(signum).name
    if name == "SIGINT" and "SIGINT" in _requests:
        os.write(2, _HARD_EXIT)
        os._exit(EXIT_INTERRUPTED)
    _requests.append(name)


@contextlib.contextmanager
def handling_stops() -> Iterator[None]:
    """Record SIGINT, SIGTERM and SIGUSR1 as stop requests while the block runs (re-entrant; main thread only).

    The outermost block installs the handlers and forgets the requests when it ends; nested blocks (the
    CLI's, then :meth:`~fastmeal.trainer.Trainer.fit`'s) share them, so a signal during set-up stops the
    run before its first step. A SIGINT that is ignored (a job started in the background with ``&`` or
    ``nohup``) stays ignored.
    """
    global _depth
    outermost = _depth == 0 and threading.current_thread() is threading.main_thread()
    if outermost:
        _requests.clear()
        for name in STOP_SIGNALS:
            signum = getattr(signal, name)
            if name == "SIGINT" and signal.getsignal(signum) is signal.SIG_IGN:
                continue
            _previous[signum] = signal.signal(signum, _record)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if outermost:
            for signum, handler in _previous.items():
                signal.signal(signum, handler)
            _previous.clear()
            _requests.clear()


@contextlib.contextmanager
def default_stop_action() -> Iterator[None]:
    """The stop signals end the process for the block (their default action), then get their handlers back.

    For a call that blocks in C++ (the process group's set-up waits up to its timeout for the other
    ranks): a recorded request would only be seen when it returns, and nothing of the run exists yet
    to save. A signal set to be ignored stays ignored; off the main thread the block changes nothing.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in _stop_signums():
            if signal.getsignal(signum) not in (signal.SIG_IGN, signal.SIG_DFL, None):
                previous[signum] = signal.signal(signum, signal.SIG_DFL)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def request_stop(reason: str) -> None:
    """Ask for a stop from code (a hook's decision): the same path as a signal."""
    _requests.append(reason)


def stop_requested() -> str | None:
    """The first stop request of this process (a signal's name, or a reason given to :func:`request_stop`)."""
    return _requests[0] if _requests else None


def stop_requests() -> list[str]:
    """Every stop request so far, in arrival order (a supervisor passes each new one on to its children)."""
    return list(_requests)


def raise_if_stopped() -> None:
    """Raise :class:`Stopped` when a stop was requested: the step boundary of every loop but the trainer's."""
    if _requests:
        raise Stopped(_requests[0])


class StopAgreement:
    """:meth:`should_stop` is True on every rank once any rank has a stop request, at the same call.

    In a distributed run each call starts an asynchronous all-reduce of this rank's flag (on a CPU gloo
    group: no GPU sync) and reads the one the previous call started, which has long finished: no call
    waits for the others. Every rank makes the same calls in the same order (after every step and at the
    epoch's end), so they all read the same value at the same call, one step after the signal.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self.reason: str | None = None
        self._group = None
        self._pending: tuple[Any, Any] | None = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def should_stop(self) -> bool:
        if self.reason is not None:
            return True
        local = stop_requested()
        if self._group is None:
            self.reason = local
            return local is not None
        import torch
        import torch.distributed as dist

        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            self._pending = None
            if flag.item():  # a CPU tensor: no device sync
                self.reason = local or "peer"
                return True
        flag = torch.tensor([0 if local is None else 1], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return False

    def finish(self) -> None:
        """Wait for the exchange still in flight: none may outlive the process group."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


# --------------------------------------------------------------------------------------------
# Loader workers: they ignore the rank's stop signals and die with it
# --------------------------------------------------------------------------------------------


def _stop_signums() -> list[int]:
    return [getattr(signal, name) for name in STOP_SIGNALS]


@contextlib.contextmanager
def workers_starting() -> Iterator[None]:
    """Block the stop signals in this thread while loader workers are started (forked) inside the block.

    A child starts with its parent's signal mask, so a signal that reaches a new worker before its
    :func:`worker_init` (torchrun and SLURM signal every process of a rank; a terminal's Ctrl-C, the whole
    foreground group) stays pending instead of killing it through torch's own SIGTERM handler.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signums())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_init(worker_id: int = 0) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """DataLoader ``worker_init_fn``: ignore the stop signals (the rank handles them), unblock them, die with the rank.

    The rank ends its workers itself (:func:`close_loaders`), and the kernel SIGKILLs them when the rank
    dies however it dies (``PR_SET_PDEATHSIG``), so none is left behind.
    """
    signums = _stop_signums()
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)  # what was pending is discarded: it is ignored now
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker's own parent watchdog remains
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


# --------------------------------------------------------------------------------------------
# Live loaders: one registry, each backend closing its own
# --------------------------------------------------------------------------------------------

_LIVE: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()


def register_loader(loader: Any, close: Callable[[Any], None]) -> None:
    """Track ``loader`` (weakly) until :func:`close_loaders` calls ``close(loader)`` on an exit path."""
    _LIVE[loader] = close


def unregister_loader(loader: Any) -> None:
    _LIVE.pop(loader, None)


def close_loaders() -> None:
    """End the worker processes of every live loader of this process (the CLI calls it on every exit path)."""
    for loader, close in list(_LIVE.items()):
        close(loader)
        _LIVE.pop(loader, None)


def _close_at_exit() -> None:
    """At interpreter exit: close every tracked loader, then SIGKILL any daemonic child still alive.

    multiprocessing's own exit handler (it runs after this one) ``terminate()``s daemonic children with
    SIGTERM and joins them; loader workers ignore SIGTERM, so an untracked one (a DataLoader made outside
    fastmeal's loaders) would make the process hang at exit.
    """
    import multiprocessing

    close_loaders()
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if not children:
        return
    # torch's SIGCHLD handler raises when it sees a worker killed; the process is exiting, so it goes.
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


import multiprocessing.util  # noqa: E402, F401 - registers multiprocessing's atexit handler first; ours runs before it

atexit.register(_close_at_exit)
