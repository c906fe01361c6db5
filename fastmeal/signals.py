"""Signals held back for a moment, then handled as usual (no torch import: the CLI uses it before torch)."""

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
    if threading.current_thread() is threading.main_thread():
        for signum in signums:
            if signal.getsignal(signum) is not None:
                previous[signum] = signal.signal(signum, lambda got, _frame: noted.append(got))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(noted):
            signal.raise_signal(signum)
