"""The phase helper (a no-op without CUDA), the profiler step windows, and a real run's trace."""

import collections
import csv
import json

import pytest
import torch
from gloo_world import run_world
from tiny import cli_train_args, cli_worker, jpeg_dataset, teacher_files

from fastmeal.profiling import ProfileWindows, phase

STEP_PHASES = ("data", "teachers", "student_fwd", "loss", "backward", "optimizer")


def test_phase_is_transparent_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    with phase("teachers"):
        calls.append("body")
    assert calls == ["body"]  # without CUDA: no NVTX range
    with phase("loss", enabled=True):
        calls.append("body")
    assert calls == ["body", ("push", "loss"), "body", ("pop",)]  # asked for: one range around the block
    # While torch.profiler records, the phase is a named range of the trace on any device.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, phase("student_fwd"):
        torch.ones(3).mul(2)
    assert "student_fwd" in {e.name for e in prof.events()}


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


def _user_ranges(trace_path) -> collections.Counter:
    events = json.loads(trace_path.read_text())["traceEvents"]
    return collections.Counter(e["name"] for e in events if e.get("cat") == "user_annotation")


def test_phase_is_a_torch_profiler_range_only_while_recording(tmp_path):
    with phase("teachers", enabled=False):  # outside a recording: nothing to see, nothing recorded
        torch.ones(2).sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with phase("teachers", enabled=False):
            with phase("loss", enabled=False):
                torch.ones(2).sum()
    prof.export_chrome_trace(str(tmp_path / "t.json"))
    assert _user_ranges(tmp_path / "t.json") == {"teachers": 1, "loss": 1}


def test_window_opens_at_the_first_step_inside_it_once(tmp_path):
    windows = ProfileWindows(None, (2, 5), tmp_path, device=torch.device("cpu"))
    for step in range(3, 8):  # a run resumed at step 3, past the window's start
        windows.before_step(step)
        with torch.profiler.record_function(f"step{step}"):
            torch.ones(2).sum()
        windows.after_step(step)
    windows.close()
    names = _user_ranges(windows.trace_path)
    assert names == {"step3": 1, "step4": 1}


def test_training_run_writes_a_torch_profiler_trace_of_its_window(tmp_path):
    """``fastmeal train --set profile.torch_steps=2:4``: the default hooks record steps 2 and 3."""
    data = jpeg_dataset(tmp_path / "data", train_per_class=4, val_per_class=3)  # 12 train: 3 steps per epoch
    run_dir = tmp_path / "run"
    args = cli_train_args(data, teacher_files(tmp_path / "weights"), run_dir, "schedule.epochs=2",
                          "profile.torch_steps=2:4", "profile.nsys_steps=0:1")  # nsys: CUDA only, ignored here
    rc, stdout = run_world(cli_worker, 1, args, timeout=240)[0]
    assert rc == 0 and json.loads(stdout)["global_step"] == 6
    names = _user_ranges(run_dir / "trace_rank0.json")
    # Every phase of a step once per recorded step (steps 2 and 3), nothing from the other four ...
    assert {p: names[p] for p in STEP_PHASES} == dict.fromkeys(STEP_PHASES, 2)
    # ... and epoch 0's evaluation, which ran between them: 9 val images, eval batch 4 → 3 batches.
    assert names["eval"] == 3


def test_phase_pushes_and_pops_one_nvtx_range_when_enabled(monkeypatch):
    """The CUDA path's logic, with the NVTX calls recorded instead of sent (the GPU suite runs the real ones)."""
    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)))
    with phase("backward", enabled=True):
        with phase("optimizer", enabled=True):
            calls.append("body")
    with pytest.raises(KeyError), phase("data", enabled=True):
        raise KeyError("the range is closed on the way out")
    assert calls == [("push", "backward"), ("push", "optimizer"), "body", ("pop",), ("pop",),
                     ("push", "data"), ("pop",)]


@pytest.mark.gpu
def test_profile_windows_on_cuda_bracket_the_steps_and_trace_kernels(tmp_path):
    device = torch.device("cuda")
    windows = ProfileWindows((1, 3), (1, 3), tmp_path, device=device)
    x = torch.randn(256, 256, device=device)
    for step in range(5):
        windows.before_step(step)
        assert windows._nsys_active == (1 <= step < 3)  # cudaProfilerStart ran (and did not fail) for the window
        with phase("teachers"):
            x = (x @ x).tanh()
        windows.after_step(step)
    windows.close()
    events = json.loads(windows.trace_path.read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)  # CUDA activity was recorded
    assert _user_ranges(windows.trace_path)["teachers"] == 2


@pytest.mark.gpu
def test_nsys_capture_range_records_only_the_window(tmp_path):
    """``nsys profile --capture-range=cudaProfilerApi`` on ``fastmeal train --set profile.nsys_steps=2:4``."""
    import shutil
    import subprocess
    import sys

    nsys = shutil.which("nsys")
    if nsys is None:
        pytest.skip("nsys (Nsight Systems CLI) is not on PATH; the cudaProfilerApi capture is not checked")
    data = jpeg_dataset(tmp_path / "data", train_per_class=8, val_per_class=3)  # 24 train: 6 steps per epoch
    args = cli_train_args(data, teacher_files(tmp_path / "weights"), tmp_path / "run", "schedule.epochs=1",
                          "runtime.device=cuda", "profile.nsys_steps=2:4")
    report = tmp_path / "capture"
    subprocess.run([nsys, "profile", "--capture-range=cudaProfilerApi", "--capture-range-end=stop", "-t", "cuda,nvtx",
                    "-o", str(report), sys.executable, "-m", "fastmeal", *args], check=True, timeout=600)
    stats = subprocess.run([nsys, "stats", "--report", "nvtx_sum", "--format", "csv", f"{report}.nsys-rep"],
                           check=True, capture_output=True, text=True, timeout=300).stdout
    counts = {}
    for row in csv.DictReader(line for line in stats.splitlines() if line.count(",") > 3):
        counts[row["Range"].lstrip(":")] = int(row["Instances"])
    # Only steps 2 and 3 were captured: each step phase twice.
    assert {p: counts.get(p) for p in STEP_PHASES} == dict.fromkeys(STEP_PHASES, 2), stats
