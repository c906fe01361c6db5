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
    ``eval``. ``enabled=None`` means: on when CUDA is available. While torch.profiler records
    (``profile.torch_steps``) the block is also a ``record_function`` range, so the trace shows the
    same phases on any device; outside a recording window that costs one flag check.
    """
    if enabled is None:
        enabled = torch.cuda.is_available()
    with contextlib.ExitStack() as ranges:
        if torch.autograd._profiler_enabled():
            ranges.enter_context(torch.profiler.record_function(name))
        if enabled:
            torch.cuda.nvtx.range_push(name)
            ranges.callback(torch.cuda.nvtx.range_pop)
        yield


class ProfileWindows:
    """Step windows for Nsight Systems and torch.profiler (``profile.nsys_steps`` / ``profile.torch_steps``).

    ``nsys_steps A:B`` brackets global steps A..B-1 with cudaProfilerStart/Stop, so that
    ``nsys profile --capture-range=cudaProfilerApi`` records only them. ``torch_steps A:B`` records
    those steps with torch.profiler and writes a Chrome trace to ``run_dir/trace_rank{rank}.json``.
    Call :meth:`before_step` and :meth:`after_step` around every training step and :meth:`close` at
    the end (a window still open then is closed and written). A window opens at the first step inside
    it, so a run resumed past ``A`` (but before ``B``) still records the rest of it; each window
    opens at most once. The nsys window needs CUDA and is ignored elsewhere.
    """

    def __init__(self, nsys_window: tuple[int, int] | None, torch_window: tuple[int, int] | None,
                 run_dir: str | Path, *, rank: int = 0, device: torch.device | None = None) -> None:
        self.nsys_window = nsys_window
        self.torch_window = torch_window
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.on_cuda = device is not None and torch.device(device).type == "cuda"
        self._nsys_active = self._nsys_done = False
        self._torch_prof = None
        self.trace_path: Path | None = None

    def before_step(self, step: int) -> None:
        """Open a window that ``step`` (global, 0-based) is the first step of this run inside."""
        if self.on_cuda and _inside(self.nsys_window, step) and not (self._nsys_active or self._nsys_done):
            # Drain the queue first so that the capture holds only the window's own kernels.
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            self._nsys_active = True
        if _inside(self.torch_window, step) and self._torch_prof is None and self.trace_path is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.on_cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch_prof = torch.profiler.profile(activities=activities, record_shapes=False)
            self._torch_prof.__enter__()

    def after_step(self, step: int) -> None:
        """Close a window whose last step ``step`` was (the trace is written then)."""
        if self._nsys_active and step + 1 >= self.nsys_window[1]:
            self._stop_nsys()
        if self._torch_prof is not None:
            self._torch_prof.step()
            if step + 1 >= self.torch_window[1]:
                self._stop_torch()

    def close(self) -> None:
        """Close and write any window still open (the run ended or stopped inside it)."""
        if self._nsys_active:
            self._stop_nsys()
        if self._torch_prof is not None:
            self._stop_torch()

    def _stop_nsys(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        self._nsys_active, self._nsys_done = False, True

    def _stop_torch(self) -> None:
        prof, self._torch_prof = self._torch_prof, None
        prof.__exit__(None, None, None)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.run_dir / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(self.trace_path))


def _inside(window: tuple[int, int] | None, step: int) -> bool:
    return window is not None and window[0] <= step < window[1]
