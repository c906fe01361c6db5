"""The loader interface on both backends (CPU): contract, order, shards, odd and bad files, errors.

DALI runs CPU-only here (``device_id=None``): the same graph the GPU builds with ``mixed`` decoding.
Images are tiny (≤ 112 px, crops of 32 px) so that the whole file runs in seconds.
"""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from fastmeal.config import demo
from fastmeal.data import DataError, Loader, build_loader, choose_backend, dali_available
from fastmeal.data import common as data_common
from fastmeal.data.common import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, images_dtype, scan_split

BACKENDS = ["torchvision", pytest.param("dali", marks=pytest.mark.dali)]
CROP = 32
# One 8-bit level in normalised units is 1 / (255·std) = 0.0171–0.0175; the backends' val outputs agree
# to within one level (test_data_backends.py explains why), so allow one level at the largest.
LEVEL_TOLERANCE = 1 / (255 * min(IMAGENET_STD)) + 1e-5


def _colour(i: int) -> tuple[int, int, int]:
    """A distinct, well separated RGB colour per index (< 64 of them), away from 0 and 255."""
    return (40 + 50 * (i % 4), 40 + 50 * (i // 4 % 4), 40 + 50 * (i // 16 % 4))


def _write_solid(root, split, label, name, size=(40, 52), mode="RGB", **save):
    """A solid-colour image of class ``label``'s colour, so a crop's mean colour identifies its class."""
    folder = root / split / f"n{label:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size[::-1], _colour(label))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(folder / name, **({"format": "JPEG", "quality": 95} | save))
    return folder / name


def _solid_dataset(root, *, classes=3, train=5, val=3):
    for label in range(classes):
        for i in range(train):
            _write_solid(root, "train", label, f"img_{i}.JPEG", size=(40 + 3 * i, 52))
        for i in range(val):
            _write_solid(root, "val", label, f"img_{i}.JPEG", size=(44, 38 + 5 * i))
    return root


@pytest.fixture(scope="module")
def solid_root(tmp_path_factory):
    return _solid_dataset(tmp_path_factory.mktemp("solid"))


@pytest.fixture(scope="module")
def id_root(tmp_path_factory):
    """20 classes of one image each: a label identifies its sample (order and shard tests)."""
    root = tmp_path_factory.mktemp("ids")
    for label in range(20):
        _write_solid(root, "train", label, "a.JPEG")
        _write_solid(root, "val", label, "a.JPEG")
    return root


def _cfg(root, backend, **over):
    values = {"data.root": str(root), "data.backend": backend, "data.batch_size": 4, "data.workers": 1,
              "data.image_size": CROP}
    values.update({k: v for k, v in over.items()})
    return demo().replace(values)


def _labels_of_images(images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The class whose colour is nearest to each image's mean colour (images [B,3,S,S] normalised)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3), torch.tensor(IMAGENET_STD).view(1, 3)
    rgb = images.float().mean(dim=(2, 3)) * std * 255 + mean * 255  # [B, 3]
    palette = torch.tensor([_colour(c) for c in range(num_classes)], dtype=torch.float32)  # [C, 3]
    return torch.cdist(rgb, palette).argmin(dim=1)


def _epoch(loader) -> tuple[list[torch.Tensor], list[int]]:
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels += y.tolist()
    return images, labels


# -- the dataset scan ---------------------------------------------------------------------------


def test_scan_is_imagefolder(solid_root):
    split = scan_split(solid_root, "train")
    reference = ImageFolder(str(solid_root / "train"))
    assert list(split.samples) == reference.samples
    assert list(split.classes) == reference.classes


def test_scan_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="data.root is empty"):
        scan_split("", "train")
    with pytest.raises(DataError, match="does not exist"):
        scan_split(tmp_path / "nowhere", "train")
    _solid_dataset(tmp_path, classes=2, train=1, val=0)
    with pytest.raises(DataError, match=f"{tmp_path / 'val'} is missing"):
        scan_split(tmp_path, "val")
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'val'} is empty"):
        scan_split(tmp_path, "val")
    (tmp_path / "train" / "n007").mkdir()
    (tmp_path / "train" / "n007" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="n007"):
        scan_split(tmp_path, "train")


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_loader_missing_split_is_a_clear_error(tmp_path, backend):
    _solid_dataset(tmp_path, classes=2, train=1, val=0)
    with pytest.raises(DataError, match="val is missing"):
        build_loader(_cfg(tmp_path, backend), "val")


# -- choices ----------------------------------------------------------------------------------


def test_images_dtype_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    cfg = demo().replace({"precision.mode": "amp", "teacher_engine.dtype": "fp16"})
    assert images_dtype(cfg, cpu) == torch.float32
    assert images_dtype(cfg, cuda) == torch.float16
    assert images_dtype(cfg.replace({"teacher_engine.dtype": "bf16"}), cuda) == torch.bfloat16
    assert images_dtype(cfg.replace({"precision.mode": "fp32"}), cuda) == torch.float32


def test_backend_choice(monkeypatch, caplog, solid_root):
    # CI runs this file with DALI installed and once with it unimportable (.ci/no_dali): auto follows it.
    chosen = "dali" if dali_available() else "torchvision"
    assert choose_backend("torchvision") == "torchvision"
    assert choose_backend("auto") == chosen
    monkeypatch.setattr("fastmeal.data._announced", set())  # said once per process: maybe said before this test
    with caplog.at_level(logging.INFO, logger="fastmeal.data"):
        loader = build_loader(_cfg(solid_root, "auto"), "val")
    assert loader.backend == chosen and f"chose {chosen}" in caplog.text
    monkeypatch.setattr("fastmeal.data.dali_available", lambda: False)
    assert choose_backend("auto") == "torchvision"
    with pytest.raises(DataError, match="pip install nvidia-dali-cuda120"):
        choose_backend("dali")


# -- the batch contract ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_batch_contract(solid_root, backend, split):
    loader = build_loader(_cfg(solid_root, backend), split)
    assert isinstance(loader, Loader) and loader.backend == backend
    assert loader.classes == ("n000", "n001", "n002") and loader.num_classes == 3
    assert loader.dataset_size == (15 if split == "train" else 9) == loader.num_samples
    images, labels = _epoch(loader)
    assert len(images) == len(loader) == -(-loader.num_samples // 4)
    assert [len(x) for x in images] == [4] * (len(images) - 1) + [loader.num_samples - 4 * (len(images) - 1)]
    for x in images:
        assert x.shape[1:] == (3, CROP, CROP) and x.dtype == torch.float32
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert sorted(labels) == sorted(scan_split(solid_root, split).labels)  # every sample once
    # Labels belong to their images: each solid image's colour names its class.
    assert _labels_of_images(torch.cat(images), 3).tolist() == labels
    assert loader.num_skipped == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_last(solid_root, backend):
    loader = build_loader(_cfg(solid_root, backend, **{"data.last_batch": "drop"}), "train")
    images, labels = _epoch(loader)
    assert len(loader) == len(images) == 3 and loader.num_samples == len(labels) == 12
    assert all(len(x) == 4 for x in images)
    with pytest.raises(DataError, match="no full batch of 16"):
        build_loader(_cfg(solid_root, backend, **{"data.last_batch": "drop", "data.batch_size": 16}), "train")


@pytest.mark.dali
def test_global_batch_is_split_over_ranks(solid_root):
    loader = build_loader(_cfg(solid_root, "dali", **{"data.batch_size": 8}), "train", rank=1, world_size=2)
    assert loader.num_samples == 8 and len(loader) == 2  # 4 per rank; ceil(15 / 2) samples
    with pytest.raises(ValueError, match="not divisible"):
        build_loader(_cfg(solid_root, "dali", **{"data.batch_size": 6}), "train", rank=0, world_size=4)


# -- order, epochs and shards -----------------------------------------------------------------------


@pytest.mark.dali
def test_order_is_a_function_of_seed_and_epoch_on_both_backends(id_root):
    orders = {}
    for backend in ("torchvision", "dali"):
        loader = build_loader(_cfg(id_root, backend), "train")
        first = _epoch(loader)[1]
        second = _epoch(loader)[1]  # the next pass is epoch 1 without set_epoch
        fresh = build_loader(_cfg(id_root, backend), "train")
        fresh.set_epoch(1)  # a resumed run at epoch 1
        assert _epoch(fresh)[1] == second
        assert sorted(first) == sorted(second) == list(range(20)) and first != second
        reseeded = build_loader(_cfg(id_root, backend, **{"runtime.seed": 1}), "train")
        assert _epoch(reseeded)[1] != first
        orders[backend] = first
    # Both backends use the reference's sampler, so they read the same samples in the same order.
    assert orders["dali"] == orders["torchvision"]


@pytest.mark.dali
def test_dali_abandoned_pass_and_epoch_jumps(id_root):
    loader = build_loader(_cfg(id_root, "dali"), "train")
    reference = build_loader(_cfg(id_root, "dali"), "train")
    expected = [_epoch(reference)[1] for _ in range(4)]  # epochs 0..3
    batches = iter(loader)
    next(batches)  # abandon epoch 0 after one batch (runtime.max_steps_per_epoch)
    del batches
    assert _epoch(loader)[1] == expected[1]  # the next pass is a whole epoch 1, no leftovers
    loader.set_epoch(3)
    assert _epoch(loader)[1] == expected[3]
    loader.set_epoch(2)
    assert _epoch(loader)[1] == expected[2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_partition_the_dataset(id_root, backend):
    world = 3
    train = []
    for rank in range(world):
        loader = build_loader(_cfg(id_root, backend, **{"data.batch_size": 12}), "train", rank=rank, world_size=world)
        labels = _epoch(loader)[1]
        assert len(labels) == loader.num_samples == 7  # ceil(20 / 3): DistributedSampler pads to equal shards
        assert len(loader) == 2  # 4 per rank and batch; the same count on every rank (no DDP hang)
        train.append(labels)
    every = [label for labels in train for label in labels]
    assert sorted(set(every)) == list(range(20)) and len(every) == 21  # the one padded sample is a repeat
    assert sum(len(set(a) & set(b)) for i, a in enumerate(train) for b in train[i + 1:]) <= 1
    val = []
    for rank in range(world):
        loader = build_loader(_cfg(id_root, backend, **{"data.eval_batch_size": 6}), "val", rank=rank,
                              world_size=world)
        labels = _epoch(loader)[1]
        assert len(labels) == loader.num_samples
        val.append(labels)
    every = [label for labels in val for label in labels]
    assert sorted(every) == list(range(20))  # eval: every sample exactly once over the ranks, no padding


@pytest.mark.dali
def test_torchvision_workers_with_a_live_dali_pipeline(solid_root, caplog):
    """Forking while DALI threads run deadlocks; the workers then come from a forkserver instead."""
    dali = build_loader(_cfg(solid_root, "dali"), "val")
    expected = _epoch(dali)[1]
    with caplog.at_level(logging.WARNING):
        reference = build_loader(_cfg(solid_root, "torchvision", **{"data.workers": 1}), "val")
        assert _epoch(reference)[1] == sorted(expected)
    assert "forkserver" in caplog.text


def test_a_ctrl_c_while_the_workers_start_leaves_a_closable_iterator_and_no_traceback(solid_root, monkeypatch):
    """Ctrl-C as the epoch's workers start, taken by another of the rank's threads (pin memory, logging).

    It used to raise inside DataLoader's iterator ``__init__``: an iterator without ``_workers``, whose
    ``__del__`` printed "Exception ignored ... AttributeError" at exit. Now it is only recorded as a stop
    request (fastmeal.lifecycle), the batch comes, and closing the loaders ends the workers.
    """
    import gc
    import multiprocessing
    import signal
    import sys
    import threading
    import time

    from torch.utils.data import dataloader

    from fastmeal import lifecycle

    init = dataloader._MultiProcessingDataLoaderIter.__init__

    def interrupted_init(self, loader):
        os.kill(os.getpid(), signal.SIGINT)  # the kernel hands it to the helper thread: this one masks it
        time.sleep(0.1)  # Python has had its chance to run the handler here
        init(self, loader)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", interrupted_init)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    other = threading.Event()
    helper = threading.Thread(target=other.wait, args=(30,), daemon=True)
    helper.start()
    loader = build_loader(_cfg(solid_root, "torchvision", **{"data.workers": 2}), "train")
    try:
        with lifecycle.handling_stops():
            images, _ = next(iter(loader))
            assert images.shape[0] == loader.batch_size and lifecycle.stop_requested() == "SIGINT"
    finally:
        other.set()
        helper.join()
        lifecycle.close_loaders()
    gc.collect()
    assert not unraisable, [f"{u.exc_type.__name__}: {u.exc_value}" for u in unraisable]
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children()  # both workers were started and have ended


@pytest.mark.dali
def test_shards_are_the_same_on_both_backends(id_root):
    shards = {}
    for backend in ("torchvision", "dali"):
        shards[backend] = [_epoch(build_loader(_cfg(id_root, backend, **{"data.batch_size": 6}), "train", rank=r,
                                               world_size=3))[1] for r in range(3)]
    assert shards["dali"] == shards["torchvision"]


# -- odd files (ImageNet has them) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory):
    """One solid-colour file per odd kind, each of its own class, in train and val."""
    root = tmp_path_factory.mktemp("odd")
    kinds = {"rgb": ("RGB", {}), "grayscale": ("L", {}), "cmyk": ("CMYK", {}),
             "progressive": ("RGB", {"progressive": True}), "png_as_jpeg": ("RGB", {"format": "PNG"})}
    for label, (mode, save) in enumerate(kinds.values()):
        for split in ("train", "val"):
            _write_solid(root, split, label, "odd.JPEG", size=(48, 60), mode=mode, **save)
    # A CMYK JPEG with black ink (K > 0), as photo agencies write them: PIL's inversion rule matters.
    cmyk = np.zeros((48, 60, 4), dtype=np.uint8)
    cmyk[..., 0], cmyk[..., 1], cmyk[..., 2], cmyk[..., 3] = 30, 120, 200, 60
    for split in ("train", "val"):
        folder = root / split / "n005"
        folder.mkdir()
        Image.fromarray(cmyk, mode="CMYK").save(folder / "odd.JPEG", quality=95)
    return root, len(kinds) + 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_odd_files_decode_to_the_pil_rgb(odd_root, backend, split):
    root, num_classes = odd_root
    loader = build_loader(_cfg(root, backend, **{"data.batch_size": num_classes}), split)
    images, labels = _epoch(loader)
    images = torch.cat(images)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3), torch.tensor(IMAGENET_STD).view(1, 3)
    rgb = images.mean(dim=(2, 3)) * std * 255 + mean * 255
    paths = dict((label, path) for path, label in scan_split(root, split).samples)
    for row, label in zip(rgb, labels, strict=True):
        expected = np.asarray(Image.open(paths[label]).convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
        # A solid image: any crop has the file's colour up to JPEG ringing (< 2 levels), so a wrong
        # colour conversion (a CMYK inversion, a channel swap, gray read as one channel) cannot pass.
        assert np.abs(row.numpy() - expected).max() < 2.0, (paths[label], row, expected)


@pytest.mark.dali
def test_synthetic_oddities_match_pil_on_both_backends(tmp_path):
    """The generator's odd files (grayscale, CMYK, progressive, PNG named .JPEG) through the val pipeline."""
    synthetic = pytest.importorskip("fastmeal.data.synthetic")
    summary = synthetic.synthesize(tmp_path / "synth", num_classes=2, train_per_class=6, val_per_class=1, seed=0,
                                   size_range=(40, 56), oddities=True, progress=False)
    odd = [tmp_path / "synth" / p for kind in ("grayscale", "cmyk", "progressive", "png_as_jpeg")
           for p in summary["oddities"][kind]]
    assert len(odd) == 9
    root = tmp_path / "odd"
    for i, path in enumerate(odd):  # each odd file as its own val class
        (root / "val" / f"c{i}").mkdir(parents=True)
        (root / "val" / f"c{i}" / path.name).write_bytes(path.read_bytes())
    outputs = {}
    for backend in ("torchvision", "dali"):
        loader = build_loader(_cfg(root, backend, **{"data.eval_batch_size": 9}), "val")
        images, labels = _epoch(loader)
        assert labels == list(range(9))
        outputs[backend] = images[0]
        del loader
    # torchvision's output is PIL's decode; DALI's must agree to within the val tolerance (one level).
    assert (outputs["dali"] - outputs["torchvision"]).abs().max() <= LEVEL_TOLERANCE


# -- corrupt files ---------------------------------------------------------------------------------


@pytest.fixture
def corrupt_root(tmp_path):
    root = _solid_dataset(tmp_path, classes=3, train=4, val=2)
    (root / "train" / "n001" / "img_1.JPEG").write_bytes(b"")  # zero bytes
    good = (root / "train" / "n002" / "img_2.JPEG").read_bytes()
    (root / "train" / "n002" / "img_2.JPEG").write_bytes(good[: len(good) // 2])  # truncated
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_file_error_names_it(corrupt_root, backend):
    # Both files have no readable header: the dataset index finds them, so the train loader fails at once.
    with pytest.raises(CorruptImageError, match=r"n00[12]/img_[12]\.JPEG") as info:
        build_loader(_cfg(corrupt_root, backend, **{"data.workers": 0}), "train")
    assert "skip_corrupt" in str(info.value)
    # A file whose header reads but whose data is cut fails when it is decoded.
    good = (corrupt_root / "train" / "n000" / "img_0.JPEG").read_bytes()
    for name in ("n001/img_1.JPEG", "n002/img_2.JPEG"):
        (corrupt_root / "train" / name).write_bytes(good)
    noise = np.random.default_rng(0).integers(0, 256, (40, 52, 3), dtype=np.uint8)
    truncated = corrupt_root / "train" / "n000" / "img_3.JPEG"
    Image.fromarray(noise).save(truncated, quality=95)
    data = truncated.read_bytes()
    # Cut just after the start of scan: every crop window needs rows that are gone. (A file cut lower down
    # still decodes in DALI when the planned window lies above the cut: ROI decoding stops at its last row.)
    truncated.write_bytes(data[:data.index(b"\xff\xda") + 40])
    loader = build_loader(_cfg(corrupt_root, backend, **{"data.workers": 0}), "train")
    with pytest.raises(CorruptImageError, match=r"n000/img_3\.JPEG") as info:
        _epoch(loader)
    assert "skip_corrupt" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_corrupt_keeps_the_epoch_and_counts(corrupt_root, backend, caplog):
    loader = build_loader(_cfg(corrupt_root, backend, **{"data.skip_corrupt": True}), "train")
    bad = {str(corrupt_root / "train" / "n001" / "img_1.JPEG"), str(corrupt_root / "train" / "n002" / "img_2.JPEG")}
    with caplog.at_level(logging.WARNING):
        for epoch in range(2):
            loader.set_epoch(epoch)
            images, labels = _epoch(loader)
            # The epoch keeps its sample count: each bad slot holds the next decodable file instead.
            assert len(labels) == loader.num_samples == 12
            assert _labels_of_images(torch.cat(images), 3).tolist() == labels
    assert loader.num_skipped == 2
    assert all(path in caplog.text for path in bad) and "skipped corrupt image" in caplog.text


def test_next_decodable_rule(corrupt_root):
    paths = scan_split(corrupt_root, "train").paths
    bad: set[str] = set()
    zero = paths.index(str(corrupt_root / "train" / "n001" / "img_1.JPEG"))
    assert data_common.next_decodable(paths, zero, bad) == zero + 1 and paths[zero] in bad
    with pytest.raises(CorruptImageError, match="img_1.JPEG"):
        data_common.load_rgb(paths[zero])


@pytest.mark.dali
def test_dali_unnamed_decoder_error_is_confirmed_with_pil(corrupt_root):
    """DALI's decoder says "sample #k" without a path when the path is not in its message."""
    # The dataset index refuses files without a readable header up front unless skip_corrupt; with it, the
    # substitutes are dropped here so that the decoder-message parsing itself is what is tested.
    loader = build_loader(_cfg(corrupt_root, "dali", **{"data.skip_corrupt": True}), "train")
    loader.substitutes.clear()
    from fastmeal.data.dali import _Batch

    paths = loader.paths
    truncated = paths.index(str(corrupt_root / "train" / "n002" / "img_2.JPEG"))
    loader._inflight.extend([_Batch(0, 0, [0, 1, 2, 3]), _Batch(0, 1, [4, truncated, 5, 6])])
    assert loader._culprit("Failed to decode sample #1 : ") == truncated
    # paths[3] and paths[6] decode with PIL, and so does a message without a name or number: the culprit is then
    # the in-flight file PIL fails on too (how a text file named .JPEG is found: "no identifiable file")
    assert loader._culprit("Failed to decode sample #3 : ") == truncated
    assert loader._culprit("something else") == truncated
    loader._inflight.clear()
    loader._inflight.append(_Batch(0, 0, [0, 1, 2, 3]))
    assert loader._culprit("something else") is None
    assert os.path.basename(paths[truncated]) == "img_2.JPEG"


def test_a_symlink_loop_in_a_split_is_an_error_naming_it(tmp_path):
    """Issue #23 item 6: `ln -s .. train/c000/up` listed the whole split again under class 0, exit 0."""
    import os

    from fastmeal.data.common import DataError, find_symlink_loop, scan_split
    from fastmeal.data.synthetic import synthesize

    root = tmp_path / "d"
    synthesize(root, num_classes=2, train_per_class=2, val_per_class=1, seed=0, size_range=(16, 20), progress=False)
    first = sorted((root / "train").iterdir())[0]
    assert len(scan_split(root, "train")) == 4
    # a link to a folder elsewhere is fine
    (tmp_path / "more").mkdir()
    os.symlink(tmp_path / "more", first / "elsewhere")
    assert find_symlink_loop(root / "train") is None and len(scan_split(root, "train")) == 4
    os.symlink("..", first / "up")
    with pytest.raises(DataError, match=rf"{first / 'up'} is a symbolic link to {root / 'train'}"):
        scan_split(root, "train")
    # a loop through two links (neither points to its own ancestor on disk)
    (first / "up").unlink()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    os.symlink(tmp_path / "b", tmp_path / "a" / "to_b")
    os.symlink(tmp_path / "a", tmp_path / "b" / "to_a")
    os.symlink(tmp_path / "a", first / "a")
    link, target = find_symlink_loop(root / "train")
    assert target in (str(tmp_path / "a"), str(tmp_path / "b"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_corrupt_in_evaluation_drops_and_counts_the_file(tmp_path, backend, caplog):
    """Issue #23 item 7: with data.skip_corrupt=true a corrupt val file's slot held another image, counted twice."""
    root = _solid_dataset(tmp_path, classes=3, train=1, val=3)
    bad = root / "val" / "n001" / "img_1.JPEG"
    good = bad.read_bytes()
    bad.write_bytes(good[:good.index(b"\xff\xda") + 20])  # the header reads, the data is cut
    loader = build_loader(_cfg(root, backend, **{"data.skip_corrupt": True, "data.eval_batch_size": 4}), "val")
    with caplog.at_level(logging.WARNING):
        images, labels = _epoch(loader)
    # 9 files, one unreadable: 8 evaluated, each once, each with its own label (no stand-in, no duplicate)
    assert len(labels) == 8 and loader.num_skipped == 1
    assert sorted(labels) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert _labels_of_images(torch.cat(images), 3).tolist() == labels
    assert str(bad) in caplog.text and "not evaluated" in caplog.text
