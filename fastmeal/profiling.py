"""Named phases of a training step: NVTX ranges on CUDA (for Nsight Systems), free elsewhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

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


class ProfileWindows:
    """Step windows for Nsight Systems and torch.profiler (``profile.nsys_steps`` / ``profile.torch_steps``).

    ``nsys_steps A:B`` brackets global steps A..B-1 with cudaProfilerStart/Stop, so that
    ``nsys profile --capture-range=cudaProfilerApi`` records only them. ``torch_steps A:B`` records
    those steps with torch.profiler and writes a Chrome trace to ``run_dir/trace_rank{rank}.json``.
    Call :meth:`before_step` and :meth:`after_step` around every training step and :meth:`close` at
    the end (a window still open then is closed and written).
    """

    def __init__(self, nsys_window: tuple[int, int] | None, torch_window: tuple[int, int] | None,
                 run_dir: str | Path, *, rank: int = 0, device: torch.device | None = None) -> None:
        self.nsys_window = nsys_window
        self.torch_window = torch_window
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.on_cuda = device is not None and torch.device(device).type == "cuda"
        self._nsys_active = False
        self._torch_prof = None
        self.trace_path: Path | None = None

    def before_step(self, step: int) -> None:
        if self.nsys_window and step == self.nsys_window[0] and self.on_cuda:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            self._nsys_active = True
        if self.torch_window and step == self.torch_window[0] and self._torch_prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.on_cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch_prof = torch.profiler.profile(activities=activities, record_shapes=False)
            self._torch_prof.__enter__()

    def after_step(self, step: int) -> None:
        if self._nsys_active and step + 1 >= self.nsys_window[1]:
            self._stop_nsys()
        if self._torch_prof is not None:
            self._torch_prof.step()
            if step + 1 >= self.torch_window[1]:
                self._stop_torch()

    def close(self) -> None:
        if self._nsys_active:
            self._stop_nsys()
        if self._torch_prof is not None:
            self._stop_torch()

    def _stop_nsys(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        self._nsys_active = False

    def _stop_torch(self) -> None:
        prof, self._torch_prof = self._torch_prof, None
        prof.__exit__(None, None, None)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.run_dir / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(self.trace_path))
