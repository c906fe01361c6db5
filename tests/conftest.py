"""Shared test set-up: CPU-friendly defaults and the `gpu` marker."""

import os

import pytest
import torch

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
