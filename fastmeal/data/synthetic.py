"""A deterministic, embedded JPEG classification dataset in ImageFolder layout.

The demo, the tests and the throughput benchmarks need ImageNet-shaped data without ImageNet. This module
writes ``OUT/train/<class>/*.JPEG`` and ``OUT/val/<class>/*.JPEG`` with classes that are learnable but not
trivial: each class combines a texture family (stripes, checker, dots, rings, blobs, zigzag) with class
parameters (frequency, orientation, duty) and a two-colour palette, and every image draws strong
per-image randomness (colour jitter, phase, a partial visibility mask, occluding clutter, noise, and
occasionally a neighbouring class's palette or texture) so that neighbouring classes overlap. The class
signal is colour statistics plus texture type and orientation, which survive RandomResizedCrop (area
0.08–1, aspect 3/4–4/3) and horizontal flips: orientations are drawn with a random sign, so a class's
distribution of images is itself flip-invariant.

Determinism: every image is drawn from ``numpy.random.default_rng([seed, split, class, index])`` and every
operation is either numpy arithmetic or Pillow's (deterministic) resampling and JPEG encoder, so the
same arguments give byte-identical files on the same machine, independently of ``num_workers``.

With ``oddities=True`` the dataset also contains the odd files that real ImageNet has (grayscale and CMYK
JPEGs, progressive JPEGs, and one PNG saved under a ``.JPEG`` name), each still showing its class's image.
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fastmeal.checkpoint import atomic_write_bytes
from fastmeal.console import progress_enabled
from fastmeal.data.common import DataError
from fastmeal.lifecycle import raise_if_stopped

FAMILIES = ("stripes", "checker", "dots", "rings", "blobs", "zigzag")
SPLITS = ("train", "val")
ODDITY_KINDS = ("grayscale", "cmyk", "progressive", "png_as_jpeg")
# How many train files of each odd kind; val gets one grayscale file. Real ImageNet train has 22 CMYK
# JPEGs and one PNG named .JPEG (n02105855_2933.JPEG); a handful of each is enough for loader tests.
NUM_TRAIN_ODDITIES = {"grayscale": 3, "cmyk": 2, "progressive": 2, "png_as_jpeg": 1}
MARKER_FILE = "fastmeal_synthetic.json"

# Class parameters depend on the class index only (not on the seed), so that datasets made with
# different seeds are different samples of the same task.
_CLASS_SALT = 0x5EEDC1A5
_GOLDEN = 0.6180339887498949  # hue step between classes of one family: well spread for any count

# Per-image randomness. The probabilities and spreads below were tuned by training small CNNs on the
# CPU at 64 px (RandomResizedCrop + flip, a few epochs) so that accuracy lands well above chance but
# far from 100% (see the commit message for the numbers).
_HUE_JITTER = 0.03  # std of the per-image hue shift; same-family hues are ~1/n_family apart
_SWAP_PALETTE_P = 0.15  # probability that an image wears a neighbouring class's palette
_SWAP_TEXTURE_P = 0.15  # probability that an image shows a neighbouring class's texture
_MAX_ASPECT = 1.45  # long/short side, a bit more than RandomResizedCrop's 4/3 like ImageNet photos
_LANDSCAPE_P = 0.75  # most ImageNet photos are landscape


@dataclass(frozen=True)
class ClassSpec:
    """The fixed parameters of one synthetic class.

    Attributes:
        index: class index (also the sort position of its folder name).
        name: folder name, ``c<index>_<family>``.
        family: texture family, one of ``FAMILIES``.
        freq: pattern frequency in cycles per short image side.
        angle: pattern orientation in degrees, 0–90; images use ±angle (flip-invariant class).
        duty: pattern threshold in [-0.5, 0.5]; shifts how much of the pattern is foreground.
        fg_hsv: foreground colour (hue, saturation, value), each in [0, 1].
        bg_hsv: background colour (hue, saturation, value).
    """

    index: int
    name: str
    family: str
    freq: float
    angle: float
    duty: float
    fg_hsv: tuple[float, float, float]
    bg_hsv: tuple[float, float, float]


def class_specs(num_classes: int) -> list[ClassSpec]:
    """Derive every class's parameters deterministically from its index.

    Consecutive classes have different families; classes sharing a family get hues a golden-ratio step
    apart so that they stay distinguishable for any number of classes, and closer (overlapping) as the
    number grows.

    Args:
        num_classes: number of classes, at least 2.

    Returns:
        One ``ClassSpec`` per class, in class-index order.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    width = max(3, len(str(num_classes - 1)))
    specs = []
    for c in range(num_classes):
        rng = np.random.default_rng([_CLASS_SALT, c])
        family_id = c % len(FAMILIES)
        j = c // len(FAMILIES)  # rank of the class within its family
        fg_hue = (0.13 * family_id + _GOLDEN * j) % 1.0
        bg_hue = (fg_hue + rng.uniform(0.25, 0.75)) % 1.0
        specs.append(
            ClassSpec(
                index=c,
                name=f"c{c:0{width}d}_{FAMILIES[family_id]}",
                family=FAMILIES[family_id],
                freq=float(3.0 * (4.0 ** rng.random())),  # 3–12 cycles per short side
                angle=float(rng.uniform(0.0, 90.0)),
                duty=float(rng.uniform(-0.3, 0.3)),
                fg_hsv=(fg_hue, float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.55, 0.95))),
                bg_hsv=(bg_hue, float(rng.uniform(0.15, 0.6)), float(rng.uniform(0.3, 0.85))),
            )
        )
    return specs


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: float, channels: int = 1) -> np.ndarray:
    """Uniform noise on a coarse grid, upsampled bilinearly: smooth blobs about ``1/cells`` wide.

    Pillow's resampling is used (not a matrix product) because BLAS results may depend on threading.

    Returns:
        float32 array ``[height, width, channels]`` with values in [0, 1].
    """
    grid_h = max(2, round(cells * height / min(height, width)) + 1)
    grid_w = max(2, round(cells * width / min(height, width)) + 1)
    grid = rng.random((channels, grid_h, grid_w), dtype=np.float32)
    planes = [np.asarray(Image.fromarray(g, mode="F").resize((width, height), Image.BICUBIC)) for g in grid]
    return np.clip(np.stack(planes, axis=-1), 0.0, 1.0)


