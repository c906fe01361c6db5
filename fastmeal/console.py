"""What fastmeal prints for people: progress bars only on a terminal, durations as h:mm:ss (no torch import)."""

from __future__ import annotations

import contextlib
import logging
import math
import sys


def format_duration(seconds: float | None) -> str:
    """``3725`` → ``1:02:05``; ``90000`` → ``1d 1:00:00``; None → ``?``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def progress_enabled(requested: bool) -> bool:
    """A tqdm bar only when asked for and stderr is a terminal: a file or a pipe gets the plain log lines
    instead of ``\\r`` frames."""
    return bool(requested) and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def log_through_tqdm() -> contextlib.AbstractContextManager:
    """Route console log lines through tqdm so they do not tear a progress bar.

    Only loggers that have a console handler are redirected (tqdm's helper adds a handler to every
    logger it is given, which would print each line twice through a propagating child logger).
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    def console(handler: logging.Handler) -> bool:
        return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)

    loggers = [lg for lg in (logging.root, logging.getLogger("fastmeal")) if any(map(console, lg.handlers))]
    return logging_redirect_tqdm(loggers=loggers) if loggers else contextlib.nullcontext()
