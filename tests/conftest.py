"""Shared test set-up: CPU-friendly defaults and the `gpu` marker."""

import os

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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run benchmarks/device_suite.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
