"""ImageNet's validation split into ImageFolder layout: ``val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG``.

The official ``ILSVRC2012_img_val.tar`` unpacks into one flat folder of 50,000 JPEGs. Their classes come
from either

* the devkit (``ILSVRC2012_devkit_t12``): ``data/ILSVRC2012_validation_ground_truth.txt`` holds one
  ILSVRC2012_ID (1..1000) per image, in image-number order, and ``data/meta.mat`` maps each ID to its
  WordNet id (the devkit's own class order, which is not the sorted-wnid order ImageFolder uses); reading
  ``meta.mat`` needs SciPy; or
* Kaggle's ``LOC_val_solution.csv``: ``ImageId,PredictionString`` where the first word of the
  prediction string is the wnid.

:func:`arrange_val` checks everything before it touches a file (every image has a label, every label an
image, the expected count per class), then links (default) or moves each file into its class folder,
and counts the result from disk again. A run that was stopped part-way is continued by running it again.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from fastmeal.console import progress_enabled
from fastmeal.data.common import DataError

log = logging.getLogger(__name__)

GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
_IMAGE = re.compile(r"^(ILSVRC2012_val_(\d{8}))\.JPEG$", re.IGNORECASE)
_WNID = re.compile(r"^n\d{8}$")


def labels_from_devkit(devkit: str | os.PathLike) -> dict[str, str]:
    """``{"ILSVRC2012_val_00000001": "n01751748", ...}`` from an extracted devkit folder.

    Raises:
        DataError: a missing or malformed file (named), or SciPy not installed (with the install command).
    """
    devkit = Path(devkit)
    truth, meta = devkit / GROUND_TRUTH, devkit / META
    for path in (truth, meta):
        if not path.is_file():
            raise DataError(f"{path} is missing: --devkit takes the extracted ILSVRC2012_devkit_t12 folder (it holds "
                            f"{GROUND_TRUTH} and {META})")
    try:
        import scipy.io
    except ImportError as err:
        raise DataError("reading the devkit's meta.mat needs SciPy: pip install scipy (or use Kaggle's "
                        "LOC_val_solution.csv with --solution)") from err
    try:
        synsets = scipy.io.loadmat(meta, squeeze_me=True)["synsets"]
        wnid_of = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], strict=True)}
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise DataError(f"{meta} is not the devkit's meta.mat (a 'synsets' table with ILSVRC2012_ID and WNID): "
                        f"{err}") from err
    labels = {}
    for number, line in enumerate(truth.read_text().split(), start=1):
        try:
            labels[f"ILSVRC2012_val_{number:08d}"] = wnid_of[int(line)]
        except (ValueError, KeyError):
            raise DataError(f"{truth} line {number}: {line!r} is not an ILSVRC2012_ID of {meta}") from None
    return labels


def labels_from_solution(path: str | os.PathLike) -> dict[str, str]:
    """``{"ILSVRC2012_val_00008726": "n02119789", ...}`` from Kaggle's ``LOC_val_solution.csv``."""
    path = Path(path)
    labels = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                wnid = (row.get("PredictionString") or "").split()[:1]
                if not row.get("ImageId") or not wnid or not _WNID.match(wnid[0]):
                    raise DataError(f"{path} line {len(labels) + 2}: {row} is not ImageId,PredictionString with a "
                                    "wnid first (LOC_val_solution.csv)")
                labels[row["ImageId"]] = wnid[0]
    except FileNotFoundError:
        raise DataError(f"{path} does not exist (--solution takes Kaggle's LOC_val_solution.csv)") from None
    return labels


def arrange_val(flat: str | os.PathLike, out: str | os.PathLike, labels: dict[str, str], *, move: bool = False,
                per_class: int | None = 50, progress: bool = True) -> dict[str, int]:
    """Put each image of the flat folder ``flat`` into ``out/<wnid>/`` (a symlink, or moved with ``move``).

    Args:
        flat: the unpacked ``ILSVRC2012_img_val.tar`` (``ILSVRC2012_val_00000001.JPEG``, ...).
        out: the val split to write (``<data.root>/val``); new or empty, or a run of this that stopped.
        labels: image id (file name without ``.JPEG``) → wnid: :func:`labels_from_devkit` or
            :func:`labels_from_solution`.
        move: move the files (``flat`` ends empty) instead of linking to them.
        per_class: the count every class must have (ImageNet: 50); None = no check.
        progress: a progress bar.

    Returns:
        ``{"images": N, "classes": C, "linked" or "moved": files done now}``.

    Raises:
        DataError: before any file is touched, naming what does not fit (images without a label, labels
            without an image, classes with another count, a foreign file in ``out``).
    """
    flat, out = Path(flat), Path(out)
    if not flat.is_dir():
        raise DataError(f"{flat} is not a folder (give the folder ILSVRC2012_img_val.tar was unpacked into)")
    # A stopped run left some files in place already: they count as arranged.
    done = {p.name: p for p in out.glob("*/*") if _IMAGE.match(p.name)} if out.is_dir() else {}
    foreign = [p for p in out.rglob("*") if not p.is_dir() and p.name not in done] if out.is_dir() else []
    if foreign:
        raise DataError(f"{out} holds files that are not ImageNet val images (e.g. {foreign[0]}): give a new or "
                        "empty folder")
    images = {m[1]: flat / m[0] for m in (_IMAGE.match(p.name) for p in flat.iterdir()) if m}
    images.update({_IMAGE.match(name)[1]: path for name, path in done.items()})
    unlabelled = sorted(set(images) - set(labels))
    missing = sorted(set(labels) - set(images))
    if unlabelled or missing:
        raise DataError(f"{flat}: {len(images)} images and {len(labels)} labels do not match: "
                        + (f"{len(unlabelled)} image(s) have no label (e.g. {unlabelled[0]}) " if unlabelled else "")
                        + (f"{len(missing)} labelled image(s) are missing (e.g. {missing[0]}.JPEG)" if missing else "")
                        + "; is this the full ILSVRC2012 val set and its labels?")
    counts = Counter(labels.values())
    odd = {w: n for w, n in counts.items() if per_class is not None and n != per_class}
    if odd:
        shown = ", ".join(f"{w}: {n}" for w, n in sorted(odd.items())[:5])
        raise DataError(f"{len(odd)} class(es) would get another count than {per_class} images ({shown}"
                        f"{' ...' if len(odd) > 5 else ''}); check the labels file")
    acted = 0
    for image_id in tqdm(sorted(images), desc="val", unit="file", disable=not progress_enabled(progress)):
        source = images[image_id]
        target = out / labels[image_id] / source.name
        if target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(source, target)
        else:
            os.symlink(source.resolve(), target)
        acted += 1
    # The result, counted from disk: what a loader will see.
    on_disk = Counter(p.parent.name for p in out.glob("*/*") if _IMAGE.match(p.name) and p.exists())
    if on_disk != counts:
        wrong = sorted(w for w in counts.keys() | on_disk.keys() if on_disk[w] != counts[w])
        raise DataError(f"{out}: after arranging, {len(wrong)} class folder(s) do not hold their images (e.g. "
                        f"{wrong[0]}: {on_disk[wrong[0]]} of {counts[wrong[0]]})")
    log.info("%s: %d images in %d class folders (%s)", out, sum(on_disk.values()), len(on_disk),
             f"{per_class} each" if per_class is not None else "counts not checked")
    return {"images": sum(on_disk.values()), "classes": len(on_disk), "moved" if move else "linked": acted}
