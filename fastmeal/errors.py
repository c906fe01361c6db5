"""Errors of a run that the CLI reports in one line (no traceback); their messages say what to do."""


class SetupError(ValueError):
    """Parts of a run that do not fit together (class counts, a mode without its teachers); says how to fix it."""


class NonFiniteError(RuntimeError):
    """The loss or the weights became NaN/inf; nothing was written from them (the message names the last good save)."""


class OutOfMemoryError(RuntimeError):
    """A training step ran out of GPU memory; the message names the batch size to lower."""
