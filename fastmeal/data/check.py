"""Check an ImageFolder dataset before a multi-day run: counts per class and every problem by path.

Every file is fully decoded with Pillow (``Image.open(...).load()`` with ``ImageFile.LOAD_TRUNCATED_IMAGES``
off), so truncated and corrupt files are found here rather than hours into training. CMYK and grayscale
files are not problems (every fastmeal loader converts them to RGB); they are counted in ``modes``.
"""

from __future__ import annotations

import os
import statistics
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm import tqdm

from fastmeal.console import progress_enabled
from fastmeal.lifecycle import raise_if_stopped

SPLITS = ("train", "val")
# torchvision's ImageFolder IMG_EXTENSIONS: files with other extensions are silently skipped by it.
IMAGE_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".ppm": "PPM",
    ".pgm": "PPM",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
}
PROBLEM_KINDS = (
    "missing_root",
    "missing_split",
    "symlink_loop",
    "stray_file",
    "empty_class",
    "class_mismatch",
    "not_an_image",
    "zero_byte",
    "truncated",
    "unreadable",
)
# Findings that are not problems: fastmeal's loaders handle them (reported, exit status unaffected).
NOTE_KINDS = ("format_mismatch",)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the dataset.

    Attributes:
        path: the file or folder concerned (the root joined with its relative path).
        kind: one of ``PROBLEM_KINDS``.
        message: what is wrong and what it means for training.
    """

    path: str
    kind: str
    message: str


@dataclass
class DatasetReport:
    """What ``check_dataset`` found.

    Attributes:
        root: the dataset root as given.
        counts: ``{split: {class: number of image files}}``; classes in sorted (class-index) order.
        problems: every problem, sorted by path.
        notes: findings the loaders cope with (a PNG named ``.JPEG``), sorted by path; not problems.
        modes: Pillow image modes of the decodable files (``RGB``, ``L``, ``CMYK``, ...); informative only.
        formats: decoded file formats (``JPEG``, ``PNG``, ...); informative only.
        num_progressive: progressive JPEGs; informative only.
    """

    root: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    num_progressive: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _pool_context():
    return get_context("fork" if "fork" in get_all_start_methods() else "spawn")


def _inspect_file(path: str) -> tuple[str | None, str, str | None, str | None, bool]:
    """Fully decode one file.

    Returns:
        ``(problem kind or None, message, format, mode, progressive)``.
    """
    try:
        if os.path.getsize(path) == 0:
            return "zero_byte", "empty file (0 bytes)", None, None, False
    except OSError as error:  # e.g. a dangling symlink
        return "unreadable", f"cannot stat: {error}", None, None, False
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    # Some loaders switch this on globally to limp past bad files; the check must see them.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. corrupt EXIF: harmless for training, noisy on ImageNet
            with Image.open(path) as img:
                fmt, mode = img.format, img.mode
                progressive = bool(img.info.get("progressive") or img.info.get("progression"))
                img.load()
    except UnidentifiedImageError:
        return "unreadable", "not an image Pillow can identify", None, None, False
    except OSError as error:
        kind = "truncated" if "truncated" in str(error) else "unreadable"
        return kind, f"decoding failed: {error}", None, None, False
    except Exception as error:  # any decoder failure is a finding, not a reason to abort the check
        return "unreadable", f"decoding failed: {type(error).__name__}: {error}", None, None, False
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    expected = IMAGE_FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt != expected:
        message = (
            f"{fmt} content under a {os.path.splitext(path)[1]} name (fastmeal's loaders detect the real format "
            "and decode it; other tools that trust the extension may not)"
        )
        return "format_mismatch", message, fmt, mode, progressive
    return None, "", fmt, mode, progressive


def _loop_link(split_dir: Path, dirpath: str, name: str, report: DatasetReport) -> bool:
    """Whether folder ``name`` in ``dirpath`` is a link back into a folder it is reached through (reported)."""
    path = os.path.join(dirpath, name)
    if not os.path.islink(path):
        return False
    real = os.path.realpath(path)
    parts = Path(dirpath).relative_to(split_dir).parts
    ancestors = {os.path.realpath(split_dir.joinpath(*parts[:k])) for k in range(len(parts) + 1)}
    if real not in ancestors:
        return False
    report.problems.append(Problem(path, "symlink_loop", f"a link to {real}, a folder it is inside of: the loaders "
                                   "refuse the split (they would list its images again and again); remove the link"))
    return True


def _list_split(root: Path, split: str, report: DatasetReport) -> list[tuple[str, str]]:
    """Count a split's classes and return its image files as ``(class, path)``; record layout problems."""
    split_dir = root / split
    counts: dict[str, int] = {}
    report.counts[split] = counts
    if not split_dir.is_dir():
        report.problems.append(Problem(str(split_dir), "missing_split", f"no {split}/ folder"))
        return []
    files = []
    for entry in sorted(split_dir.iterdir()):
        if not entry.is_dir():
            message = f"file directly in {split}/, outside any class folder: ignored by ImageFolder loaders"
            report.problems.append(Problem(str(entry), "stray_file", message))
            continue
        class_files = []
        # Recursive like torchvision's ImageFolder (os.walk with followlinks=True).
        for dirpath, dirnames, filenames in os.walk(entry, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not _loop_link(split_dir, dirpath, d, report))
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.splitext(name)[1].lower() in IMAGE_FORMATS:
                    class_files.append((entry.name, path))
                else:
                    message = "not an image extension: skipped by ImageFolder loaders"
                    report.problems.append(Problem(path, "not_an_image", message))
        counts[entry.name] = len(class_files)
        if not class_files:
            message = "class folder without images (torchvision's ImageFolder refuses it; class indices shift)"
            report.problems.append(Problem(str(entry), "empty_class", message))
        files.extend(class_files)
    return files


