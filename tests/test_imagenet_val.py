"""`fastmeal data imagenet-val` (issue #23 item 11) on a tiny fake ILSVRC2012 val set and devkit the test writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastmeal.cli import main
from fastmeal.data.common import DataError, scan_split
from fastmeal.data.imagenet import arrange_val, labels_from_devkit, labels_from_solution

# The devkit numbers its classes in its own order (ILSVRC2012_ID), not in sorted-wnid order: the fake does too.
DEVKIT_CLASSES = {1: "n03000000", 2: "n01000000", 3: "n02000000"}
PER_CLASS = 2
TRUTH = [2, 1, 3, 3, 2, 1]  # ILSVRC2012_ID of val images 1..6


def fake_flat_val(root):
    flat = root / "flat"
    flat.mkdir()
    for number, class_id in enumerate(TRUTH, start=1):
        # each image's colour encodes its class, so the arranged folders can be checked by content
        Image.new("RGB", (20, 16), (40 * class_id, 0, 0)).save(flat / f"ILSVRC2012_val_{number:08d}.JPEG")
    return flat


def fake_devkit(root):
    import scipy.io

    devkit = root / "ILSVRC2012_devkit_t12"
    (devkit / "data").mkdir(parents=True)
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    synsets = np.array([(i, w, f"class {i}", "", 0) for i, w in DEVKIT_CLASSES.items()], dtype=fields)
    scipy.io.savemat(devkit / "data" / "meta.mat", {"synsets": synsets})
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in TRUTH))
    return devkit


def check_arranged(val):
    split = scan_split(val.parent, "val")
    assert split.classes == tuple(sorted(DEVKIT_CLASSES.values()))
    for path, label in split.samples:
        number = int(path.rsplit("_", 1)[1].split(".")[0])
        assert split.classes[label] == DEVKIT_CLASSES[TRUTH[number - 1]]
        red = np.asarray(Image.open(path))[..., 0].mean()
        assert abs(red - 40 * TRUTH[number - 1]) < 8  # the file behind the link is that image


def test_devkit_labels_link_the_flat_folder_into_class_folders(tmp_path, capsys):
    flat = fake_flat_val(tmp_path)
    devkit = fake_devkit(tmp_path)
    labels = labels_from_devkit(devkit)
    assert labels["ILSVRC2012_val_00000001"] == "n01000000" and len(labels) == 6
    val = tmp_path / "imagenet" / "val"
    code = main(["data", "imagenet-val", str(flat), "--out", str(val), "--devkit", str(devkit),
                 "--per-class", str(PER_CLASS), "--no-progress"])
    assert code == 0 and '"linked": 6' in capsys.readouterr().out
    assert all(p.is_symlink() for p in val.glob("*/*")) and len(list(flat.iterdir())) == 6
    check_arranged(val)
    # run again: nothing to do, nothing changes
    assert arrange_val(flat, val, labels, per_class=PER_CLASS, progress=False)["linked"] == 0


def test_solution_csv_and_move_and_a_stopped_run_continues(tmp_path):
    flat = fake_flat_val(tmp_path)
    csv = tmp_path / "LOC_val_solution.csv"
    rows = [f"ILSVRC2012_val_{n:08d},{DEVKIT_CLASSES[c]} 1 2 3 4 {DEVKIT_CLASSES[c]} 5 6 7 8"
            for n, c in enumerate(TRUTH, start=1)]
    csv.write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")
    labels = labels_from_solution(csv)
    val = tmp_path / "imagenet" / "val"
    # as if a first run had moved one file before it was stopped
    first = labels["ILSVRC2012_val_00000003"]
    (val / first).mkdir(parents=True)
    (flat / "ILSVRC2012_val_00000003.JPEG").rename(val / first / "ILSVRC2012_val_00000003.JPEG")
    summary = arrange_val(flat, val, labels, move=True, per_class=PER_CLASS, progress=False)
    assert summary == {"images": 6, "classes": 3, "moved": 5} and not list(flat.iterdir())
    check_arranged(val)


def test_mismatches_are_refused_before_anything_moves(tmp_path):
    flat = fake_flat_val(tmp_path)
    labels = labels_from_devkit(fake_devkit(tmp_path))
    val = tmp_path / "val"
    with pytest.raises(DataError, match=r"3 class\(es\) would get another count than 50"):
        arrange_val(flat, val, labels, progress=False)  # the real 50 per class
    (flat / "ILSVRC2012_val_00000007.JPEG").write_bytes((flat / "ILSVRC2012_val_00000001.JPEG").read_bytes())
    with pytest.raises(DataError, match=r"1 image\(s\) have no label \(e.g. ILSVRC2012_val_00000007\)"):
        arrange_val(flat, val, labels, move=True, per_class=PER_CLASS, progress=False)
    assert not val.exists() and len(list(flat.iterdir())) == 7
