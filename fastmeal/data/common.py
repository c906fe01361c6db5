"""What both loader backends share: the dataset scan, the sampler, the constants, the dtype and corrupt-file rules.

The DALI and torchvision backends read the same list of files in the same order, with the same labels
(ImageFolder's: class index = sorted folder order), and hand out batches with the same dtype and memory
layout. Everything that decides *what* a sample is lives here; the backends only decide *how* it is
decoded and augmented.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DistributedSampler, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from fastmeal.config import Config

# ImageNet channel statistics on [0, 1] pixels: the reference's transforms.Normalize (SPEC, "Data").
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# RandomResizedCrop's ranges in the reference (torchvision defaults, SPEC "Data"): area fraction and
# width/height aspect ratio.
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3.0 / 4.0, 4.0 / 3.0)

SPLITS = ("train", "val")

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A dataset that cannot be read as asked: a missing or empty split, a bad folder."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded; the message names the file."""


@dataclass(frozen=True)
class Split:
    """One split of an ImageFolder dataset, in ImageFolder's order.

    Attributes:
        root: the split folder (``<data.root>/<split>``).
        classes: class folder names, sorted; the label of ``classes[i]`` is ``i``.
        samples: ``(path, label)`` pairs, class by class, files sorted by name inside each class
            (exactly ``torchvision.datasets.ImageFolder(root).samples``).
    """

    root: str
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


def scan_split(data_root: str | os.PathLike, split: str) -> Split:
    """List ``<data_root>/<split>/<class>/<file>`` the way ImageFolder does, with clear errors.

    Uses torchvision's own ``find_classes``/``make_dataset`` (the reference's ImageFolder) so that the
    order and the labels cannot drift from it; files are kept when their extension is one ImageFolder
    accepts (``.JPEG`` included, case-insensitively).

    Raises:
        DataError: ``data_root`` is unset or missing, the split folder is missing, it has no class
            folders, or a class folder has no image file. The message names the folder.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    if not str(data_root):
        raise DataError("data.root is empty; set it to an ImageFolder dataset (root/train/<class>/*.JPEG), "
                        "e.g. --set data.root=/data/imagenet, or generate one with `fastmeal data synth OUT`")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} does not exist or is not a folder")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is missing: data.root={str(root)!r} must hold {split}/<class>/<image> "
                        "(ImageFolder layout)")
    try:
        classes, class_to_idx = find_classes(split_dir)
    except FileNotFoundError as err:  # "Couldn't find any class folder in ..."
        raise DataError(f"{split_dir} is empty: no class folders in it ({err})") from err
    loop = find_symlink_loop(split_dir)
    if loop is not None:
        raise DataError(f"{loop[0]} is a symbolic link to {loop[1]}, a folder it is inside of: ImageFolder follows "
                        "links, so every image above it would be listed again (and under this class) without end. "
                        "Remove the link (or replace it by the folder it should point to)")
    samples = make_dataset(split_dir, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = {c: 0 for c in classes}
    for _, label in samples:
        counts[classes[label]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        shown = ", ".join(str(split_dir / c) for c in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise DataError(f"{len(empty)} class folder(s) of {split_dir} hold no image "
                        f"(extensions {', '.join(IMG_EXTENSIONS)}): {shown}")
    return Split(root=str(split_dir), classes=tuple(classes), samples=tuple(samples))


def find_symlink_loop(root: str | os.PathLike) -> tuple[str, str] | None:
    """The first folder link under ``root`` that leads back into a folder it is reached through, or None.

    ImageFolder (``os.walk(followlinks=True)``) follows folder links without noticing a loop: a link
    ``train/c000/up -> ..`` lists the whole split again under class 0, to the depth the OS allows.
    A loop is refused rather than skipped: a dataset never needs one, and a skipped link would leave
    the user's data silently different from what they laid out. Links to other folders are fine.

    Returns:
        ``(link path, its resolved target)``.
    """
    stack = [(os.fspath(root), frozenset({os.path.realpath(root)}))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # unreadable: make_dataset reports what it cannot list
        for entry in entries:
            if not entry.is_dir(follow_symlinks=True):
                continue
            real = os.path.realpath(entry.path)
            if entry.is_symlink() and real in ancestors:
                return entry.path, real
            stack.append((entry.path, ancestors | {real}))
    return None


def images_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype of the image batches: what the teachers read, so that no conversion pass is needed.

    fp32 on the CPU and with ``precision.mode=fp32`` (the reference's numerics); otherwise the teacher
    engine's dtype (``teacher_engine.dtype``: fp16 by default, bf16 by option).
    """
    if device.type != "cuda" or cfg.precision.mode == "fp32":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.teacher_engine.dtype]


class EvalShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: every sample exactly once over all ranks, no padding.

    ``DistributedSampler`` pads the last shard with repeated samples, which would count some val
    images twice; eval must count each once (SPEC: top-1/top-5 on the full val set).
    """

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Eval order does not depend on the epoch (the same interface as DistributedSampler)."""


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, without making the host wait for the GPU.

    A ``non_blocking`` copy from pageable memory may synchronise with the stream (CUDA's documented
    behaviour: it stages the data through a pinned buffer), so the host would wait for everything queued
    before it, e.g. the previous step's backward. A copy from pinned memory is truly asynchronous; torch's
    caching host allocator keeps the pinned block until the copy has run.
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def build_sampler(split: str, num_samples: int, *, rank: int, world_size: int, seed: int) -> Sampler[int]:
    """Which samples this rank reads, in which order; both backends use it, so they shard identically.

    train: the reference's ``DistributedSampler`` (a fresh permutation of seed + epoch every epoch, each
    rank taking every ``world_size``-th index; the shards are padded with repeats to ``ceil(N/W)``
    samples each so that every rank runs the same number of steps). With a world of one it is a seeded
    permutation per epoch, like the single-GPU reference's ``shuffle=True``. val: :class:`EvalShardSampler`.
    """
    if split == "train":
        # DistributedSampler only needs len(dataset); a range stands in for the dataset.
        return DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                  drop_last=False)
    return EvalShardSampler(num_samples, rank, world_size)


def epoch_order(sampler: Sampler[int], epoch: int, num_samples: int) -> np.ndarray:
    """The first ``num_samples`` dataset indices of ``sampler``'s order for ``epoch`` (int64)."""
    sampler.set_epoch(epoch)
    return np.fromiter(sampler, dtype=np.int64)[:num_samples]


def epoch_counts(samples_per_rank: int, batch_size: int, drop_last: bool) -> tuple[int, int]:
    """``(batches, samples)`` this rank yields per epoch: the last batch is partial unless dropped."""
    if drop_last:
        num_batches = samples_per_rank // batch_size
        if num_batches == 0:
            raise DataError(f"{samples_per_rank} images per rank make no full batch of {batch_size} with "
                            "data.last_batch=drop; lower data.batch_size or use data.last_batch=keep")
        return num_batches, num_batches * batch_size
    return math.ceil(samples_per_rank / batch_size), samples_per_rank


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what a SLURM/cgroup job was given)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_clamp_logged: set[tuple[int, int]] = set()


def clamp_workers(requested: int) -> int:
    """``data.workers`` capped at the CPUs this process has (said once, not per loader)."""
    cpus = available_cpus()
    if requested <= cpus:
        return requested
    if (requested, cpus) not in _clamp_logged:
        _clamp_logged.add((requested, cpus))
        log.info("data.workers=%d but this process has %d CPU(s): using %d loader workers", requested, cpus, cpus)
    return cpus


def load_rgb(path: str) -> Image.Image:
    """Decode one file to RGB with PIL, as the reference's ``pil_loader``, or raise naming the file.

    PIL decodes by content, not by extension (a PNG named ``.JPEG`` works) and ``convert("RGB")``
    turns grayscale and CMYK into RGB. A zero-byte, truncated or otherwise undecodable file raises
    :class:`CorruptImageError` with the path (PIL's own message for a truncated JPEG does not name it).
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot decode image file {path}: {err}") from err


def next_decodable(paths: list[str] | tuple[str, ...], start: int, bad: set[str]) -> int:
    """The index of the first file at or after ``start`` (cyclically) that PIL decodes; ``bad`` grows.

    The rule both backends use with ``data.skip_corrupt=true`` to fill a corrupt file's slot, so that
    an epoch keeps its sample count and every rank keeps the same number of batches (no DDP hang).
    """
    n = len(paths)
    for k in range(n):
        i = (start + k) % n
        if paths[i] in bad:
            continue
        try:
            load_rgb(paths[i])
            return i
        except CorruptImageError:
            bad.add(paths[i])
    raise DataError(f"no file of {os.path.dirname(os.path.dirname(paths[0]))} can be decoded")
