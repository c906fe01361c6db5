"""Loader interface tests (CPU): shapes, dtypes, memory format, labels, errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from fastmeal.config import demo
from fastmeal.data import DataError, build_loader
from fastmeal.data.common import scan_split


def _write_dataset(root, *, classes=3, train=6, val=3, size=(72, 90)):
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"n{c:03d}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(d / f"img_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("tiny"))


def _cfg(root, **over):
    return demo().replace({"data.root": str(root), "data.backend": "torchvision", "data.batch_size": 4,
                           "data.workers": 0, **over})


def test_scan_matches_imagefolder(tiny_root):
    split = scan_split(tiny_root, "train")
    ref = ImageFolder(str(tiny_root / "train"))
    assert list(split.samples) == ref.samples
    assert list(split.classes) == ref.classes


@pytest.mark.parametrize("split", ["train", "val"])
def test_torchvision_batches(tiny_root, split):
    loader = build_loader(_cfg(tiny_root), split)
    seen = 0
    for images, labels in loader:
        assert images.shape[1:] == (3, 64, 64) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64
        seen += len(labels)
    assert seen == loader.num_samples == loader.dataset_size


def test_missing_split(tmp_path):
    with pytest.raises(DataError, match="val"):
        scan_split(_write_dataset(tmp_path, val=0), "val")
