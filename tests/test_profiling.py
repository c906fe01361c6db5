"""The phase helper (a no-op without CUDA) and the torch.profiler step window."""

import json

import torch

from fastmeal.profiling import ProfileWindows, phase


def test_phase_is_transparent_on_cpu():
    with phase("teachers"):
        y = torch.ones(3) * 2
    assert y.sum().item() == 6
    with phase("loss", enabled=False):
        pass


def test_phase_reraises_inside_the_block():
    try:
        with phase("data"):
            raise KeyError("boom")
    except KeyError as err:
        assert "boom" in str(err)
    else:
        raise AssertionError("the exception was swallowed")


def test_torch_profiler_window_writes_a_trace(tmp_path):
    windows = ProfileWindows(None, (2, 4), tmp_path, rank=0, device=torch.device("cpu"))
    x = torch.randn(32, 32)
    for step in range(6):
        windows.before_step(step)
        with torch.profiler.record_function(f"step{step}"):
            x = (x @ x).tanh()
        windows.after_step(step)
    windows.close()
    assert windows.trace_path == tmp_path / "trace_rank0.json"
    trace = json.loads(windows.trace_path.read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"step2", "step3"} <= names  # the window's steps were recorded ...
    assert not names & {"step0", "step1", "step4", "step5"}  # ... and only those


def test_window_left_open_is_closed_on_exit(tmp_path):
    windows = ProfileWindows(None, (0, 100), tmp_path, device=torch.device("cpu"))
    windows.before_step(0)
    torch.randn(4).sum()
    windows.after_step(0)
    windows.close()
    assert windows.trace_path is not None and windows.trace_path.exists()


def test_nsys_window_is_ignored_on_cpu(tmp_path):
    windows = ProfileWindows((0, 2), None, tmp_path, device=torch.device("cpu"))
    for step in range(3):
        windows.before_step(step)
        windows.after_step(step)
    windows.close()
    assert windows.trace_path is None