def _soft_threshold(x: np.ndarray, level: float, sharpness: float = 4.0) -> np.ndarray:
    """Map a signal in [-1, 1] to a [0, 1] mask with soft (anti-aliased) edges at ``level``."""
    return np.clip((x - level) * sharpness + 0.5, 0.0, 1.0)


def _texture(spec: ClassSpec, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """The class's pattern with per-image frequency, orientation sign, phase and origin.

    Returns:
        float32 array ``[height, width]`` in [0, 1]; 1 marks foreground.
    """
    short = min(height, width)
    freq = spec.freq * math.exp(rng.normal(0.0, 0.2))
    angle = math.radians(rng.choice([-1.0, 1.0]) * (spec.angle + rng.normal(0.0, 8.0)))
    phase = rng.uniform(0.0, 2 * math.pi)
    # Coordinates in short-side units, about a random origin (so crops do not line up across images).
    y = (np.arange(height, dtype=np.float32)[:, None] - rng.uniform(0, height)) / short
    x = (np.arange(width, dtype=np.float32)[None, :] - rng.uniform(0, width)) / short
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    two_pi_f = np.float32(2 * math.pi * freq)
    if spec.family == "stripes":
        return _soft_threshold(np.sin(two_pi_f * u + phase), spec.duty)
    if spec.family == "checker":
        return _soft_threshold(np.sin(two_pi_f * u + phase) * np.sin(two_pi_f * v), spec.duty * 0.5)
    if spec.family == "dots":
        du = (freq * u + rng.random()) % 1.0 - 0.5
        dv = (freq * v + rng.random()) % 1.0 - 0.5
        radius = 0.3 + 0.25 * spec.duty  # in lattice periods
        return np.clip((radius - np.sqrt(du * du + dv * dv)) * 12.0 + 0.5, 0.0, 1.0)
    if spec.family == "rings":
        # Centre anywhere within one short side of the image, so arcs as well as full rings appear.
        r = np.sqrt((x - rng.uniform(-0.5, 0.5)) ** 2 + (y - rng.uniform(-0.5, 0.5)) ** 2)
        return _soft_threshold(np.sin(two_pi_f * r + phase), spec.duty)
    if spec.family == "blobs":
        blobs = _smooth_noise(rng, height, width, freq / 2)[..., 0]
        return _soft_threshold(2.0 * blobs - 1.0, spec.duty * 0.5, sharpness=6.0)
    if spec.family == "zigzag":
        tri = 2.0 * np.abs((0.5 * freq * v) % 1.0 - 0.5)  # triangle wave along the stripes
        return _soft_threshold(np.sin(two_pi_f * (u + tri / freq * 0.6) + phase), spec.duty)
    raise ValueError(f"unknown texture family {spec.family!r}")


def _palette(spec: ClassSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB colours of one image: the class palette with per-image jitter."""
    h, s, v = spec.fg_hsv
    fg = _hsv_to_rgb(h + rng.normal(0.0, _HUE_JITTER), s * rng.uniform(0.75, 1.1), v * rng.uniform(0.7, 1.1))
    h, s, v = spec.bg_hsv
    bg = _hsv_to_rgb(h + rng.normal(0.0, 2 * _HUE_JITTER), s * rng.uniform(0.6, 1.3), v * rng.uniform(0.7, 1.2))
    return fg, bg


def render(specs: list[ClassSpec], label: int, rng: np.random.Generator, size_range: tuple[int, int]) -> np.ndarray:
    """Draw one image of class ``label``.

    Args:
        specs: all classes (neighbours lend palettes and textures to make classes overlap).
        label: class index of the image.
        rng: the image's own generator; everything random is drawn from it.
        size_range: inclusive range of the short side in pixels.

    Returns:
        uint8 array ``[H, W, 3]`` with ``min(H, W)`` in ``size_range`` and ``max/min`` in [1, 1.45].
    """
    lo, hi = size_range
    short = int(rng.integers(lo, hi + 1))
    long = round(short * rng.uniform(1.0, _MAX_ASPECT))
    height, width = (short, long) if rng.random() < _LANDSCAPE_P else (long, short)

    num_classes = len(specs)
    spec = specs[label]
    neighbour = specs[(label + rng.choice([-1, 1])) % num_classes]
    palette_spec = neighbour if rng.random() < _SWAP_PALETTE_P else spec
    texture_spec = neighbour if rng.random() < _SWAP_TEXTURE_P else spec
    fg, bg = _palette(palette_spec, rng)

    # Background: the class colour under low-frequency colour clutter.
    # In-place arithmetic below: at ImageNet sizes, allocating fresh [H, W, 3] arrays dominates the time.
    img = _smooth_noise(rng, height, width, rng.uniform(1.0, 4.0), channels=3)
    img -= 0.5
    img *= 0.25
    img += bg
    # Pattern with random contrast, visible only where a smooth random mask allows, so that some crops
    # show background alone.
    visible = _soft_threshold(_smooth_noise(rng, height, width, 1.5)[..., 0], rng.uniform(0.0, 0.45), 5.0)
    mask = (rng.uniform(0.5, 1.0) * _texture(texture_spec, rng, height, width) * visible)[..., None]
    blend = fg - img
    blend *= mask
    img += blend

    # Occluding clutter: soft ellipses of arbitrary colour, drawn only inside their bounding boxes.
    for _ in range(int(rng.integers(1, 6))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.04, 0.22, size=2) * short
        y0, y1 = max(0, int(cy - ry)), min(height, int(cy + ry) + 1)
        x0, x1 = max(0, int(cx - rx)), min(width, int(cx + rx) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry
        xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
        alpha = rng.uniform(0.6, 1.0) * np.clip((1.0 - np.sqrt(xx * xx + yy * yy)) * 4.0, 0.0, 1.0)[..., None]
        colour = _hsv_to_rgb(rng.random(), rng.random(), rng.uniform(0.2, 1.0))
        img[y0:y1, x0:x1] += (colour - img[y0:y1, x0:x1]) * alpha

    # Camera-like global changes and sensor noise.
    img -= 0.5
    img *= rng.uniform(0.7, 1.15)
    img += 0.5 + rng.normal(0.0, 0.05)
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise *= rng.uniform(0.01, 0.05)
    img += noise
    np.clip(img, 0.0, 1.0, out=img)
    img *= 255.0
    img += 0.5
    return img.astype(np.uint8)


def _image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), label, index])


def _save(array: np.ndarray, path: Path, kind: str | None, quality: int) -> None:
    img = Image.fromarray(array, mode="RGB")
    if kind is None:
        img.save(path, "JPEG", quality=quality)
    elif kind == "grayscale":
        img.convert("L").save(path, "JPEG", quality=quality)
    elif kind == "cmyk":
        img.convert("CMYK").save(path, "JPEG", quality=quality)
    elif kind == "progressive":
        img.save(path, "JPEG", quality=quality, progressive=True)
    elif kind == "png_as_jpeg":
        img.save(path, "PNG")  # the extension says JPEG; the content is PNG, as in real ImageNet
    else:
        raise ValueError(f"unknown oddity kind {kind!r}")


def _plan_oddities(num_classes: int, num_per_class: dict[str, int]) -> dict[tuple[str, int, int], str]:
    """Choose which (split, class, index) files are odd, spread over classes and indices."""
    plan: dict[tuple[str, int, int], str] = {}
    kinds = [kind for kind, n in NUM_TRAIN_ODDITIES.items() for _ in range(n)]
    slots = [(c, k) for k in range(num_per_class["train"]) for c in range(num_classes)]
    if len(slots) < len(kinds):
        raise DataError(f"--oddities needs at least {len(kinds)} train images in all, got {len(slots)}")
    step = len(slots) // len(kinds)
    for i, kind in enumerate(kinds):
        c, k = slots[i * step]
        plan[("train", c, k)] = kind
    if num_per_class["val"] > 0:
        plan[("val", num_classes - 1, 0)] = "grayscale"
    return plan


def _file_name(spec: ClassSpec, index: int) -> str:
    return f"{spec.name.split('_')[0]}_{index:05d}.JPEG"


def _write_class(
    root: str,
    split: str,
    label: int,
    num_images: int,
    num_classes: int,
    seed: int,
    size_range: tuple[int, int],
    quality: int,
    odd: dict[int, str],
) -> int:
    """Write all images of one (split, class); a unit of work for the process pool."""
    specs = class_specs(num_classes)
    spec = specs[label]
    folder = Path(root) / split / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(num_images):
        array = render(specs, label, _image_rng(seed, split, label, k), size_range)
        _save(array, folder / _file_name(spec, k), odd.get(k), quality)
    return num_images


def _pool_context():
    return get_context("fork" if "fork" in get_all_start_methods() else "spawn")


def _written_files(out: Path, record: dict) -> list[Path]:
    """The files a synthesize call wrote, from its marker (class folders and counts), marker excluded."""
    per_split = {"train": record["num_train"], "val": record["num_val"]}
    files = []
    for split, total in per_split.items():
        per_class = total // max(1, record["num_classes"])
        for name in record["classes"]:
            files += [out / split / name / f"{name.split('_')[0]}_{k:05d}.JPEG" for k in range(per_class)]  # _file_name
    return files


def _own_files(out: Path) -> list[Path]:
    """The files an earlier call wrote in ``out`` (as its marker lists them); [] without a marker."""
    marker = out / MARKER_FILE
    if not marker.exists():
        return []
    try:
        return _written_files(out, json.loads(marker.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{marker} cannot be read ({err}): cannot tell which files of {out} data synth wrote; "
                        "delete the folder yourself or choose another") from err


def _write_marker(out: Path, record: dict) -> None:
    atomic_write_bytes(out / MARKER_FILE, (json.dumps(record, indent=2) + "\n").encode())


def _prepare_output(out: Path, force: bool) -> None:
    """Refuse a non-empty folder unless ``force``; never delete or mix with files this function did not write.

    With ``force``, a dataset an earlier call wrote here is replaced: exactly the files its marker lists
    are deleted. Any other file under ``train/`` or ``val/`` is refused even then (a synthetic set mixed
    into a real dataset would silently change both).
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; data synth writes a dataset folder there")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force:
        raise DataError(f"{out} is not empty (it holds {', '.join(entries[:3])}{' ...' if len(entries) > 3 else ''})"
                        "; write to a new or empty folder, or pass --force to replace a dataset `fastmeal data synth` "
                        "wrote there (only its own files are deleted)")
    own = _own_files(out)
    mine = set(own)
    for split in SPLITS:  # checked before anything is deleted
        if not (out / split).is_dir():
            continue
        foreign = next((p for p in (out / split).rglob("*") if not p.is_dir() and p not in mine), None)
        if foreign is not None:
            raise DataError(f"{out / split} holds files data synth did not write (e.g. {foreign}); it never mixes "
                            "a synthetic dataset into other data: choose another folder")
    for path in own:
        path.unlink(missing_ok=True)
    for folder in sorted({p.parent for p in own}, reverse=True) + [out / split for split in SPLITS]:
        with contextlib.suppress(OSError):  # only folders left empty go
            folder.rmdir()
    (out / MARKER_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def synthesize(
    out: str | Path,
    *,
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    seed: int,
    size_range: tuple[int, int] = (64, 112),
    oddities: bool = False,
    quality: int = 90,
    progress: bool = True,
    num_workers: int = 1,
    force: bool = False,
) -> dict:
    """Write a deterministic synthetic JPEG classification dataset in ImageFolder layout.

    Files are ``OUT/{train,val}/c<class>_<family>/c<class>_<index>.JPEG``; folder names sort in class
    order. ``out`` must be empty or new unless ``force``; then a dataset an earlier call wrote there
    (listed in its ``fastmeal_synthetic.json``) is replaced, and nothing else is deleted. Files of another
    origin under ``train/`` or ``val/`` are always refused.

    Args:
        out: output root.
        num_classes: number of classes (2 to a few hundred).
        train_per_class: train images per class.
        val_per_class: val images per class.
        seed: the same seed gives byte-identical files; another seed gives other images of the same classes.
        size_range: inclusive range of the short side in pixels; ``(375, 500)`` resembles ImageNet.
        oddities: also write ImageNet's odd files (grayscale, CMYK and progressive JPEGs, one PNG named
            ``.JPEG``) in train and one grayscale JPEG in val. Needs at least 8 train images in all.
        quality: JPEG quality.
        progress: show a progress bar over images.
        num_workers: processes that write classes in parallel (the files do not depend on it).
        force: write into a non-empty folder (see above).

    Raises:
        DataError: a bad count or size range (named by its ``fastmeal data synth`` option), or a folder it
            must not write into.

    Returns:
        Summary dict: ``root``, ``classes`` (folder names), ``num_classes``, ``num_train``, ``num_val``,
        ``seed``, ``size_range``, and ``oddities``: relative POSIX paths per kind (empty lists when off).
    """
    if num_classes < 2:
        raise DataError(f"--classes {num_classes}: a dataset needs at least 2 classes")
    if train_per_class < 1:
        raise DataError(f"--train-per-class {train_per_class}: each class needs at least 1 train image")
    if val_per_class < 0:
        raise DataError(f"--val-per-class {val_per_class} must be >= 0")
    lo, hi = size_range
    if not 8 <= lo <= hi:
        raise DataError(f"--size-range {lo} {hi}: the short side range must be LO HI with 8 <= LO <= HI")
    out = Path(out)
    specs = class_specs(num_classes)
    num_per_class = {"train": train_per_class, "val": val_per_class}
    plan = _plan_oddities(num_classes, num_per_class) if oddities else {}
    _prepare_output(out, force)

    odd_paths: dict[str, list[str]] = {kind: [] for kind in ODDITY_KINDS}
    for (split, c, k), kind in sorted(plan.items()):
        odd_paths[kind].append(f"{split}/{specs[c].name}/{_file_name(specs[c], k)}")
    summary = {
        "root": str(out),
        "classes": [spec.name for spec in specs],
        "num_classes": num_classes,
        "num_train": num_classes * train_per_class,
        "num_val": num_classes * val_per_class,
        "seed": seed,
        "size_range": [lo, hi],
        "quality": quality,
        "oddities": odd_paths,
    }
    # Written first (complete=false) so that a killed call's files can still be told apart and replaced
    # with --force; rewritten last with complete=true.
    _write_marker(out, {**summary, "complete": False})

    jobs = []
    for split in SPLITS:
        for c in range(num_classes):
            odd = {k: kind for (s, cc, k), kind in plan.items() if s == split and cc == c}
            jobs.append((str(out), split, c, num_per_class[split], num_classes, seed, (lo, hi), quality, odd))
    total = sum(job[3] for job in jobs)
    with tqdm(total=total, desc="synthesize", unit="img", disable=not progress_enabled(progress)) as bar:
        if num_workers <= 1:
            for job in jobs:
                raise_if_stopped()
                bar.update(_write_class(*job))
        else:
            # fork where available, like torch's DataLoader: the workers only run numpy and Pillow (never the
            # parent's torch thread pools), and spawn would re-import torch through fastmeal.data in every worker.
            pool = ProcessPoolExecutor(num_workers, mp_context=_pool_context())
            try:
                for future in as_completed([pool.submit(_write_class, *job) for job in jobs]):
                    raise_if_stopped()
                    bar.update(future.result())
            finally:
                pool.shutdown(cancel_futures=True)  # a stop does not wait for the classes not started

    _write_marker(out, {**summary, "complete": True})
    return summary
