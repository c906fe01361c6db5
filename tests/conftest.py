"""Shared test set-up: CPU-friendly defaults and the `gpu` marker."""

import os
import signal

# OpenMP threads that spin while waiting make tiny CPU ops 30-100x slower when the cores are shared
# (loader workers, forked ranks, other jobs); it must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton kernels run in the interpreter when there is no GPU. Triton reads this when a kernel is
# decorated, so it must be set before any test imports fastmeal.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(min(2, os.cpu_count() or 1))

# A job started with `&` by a non-interactive shell (a CI runner, `nohup`, a script) inherits SIGINT as
# ignored, and Python then leaves it ignored: Ctrl-C would do nothing in this process and in every
# `fastmeal` the tests start (an ignored signal stays ignored across fork and exec). The Ctrl-C tests
# are about a terminal's Ctrl-C, so give this process the handler an interactive start has; its
# children then start with SIGINT at its default, as they would from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _dali_available() -> bool:
    # fastmeal.data.dali_available's check, without importing fastmeal: a broken package must not stop the
    # collection of every test file (the GPU suite runs them all, and reports each file that fails to import).
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


# `pytest -m gpu` (benchmarks/device_suite.sh, under a time limit on a GPU machine lent for minutes) runs these files
# first, in this order: the tests whose failure would change what we ship (the default configuration's compiled
# step, host syncs, the loss kernels, the teachers' CUDA graphs, the trainer); the rest follow in their usual order.
GPU_FIRST = ("test_gpu_default_config.py", "test_host_syncs.py", "test_ensemble_kd.py", "test_topk_soft_ce.py",
             "test_teachers.py", "test_trainer.py")


def _end_session_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    if config.option.markexpr == "gpu":
        # The suite's step limit sends SIGTERM (then SIGKILL 5 s later): end the session as Ctrl-C does, so that
        # pytest still prints which tests ran and writes its JUnit XML.
        signal.signal(signal.SIGTERM, _end_session_on_sigterm)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run benchmarks/device_suite.sh on a GPU machine)")
    # The GPU machine starts without DALI (it travels there in parts): its tests skip, they do not fail.
    skip_dali = pytest.mark.skip(reason="needs DALI (pip install nvidia-dali-cuda120; on the GPU machine, stage it)")
    has_cuda, has_dali = torch.cuda.is_available(), _dali_available()
    for item in items:
        # get_closest_marker, not `"gpu" in item.keywords`: keywords also hold the names of the folders above the
        # test, so a checkout in a folder called gpu (or dali) would skip every test.
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("dali") and not has_dali:
            item.add_marker(skip_dali)
    if config.option.markexpr == "gpu":
        rank = {name: i for i, name in enumerate(GPU_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(GPU_FIRST)))  # stable: each file keeps its order
