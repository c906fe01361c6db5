"""Signals held back for a moment, then handled as usual; a Ctrl-C that a library dropped, raised again.

No torch import: the CLI uses it before torch.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable, Iterator


@contextlib.contextmanager
def signals_deferred(signums: Iterable[int]) -> Iterator[None]:
    """While the block runs, ``signums`` are only noted; when it ends, each noted one is raised again.

    Python runs a signal's handler in the main thread at its next bytecode, wherever that is. Some
    places must not be cut: an import of torch or numpy stopped half-way leaves the library unusable
    for the rest of the process (even the exit path's imports then fail), and DataLoader's iterator
    stopped inside ``__init__`` cannot be shut down. Inside the block the handlers only note the signal;
    at its end the previous handlers are put back and every noted signal is raised again with
    ``signal.raise_signal``, so Ctrl-C, SIGTERM, ... act as if they had come that instant.

    Only the main thread can set handlers; elsewhere, and for a signal whose handler was not set from
    Python, the block changes nothing.
    """
    noted: list[int] = []
    previous = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for signum in signums:
                if signal.getsignal(signum) is not None:
                    # signal.signal runs the handlers of signals already pending first: one may raise here.
                    previous[signum] = signal.signal(signum, lambda got, _frame: noted.append(got))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(noted):
            signal.raise_signal(signum)


# Set by interrupt_handler, cleared when ctrl_c_remembered ends.
_interrupted = False


def interrupt_handler(signum: int, frame: object) -> None:  # noqa: ARG001 - a signal handler's signature
    """SIGINT: remember it, then raise KeyboardInterrupt as Python's own handler does."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_remembered() -> Iterator[None]:
    """While the block runs, a Ctrl-C that some library swallowed still stops the run at its next step.

    Python raises KeyboardInterrupt wherever the main thread is when the signal arrives. Some places
    print that exception as "ignored" and drop it: ``__del__`` methods, weakref callbacks, and the
    callbacks that run after a fork (``os.register_at_fork``; logging has one, and loader workers fork
    every epoch). With plain DataLoader(num_workers=1) epochs on the CPU, 11 Ctrl-Cs in 120 were
    dropped in logging's after-fork callback and training went on. (fastmeal starts its workers with
    the signal deferred, which closes that one; others may remain in the libraries below.)

    Inside this block the SIGINT handler also sets a flag, and the loops call
    :func:`raise_if_interrupted` once per step, so a dropped Ctrl-C raises again there. A SIGINT that
    is ignored (a job started in the background by a script or ``nohup``) stays ignored.
    """
    global _interrupted
    installed = (threading.current_thread() is threading.main_thread()
                 and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if installed:
        signal.signal(signal.SIGINT, interrupt_handler)
    try:
        yield
    finally:
        try:
            if installed:
                try:
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                except KeyboardInterrupt:  # signal.signal ran the old handler of a pending SIGINT first
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                    raise
        finally:
            _interrupted = False


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came and its exception was dropped somewhere (see ctrl_c_remembered)."""
    if _interrupted:
        raise KeyboardInterrupt
