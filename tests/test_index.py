"""The dataset index: header sizes equal the decoded sizes, the cache is used, keyed and rebuilt on change."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from fastmeal.data import index as index_module
from fastmeal.data.common import DataError, scan_split
from fastmeal.data.index import build_index, cache_path, read_image_sizes


def _dataset(root):
    rng = np.random.default_rng(0)
    for label in range(3):
        folder = root / "train" / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(4):
            h, w = rng.integers(20, 70, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")
    Image.new("L", (31, 17)).save(root / "train" / "c0" / "gray.png")  # a PNG: its IHDR gives the size
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation "rotate 90": the stored size counts, as PIL's decode and DALI's give it
    Image.new("RGB", (40, 24)).save(root / "train" / "c1" / "rotated.JPEG", exif=exif)
    (root / "train" / "c2" / "empty.JPEG").write_bytes(b"")
    return root


def _decoded_size(path):
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            return img.height, img.width
    except OSError:
        return 0, 0


def test_index_holds_imagefolder_order_labels_and_decoded_sizes(tmp_path, caplog):
    root = _dataset(tmp_path)
    with caplog.at_level(logging.INFO):
        index = build_index(root / "train", workers=1, progress=False)
    split = scan_split(root, "train")
    assert index.paths == tuple(split.paths) and index.labels.tolist() == split.labels and len(index) == 15
    assert index.classes == split.classes and index.labels.dtype == np.int64 and index.heights.dtype == np.int32
    sizes = [_decoded_size(p) for p in index.paths]
    assert list(zip(index.heights.tolist(), index.widths.tolist(), strict=True)) == sizes
    assert [index.paths[i].rsplit("/", 1)[1] for i in index.unreadable] == ["empty.JPEG"]
    assert "per 10k files" in caplog.text and "no readable image header" in caplog.text
    assert cache_path(root / "train") == tmp_path / ".fastmeal-index" / "train.npz"


def test_cache_is_used_then_rebuilt_when_a_file_changes(tmp_path, monkeypatch, caplog):
    root = _dataset(tmp_path)
    first = build_index(root / "train", progress=False)
    monkeypatch.setattr(index_module, "read_image_sizes", lambda *a, **k: pytest.fail("the cache was not used"))
    again = build_index(root / "train", progress=False)
    assert again.digest == first.digest and np.array_equal(again.heights, first.heights)
    monkeypatch.undo()
    changed = root / "train" / "c0" / "1.JPEG"
    Image.new("RGB", (50, 60)).save(changed)
    os.utime(changed, ns=(1, 10**18))  # a new mtime even on a coarse clock
    with caplog.at_level(logging.WARNING):
        rebuilt = build_index(root / "train", progress=False)
    assert "the dataset changed" in caplog.text
    k = rebuilt.paths.index(str(changed))
    assert (rebuilt.heights[k], rebuilt.widths[k]) == (60, 50) and rebuilt.digest != first.digest


def test_cache_falls_back_to_the_user_cache_and_survives_a_damaged_file(tmp_path, monkeypatch, caplog):
    root = _dataset(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(index_module, "_writable_dir", lambda path: False)  # a read-only dataset
    where = cache_path(root / "train")
    assert where.parent == tmp_path / "cache" / "fastmeal" / "index"
    index = build_index(root / "train", progress=False)
    assert where.is_file()
    where.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING):
        assert build_index(root / "train", progress=False).digest == index.digest
    assert "unreadable" in caplog.text


def test_parallel_header_reads_equal_serial_ones(tmp_path, monkeypatch):
    root = _dataset(tmp_path)
    paths = scan_split(root, "train").paths
    monkeypatch.setattr(index_module, "_PARALLEL_FROM", 1)
    monkeypatch.setattr(index_module, "_CHUNK", 4)
    parallel = read_image_sizes(paths, workers=2, progress=False)
    serial = read_image_sizes(paths, workers=1, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(parallel, serial, strict=True))


def test_a_folder_that_is_no_split_is_refused(tmp_path):
    with pytest.raises(DataError, match="named train or val"):
        build_index(tmp_path / "images")
    with pytest.raises(DataError, match="missing"):
        build_index(tmp_path / "train")


def test_digest_survives_a_copy_and_a_touch_but_not_a_content_change(tmp_path):
    """The dataset identity a bank stores: relative paths, labels, sizes, image sizes; never mtimes or the root."""
    import shutil

    from fastmeal.data.index import describe_differences, identity_table

    root = _dataset(tmp_path / "a")
    first = build_index(root / "train", progress=False)
    copy = tmp_path / "b" / "data"  # a copy without the mtimes (cp -r), elsewhere
    shutil.copytree(root, copy, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns(".fastmeal-index"))
    os.utime(copy / "train" / "c0" / "1.JPEG", ns=(1, 10**18))
    copied = build_index(copy / "train", progress=False)
    assert copied.digest == first.digest and copied.cache_digest != first.cache_digest
    Image.new("RGB", (50, 60)).save(copy / "train" / "c0" / "1.JPEG")
    changed = build_index(copy / "train", progress=False)
    assert changed.digest != first.digest
    diff = describe_differences(identity_table(first), identity_table(changed))
    assert len(diff) == 1 and diff[0].startswith("c0/1.JPEG: size ") and diff[0].endswith("-> 50x60")
