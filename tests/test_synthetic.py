"""The synthetic dataset: determinism, ImageFolder layout, ImageNet's odd files, and learnability."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmeal.data.common import DataError
from fastmeal.data.synthetic import (
    MARKER_FILE,
    NUM_TRAIN_ODDITIES,
    ODDITY_KINDS,
    SPLITS,
    _image_rng,
    _write_class,
    class_specs,
    render,
    synthesize,
)

SMALL = dict(num_classes=3, train_per_class=4, val_per_class=2, size_range=(32, 48), progress=False)


def tree_hash(root: Path) -> str:
    """sha256 over the relative paths and bytes of every image file (the marker holds the root path)."""
    digest = hashlib.sha256()
    for path in sorted(p for split in SPLITS for p in (root / split).rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def block_means(image: np.ndarray, block: int = 4) -> np.ndarray:
    """Means over ``block`` x ``block`` tiles of an ``[H, W, C]`` array (edges cropped to whole tiles)."""
    h, w = image.shape[0] // block * block, image.shape[1] // block * block
    return image[:h, :w].reshape(h // block, block, w // block, block, -1).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_odd")
    return root, synthesize(root, seed=0, oddities=True, **SMALL)


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path, odd_dataset):
    root, _ = odd_dataset
    synthesize(tmp_path / "again", seed=0, oddities=True, **SMALL)
    synthesize(tmp_path / "other", seed=1, oddities=True, **SMALL)
    assert tree_hash(tmp_path / "again") == tree_hash(root)
    assert tree_hash(tmp_path / "other") != tree_hash(root)


def test_files_do_not_depend_on_the_order_classes_are_written(tmp_path):
    # What parallel writing changes is the order; every image has its own generator, so bytes must not move.
    synthesize(tmp_path / "serial", seed=3, **SMALL)
    for split, per_class in (("train", 4), ("val", 2)):
        for label in reversed(range(3)):
            _write_class(str(tmp_path / "reversed"), split, label, per_class, 3, 3, SMALL["size_range"], 90, {})
    assert tree_hash(tmp_path / "reversed") == tree_hash(tmp_path / "serial")


def test_files_do_not_depend_on_num_workers(tmp_path):
    synthesize(tmp_path / "serial", seed=3, **SMALL)
    synthesize(tmp_path / "parallel", seed=3, num_workers=2, **SMALL)
    assert tree_hash(tmp_path / "parallel") == tree_hash(tmp_path / "serial")


def test_imagefolder_layout_counts_and_sizes(odd_dataset):
    root, summary = odd_dataset
    lo, hi = SMALL["size_range"]
    assert summary["num_train"] == 3 * 4 and summary["num_val"] == 3 * 2
    for split, per_class in (("train", 4), ("val", 2)):
        folders = sorted(p.name for p in (root / split).iterdir())
        # Folder order is class-index order, so ImageFolder's labels are the class indices.
        assert folders == summary["classes"] == [spec.name for spec in class_specs(3)]
        for index, folder in enumerate(folders):
            assert folder.startswith(f"c{index:03d}_")
            files = sorted((root / split / folder).iterdir())
            assert [f.name for f in files] == [f"c{index:03d}_{k:05d}.JPEG" for k in range(per_class)]
    sizes = [Image.open(p).size for p in root.rglob("*.JPEG")]
    assert all(lo <= min(w, h) <= hi and max(w, h) / min(w, h) <= 1.46 for w, h in sizes)
    assert sum(w != h for w, h in sizes) >= len(sizes) // 2  # ImageNet-like: mostly non-square
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)  # landscape and portrait


def test_imagenet_sized_images(tmp_path):
    summary = synthesize(
        tmp_path, num_classes=2, train_per_class=1, val_per_class=0, seed=0, size_range=(375, 500), progress=False
    )
    assert summary["num_val"] == 0
    for path in tmp_path.rglob("*.JPEG"):
        w, h = Image.open(path).size
        assert 375 <= min(w, h) <= 500 and max(w, h) <= 1.46 * 500


def test_oddities_are_what_they_claim_and_show_their_class_image(odd_dataset):
    root, summary = odd_dataset
    odd = summary["oddities"]
    assert set(odd) == set(ODDITY_KINDS)
    assert {kind: len(odd[kind]) for kind in ODDITY_KINDS} == {
        **NUM_TRAIN_ODDITIES,
        "grayscale": NUM_TRAIN_ODDITIES["grayscale"] + 1,
    }
    assert any(p.startswith("val/") for p in odd["grayscale"])
    specs = class_specs(SMALL["num_classes"])
    for kind, paths in odd.items():
        for rel in paths:
            path = root / rel
            split, folder, name = Path(rel).parts
            label, index = int(folder[1:4]), int(name[5:10])
            expected = render(specs, label, _image_rng(0, split, label, index), SMALL["size_range"])
            img = Image.open(path)
            assert img.size == (expected.shape[1], expected.shape[0])
            if kind == "png_as_jpeg":
                assert path.suffix == ".JPEG" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                assert img.format == "PNG"
                np.testing.assert_array_equal(np.asarray(img), expected)  # lossless
                continue
            assert img.format == "JPEG"
            if kind == "grayscale":
                assert img.mode == "L"
                reference = np.asarray(Image.fromarray(expected).convert("L"), dtype=np.float32)[..., None]
                decoded = np.asarray(img, dtype=np.float32)[..., None]
            else:
                assert img.mode == ("CMYK" if kind == "cmyk" else "RGB")
                reference = expected.astype(np.float32)
                decoded = np.asarray(img.convert("RGB"), dtype=np.float32)
            if kind == "progressive":
                assert img.info.get("progressive") or img.info.get("progression")
            # Compare 4x4 block means: they average out JPEG's (chroma-subsampled) noise on these noisy
            # images. Measured: < 2 levels for the image itself, > 15 for another image of the class.
            assert np.abs(block_means(decoded) - block_means(reference)).mean() < 5.0, (kind, rel)
    # The ordinary files are baseline RGB JPEGs.
    odd_set = {p for paths in odd.values() for p in paths}
    for path in root.rglob("*.JPEG"):
        if path.relative_to(root).as_posix() not in odd_set:
            img = Image.open(path)
            assert (img.format, img.mode) == ("JPEG", "RGB") and "progressive" not in img.info


def test_rewrites_its_own_output_with_force_and_refuses_foreign_folders(tmp_path):
    synthesize(tmp_path / "a", num_classes=4, train_per_class=2, val_per_class=1, seed=0, progress=False)
    summary = synthesize(tmp_path / "a", seed=0, force=True, **SMALL)  # fewer classes: stale folders must go
    assert sorted(p.name for p in (tmp_path / "a" / "train").iterdir()) == summary["classes"]
    assert json.loads((tmp_path / "a" / MARKER_FILE).read_text())["complete"] is True
    (tmp_path / "b" / "train" / "mine").mkdir(parents=True)
    (tmp_path / "b" / "train" / "mine" / "x.JPEG").write_bytes(b"not ours")
    for force in (False, True):
        with pytest.raises(DataError):
            synthesize(tmp_path / "b", seed=0, force=force, **SMALL)
    assert (tmp_path / "b" / "train" / "mine" / "x.JPEG").read_bytes() == b"not ours"


def test_synth_over_a_bigger_synthetic_set_deletes_nothing_without_force(tmp_path):
    """Issue #23 item 5: `data synth d10 --classes 2` over a 10-class set silently removed 8 class folders."""
    root = tmp_path / "d10"
    synthesize(root, num_classes=10, train_per_class=1, val_per_class=1, seed=0, progress=False)
    before = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    with pytest.raises(DataError, match="not empty.*--force"):
        synthesize(root, num_classes=2, train_per_class=1, val_per_class=1, seed=0, progress=False)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == before
    # With --force only the files it wrote go: a file the user added to a class folder stays, with its folder.
    last = root / "train" / class_specs(10)[9].name
    (last / "mine.JPEG").write_bytes(b"user data")
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="did not write"):  # the user's file is in train/: no mixing
        synthesize(root, num_classes=2, train_per_class=1, val_per_class=1, seed=0, progress=False, force=True)
    assert (last / "mine.JPEG").read_bytes() == b"user data"
    (last / "mine.JPEG").unlink()
    synthesize(root, num_classes=2, train_per_class=1, val_per_class=1, seed=0, progress=False, force=True)
    assert (root / "notes.txt").read_text() == "keep me"
    assert len(list((root / "train").iterdir())) == 2


