"""No hidden host syncs: fetching the next batch and launching a step return while the GPU is still busy.

A copy from pageable memory with ``non_blocking=True`` may synchronise with the stream; if the loader's
label copy (or anything in the step) did, the host would wait for the previous step's backward and
optimiser, and the GPU would idle while the next step is launched. The GPU tests queue about half a
second of GPU work (``torch.cuda._sleep``), then time the host side of the call: it must return well
before the queued work ends, and the stream must still be busy when it does (so the window was real).
The CPU tests run everything around them (the same runs, loaders and steps) where CUDA is absent.
"""

from __future__ import annotations

import time

import pytest
import torch
from gpu_runs import MODES, batches, build_bank_for, make_files, mode_trainer, step_batch

from fastmeal.data import build_loader
from fastmeal.data.common import host_to_device

QUEUED_S = 0.5  # GPU work queued ahead of the timed call
RETURN_BY_S = 0.2  # the host call must return within this (well before the queued work ends)
BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.dali)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("syncs"))


@pytest.fixture(scope="module")
def sleep_cycles():
    """``torch.cuda._sleep`` cycles for about ``QUEUED_S`` of GPU time on this GPU (its clock, measured)."""
    cycles = 50_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # warm-up: the first launch pays the module load
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return int(cycles * QUEUED_S / (start.elapsed_time(end) / 1000))


def _host_seconds_while_busy(sleep_cycles: int, call) -> tuple[float, bool]:
    """``(host seconds of call(), whether the stream was still busy when it returned)``, after queueing work."""
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    return seconds, busy


def test_host_to_device_on_the_cpu_is_a_copy_of_the_values():
    host = torch.arange(7, dtype=torch.int64)
    out = host_to_device(host, torch.device("cpu"))
    assert torch.equal(out, torch.arange(7)) and out.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_labels_are_the_images_labels_on_the_cpu(files, backend, tmp_path):
    """The loaders' CPU path around the GPU fetch test: batches of the configured size with labels in range."""
    from gpu_runs import default_config

    cfg = default_config(files, tmp_path / "run", "cpu", **{"data.backend": backend})
    loader = build_loader(cfg, "train", device=torch.device("cpu"))
    images, labels = next(iter(loader))
    assert images.shape[0] == labels.shape[0] == cfg.data.batch_size and labels.dtype == torch.int64
    assert ((labels >= 0) & (labels < cfg.model.num_classes)).all()


@pytest.mark.parametrize("mode", MODES)
def test_whole_steps_of_each_mode_on_the_cpu(files, tmp_path, mode):
    """What the GPU step test times, run on the CPU: fetch the next batch, step, for both modes."""
    bank = build_bank_for(files, tmp_path / "bank", "cpu") if mode == "bank" else None
    trainer = mode_trainer(files, tmp_path / "run", "cpu", mode, bank)
    stream = batches(trainer)
    for _ in range(2):
        batch = next(stream)
        assert ("probs" in step_batch(batch).targets) == (mode == "bank")
        out = trainer.train_step(step_batch(batch))
        assert torch.isfinite(out["loss"])


@pytest.mark.gpu
def test_gpu_pinned_label_copy_returns_before_queued_work(sleep_cycles):
    host = torch.arange(256, dtype=torch.int64)
    seconds, busy = _host_seconds_while_busy(sleep_cycles, lambda: host_to_device(host, torch.device("cuda")))
    assert busy and seconds < RETURN_BY_S, f"host_to_device took {seconds:.3f}s with {QUEUED_S}s queued"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_next_batch_returns_before_queued_work(files, tmp_path, backend, sleep_cycles):
    from gpu_runs import default_config

    cfg = default_config(files, tmp_path / "run", "cuda", **{"data.backend": backend})
    batches_ = iter(build_loader(cfg, "train", device=torch.device("cuda")))
    next(batches_)  # the first batch starts the pipeline / workers
    seconds, busy = _host_seconds_while_busy(sleep_cycles, lambda: next(batches_))
    assert busy and seconds < RETURN_BY_S, f"next(loader) took {seconds:.3f}s with {QUEUED_S}s of GPU work queued"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_whole_step_returns_before_queued_work(files, tmp_path, mode, sleep_cycles):
    """The default config's step (compiled, AMP, Triton loss): fetching and launching make no host sync."""
    torch._dynamo.reset()
    bank = build_bank_for(files, tmp_path / "bank", "cuda") if mode == "bank" else None
    trainer = mode_trainer(files, tmp_path / "run", "cuda", mode, bank)
    stream = batches(trainer)
    for _ in range(3):  # compile, capture and autotune happen here, not in the timed step
        trainer.train_step(step_batch(next(stream)))
    assert trainer.compiled, getattr(trainer, "compile_failure", None) or "the compiled step fell back to eager"
    fetch, busy_after_fetch = _host_seconds_while_busy(sleep_cycles, lambda: next(stream))
    batch = next(stream)
    step, busy_after_step = _host_seconds_while_busy(sleep_cycles, lambda: trainer.train_step(step_batch(batch)))
    assert busy_after_fetch and fetch < RETURN_BY_S, f"fetching the next batch took {fetch:.3f}s"
    assert busy_after_step and step < RETURN_BY_S, f"launching the step took {step:.3f}s"