def check_dataset(root: str | Path, *, progress: bool = True, num_workers: int = 1) -> DatasetReport:
    """Check an ImageFolder dataset (``root/train/<class>/*``, ``root/val/<class>/*``).

    Args:
        root: dataset root holding ``train/`` and ``val/``.
        progress: show a progress bar over files.
        num_workers: processes that decode files in parallel (ImageNet takes about an hour per core).

    Returns:
        A ``DatasetReport``; ``report.ok`` is False when any problem was found.
    """
    root = Path(root)
    report = DatasetReport(root=str(root))
    if not root.is_dir():
        report.problems.append(Problem(str(root), "missing_root", "the dataset root does not exist"))
        return report
    files = [item for split in SPLITS for item in _list_split(root, split, report)]

    # Class sets must agree: class index = sorted folder position, so one missing class shifts the rest.
    train_classes, val_classes = set(report.counts["train"]), set(report.counts["val"])
    if (root / "train").is_dir() and (root / "val").is_dir():
        for split, other, missing in (
            ("val", "train", train_classes - val_classes),
            ("train", "val", val_classes - train_classes),
        ):
            for name in sorted(missing):
                message = f"class {name!r} is in {other}/ but not in {split}/: class indices differ between splits"
                report.problems.append(Problem(str(root / split / name), "class_mismatch", message))

    paths = [path for _, path in files]
    modes: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    with tqdm(total=len(paths), desc="check", unit="img", disable=not progress_enabled(progress)) as bar:
        if num_workers <= 1:
            results = (_inspect_file(path) for path in paths)
            pool = None
        else:
            # fork where available, like torch's DataLoader: the workers only run numpy and Pillow (never the
            # caller's torch thread pools), and spawn would re-import torch through fastmeal.data in every worker.
            pool = ProcessPoolExecutor(num_workers, mp_context=_pool_context())
            results = pool.map(_inspect_file, paths, chunksize=64)
        try:
            for path, (kind, message, fmt, mode, progressive) in zip(paths, results, strict=True):
                raise_if_stopped()
                bar.update()
                if kind is not None:
                    (report.notes if kind in NOTE_KINDS else report.problems).append(Problem(path, kind, message))
                if fmt is not None:
                    formats[fmt] += 1
                    modes[mode] += 1
                    report.num_progressive += progressive
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
    report.modes = dict(modes.most_common())
    report.formats = dict(formats.most_common())
    report.problems.sort(key=lambda p: (p.path, p.kind))
    report.notes.sort(key=lambda p: (p.path, p.kind))
    return report


def format_report(report: DatasetReport, *, max_rows: int = 40) -> str:
    """Render a report as text: images per class and split, file modes and formats, then problems by path.

    Args:
        report: what ``check_dataset`` returned.
        max_rows: above this many classes, per-split statistics and the smallest classes replace the table.

    Returns:
        Multi-line text (no trailing newline).
    """
    splits = [split for split in SPLITS if split in report.counts]
    classes = sorted({name for split in splits for name in report.counts[split]})
    totals = {split: sum(report.counts[split].values()) for split in splits}
    lines = [
        f"dataset {report.root}: {len(classes)} classes, "
        + ", ".join(f"{totals[split]} {split}" for split in splits)
        + " images"
    ]
    if classes and len(classes) <= max_rows:
        width = max(len("class"), len("total"), *(len(name) for name in classes))
        lines.append(f"  {'class':<{width}}" + "".join(f"{split:>9}" for split in splits))
        for name in classes:
            cells = "".join(f"{report.counts[split].get(name, '-'):>9}" for split in splits)
            lines.append(f"  {name:<{width}}{cells}")
        lines.append(f"  {'total':<{width}}" + "".join(f"{totals[split]:>9}" for split in splits))
    elif classes:
        for split in splits:
            counts = report.counts[split]
            if not counts:
                continue
            values = sorted(counts.values())
            smallest = ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: kv[1])[:5])
            lines.append(
                f"  {split}: images per class min {values[0]}, median {statistics.median(values):g}, "
                f"max {values[-1]}; smallest: {smallest}"
            )
    if report.formats:
        lines.append(
            "  modes: "
            + ", ".join(f"{mode} {n}" for mode, n in report.modes.items())
            + "; formats: "
            + ", ".join(f"{fmt} {n}" for fmt, n in report.formats.items())
            + f"; progressive JPEGs: {report.num_progressive}"
        )
        if set(report.modes) - {"RGB"}:
            lines.append("  (non-RGB modes such as L and CMYK are fine: every fastmeal loader converts to RGB)")
    if report.notes:
        lines.append(f"{len(report.notes)} note{'s' if len(report.notes) != 1 else ''} (not problems):")
        width = max(len(p.kind) for p in report.notes)
        lines.extend(f"  {p.kind:<{width}}  {p.path}: {p.message}" for p in report.notes)
    if report.ok:
        lines.append("no problems found")
    else:
        lines.append(f"{len(report.problems)} problem{'s' if len(report.problems) != 1 else ''}:")
        width = max(len(p.kind) for p in report.problems)
        lines.extend(f"  {p.kind:<{width}}  {p.path}: {p.message}" for p in report.problems)
    return "\n".join(lines)