@pytest.mark.parametrize("kwargs,needle", [
    ({"num_classes": 0}, "--classes 0"), ({"train_per_class": -1}, "--train-per-class -1"),
    ({"size_range": (500, 10)}, "--size-range 500 10"),
])
def test_bad_synth_arguments_name_the_option(tmp_path, kwargs, needle):
    args = {"num_classes": 2, "train_per_class": 1, "val_per_class": 1, "seed": 0, "progress": False, **kwargs}
    with pytest.raises(DataError, match=needle):
        synthesize(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("num_classes", [2, 7, 100])
def test_class_specs_are_distinct_and_stable(num_classes):
    specs = class_specs(num_classes)
    assert [s.index for s in specs] == list(range(num_classes))
    assert len({s.name for s in specs}) == num_classes
    assert sorted(s.name for s in specs) == [s.name for s in specs]
    # Parameters depend on the class index only, not on how many classes there are.
    assert [s.fg_hsv for s in specs[:2]] == [s.fg_hsv for s in class_specs(2)]
    # Classes sharing a texture family must differ in colour.
    by_family = {}
    for s in specs:
        by_family.setdefault(s.family, []).append(s.fg_hsv[0])
    for hues in by_family.values():
        assert len(set(np.round(hues, 6))) == len(hues)


def _features(path: Path) -> np.ndarray:
    """Colour statistics and oriented gradient energy of a random-ish central crop: what survives RRC."""
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    h, w, _ = img.shape
    img = img[h // 6 : h - h // 6, w // 6 : w - w // 6]
    gray = img.mean(axis=2)
    gx, gy = np.abs(np.diff(gray, axis=1)).mean(), np.abs(np.diff(gray, axis=0)).mean()
    return np.concatenate([img.mean(axis=(0, 1)), img.std(axis=(0, 1)), [gx, gy]])


def test_classes_are_learnable_from_held_out_images(tmp_path):
    num_classes = 6
    synthesize(
        tmp_path,
        num_classes=num_classes,
        train_per_class=30,
        val_per_class=15,
        seed=5,
        size_range=(40, 56),
        progress=False,
    )

    def load(split):
        xs, ys = [], []
        for label, folder in enumerate(sorted((tmp_path / split).iterdir())):
            for path in sorted(folder.iterdir()):
                xs.append(_features(path))
                ys.append(label)
        return np.stack(xs), np.array(ys)

    x_train, y_train = load("train")
    x_val, y_val = load("val")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(num_classes)])
    predicted = np.argmin(((x_val[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (predicted == y_val).mean()
    # Chance is 1/6 ≈ 0.17; crude hand-made features on 15 val images per class must clearly beat it.
    assert accuracy > 2.0 / num_classes, accuracy
