"""Named phases of a training step: NVTX ranges on CUDA (for Nsight Systems), free elsewhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def phase(name: str, enabled: bool | None = None) -> Iterator[None]:
    """An NVTX range called ``name`` around the block when CUDA is in use; nothing otherwise.

    Phases of a step: ``data``, ``teachers``, ``student_fwd``, ``loss``, ``backward``, ``optimizer``,
    ``eval``. ``enabled=None`` means: on when CUDA is available.
    """
    if enabled is None:
        enabled = torch.cuda.is_available()
    if not enabled:
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
