"""The dataset checker: counts on a clean dataset, and every planted problem found and named by path."""

import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from fastmeal.data.check import PROBLEM_KINDS, check_dataset, format_report
from fastmeal.data.synthetic import synthesize

SMALL = dict(num_classes=3, train_per_class=4, val_per_class=2, size_range=(32, 48), progress=False)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    return root, synthesize(root, seed=0, **SMALL)


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    return root, synthesize(root, seed=0, oddities=True, **SMALL)


def problems_by_path(report) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for problem in report.problems:
        assert problem.kind in PROBLEM_KINDS and problem.message
        found.setdefault(problem.path, set()).add(problem.kind)
    return found


def test_clean_dataset_is_ok_with_right_counts(clean):
    root, summary = clean
    report = check_dataset(root, progress=False)
    assert report.ok and report.problems == []
    assert report.counts == {split: {name: n for name in summary["classes"]} for split, n in (("train", 4), ("val", 2))}
    assert report.modes == {"RGB": 18} and report.formats == {"JPEG": 18} and report.num_progressive == 0
    text = format_report(report)
    assert "no problems found" in text and all(name in text for name in summary["classes"])


def test_oddities_are_counted_and_the_png_named_jpeg_is_a_note_not_a_problem(odd):
    root, summary = odd
    report = check_dataset(root, progress=False)
    odd_paths = summary["oddities"]
    assert report.modes["L"] == len(odd_paths["grayscale"]) and report.modes["CMYK"] == len(odd_paths["cmyk"])
    assert report.formats == {"JPEG": 17, "PNG": 1}
    assert report.num_progressive == len(odd_paths["progressive"])
    assert report.ok and report.problems == []  # the loaders decode it: `fastmeal data check` exits 0
    [note] = report.notes
    assert (note.kind, note.path) == ("format_mismatch", str(root / odd_paths["png_as_jpeg"][0]))
    assert "PNG" in note.message and "fastmeal's loaders" in note.message
    text = format_report(report)
    assert "CMYK" in text and "1 note (not problems)" in text and "no problems found" in text


def test_finds_and_names_every_planted_problem(clean, tmp_path):
    source, summary = clean
    root = tmp_path / "broken"
    shutil.copytree(source, root)
    first, second, third = summary["classes"]
    train_files = sorted((root / "train" / first).iterdir())

    truncated = train_files[0]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    zero_byte = train_files[1]
    zero_byte.write_bytes(b"")
    png = train_files[2]
    Image.open(png).convert("RGB").save(png, "PNG")
    garbage = root / "val" / second / "garbage.JPEG"
    garbage.write_bytes(b"this is not an image at all" * 10)
    empty = root / "train" / "c002b_empty"
    empty.mkdir()
    shutil.rmtree(root / "val" / third)  # val lacks a class that train has
    notes = root / "train" / second / "notes.txt"
    notes.write_text("hello")
    stray = root / "val" / "stray.JPEG"
    shutil.copy(train_files[3], stray)

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # a loader somewhere switched it on: the check must not be fooled
    try:
        report = check_dataset(root, progress=False)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # and it restores the caller's setting
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous

    expected = {
        str(truncated): {"truncated"},
        str(zero_byte): {"zero_byte"},
        str(garbage): {"unreadable"},
        str(empty): {"empty_class"},
        str(root / "val" / "c002b_empty"): {"class_mismatch"},  # the empty train class is absent from val
        str(root / "val" / third): {"class_mismatch"},
        str(notes): {"not_an_image"},
        str(stray): {"stray_file"},
    }
    assert not report.ok
    assert problems_by_path(report) == expected
    assert [(n.path, n.kind) for n in report.notes] == [(str(png), "format_mismatch")]
    assert report.counts["train"][first] == 4 and report.counts["train"]["c002b_empty"] == 0
    assert report.counts["val"][second] == 3 and third not in report.counts["val"]
    assert report.problems == sorted(report.problems, key=lambda p: (p.path, p.kind))
    text = format_report(report)
    assert f"{len(report.problems)} problems:" in text
    assert all(path in text for path in expected)


def test_missing_split_and_missing_root(clean, tmp_path):
    source, _ = clean
    shutil.copytree(source / "train", tmp_path / "only_train" / "train")
    report = check_dataset(tmp_path / "only_train", progress=False)
    assert problems_by_path(report) == {str(tmp_path / "only_train" / "val"): {"missing_split"}}
    assert sum(report.counts["train"].values()) == 12 and report.counts["val"] == {}

    report = check_dataset(tmp_path / "nowhere", progress=False)
    assert [(p.kind, p.path) for p in report.problems] == [("missing_root", str(tmp_path / "nowhere"))]
    assert "missing_root" in format_report(report)


def test_many_classes_give_a_summary_instead_of_a_table(tmp_path):
    for split in ("train", "val"):
        for c in range(6):
            folder = Path(tmp_path) / split / f"k{c}"
            folder.mkdir(parents=True)
            for i in range(c + 1):
                Image.new("RGB", (8, 8), (c * 40, 0, 0)).save(folder / f"{i}.JPEG")
    report = check_dataset(tmp_path, progress=False)
    assert report.ok and report.counts["train"] == {f"k{c}": c + 1 for c in range(6)}
    text = format_report(report, max_rows=4)
    assert "min 1, median 3.5, max 6" in text and "smallest: k0 1, k1 2" in text
    assert "k5" not in text  # no per-class table


def test_parallel_check_gives_the_same_report(odd):
    root, _ = odd
    assert check_dataset(root, progress=False, num_workers=2) == check_dataset(root, progress=False)


def test_a_symlink_loop_is_reported_not_walked(tmp_path):
    import os

    root = tmp_path / "d"
    synthesize(root, num_classes=2, train_per_class=1, val_per_class=1, seed=0, size_range=(16, 20), progress=False)
    link = sorted((root / "train").iterdir())[0] / "up"
    os.symlink("..", link)
    report = check_dataset(root, progress=False)
    assert not report.ok and [(p.path, p.kind) for p in report.problems] == [(str(link), "symlink_loop")]
