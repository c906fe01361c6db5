"""Data: one loader interface over two backends, DALI (fast) and torchvision (the reference).

``build_loader(cfg, split)`` returns a :class:`Loader`: an iterable of ``(images, labels)`` already on
the training device, ``images`` normalised ``[B,3,S,S]`` in channels-last memory with the dtype of
:func:`fastmeal.data.common.images_dtype`, ``labels`` int64 class indices in sorted-folder order.
``data.backend=auto`` picks DALI when it imports and says so; ``dali`` without DALI fails with the
install command.

The train augmentation is the crop plan (:mod:`fastmeal.data.plan`): image ``i`` of epoch ``e`` is the
RandomResizedCrop box and flip ``plan_crops(runtime.seed, e, [i], height_i, width_i)``, the sizes from the
split's :class:`~fastmeal.data.index.DatasetIndex` (built once and cached). A train loader can start an
epoch at any step (``set_epoch(epoch, start_step)``) and says which images each step reads
(``epoch_indices``), so a resumed run sees exactly the batches of the uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from fastmeal.config import Config
from fastmeal.data.base import check_readable
from fastmeal.data.common import CorruptImageError, DataError, images_dtype, scan_split
from fastmeal.data.index import DatasetIndex, build_index
from fastmeal.distributed import per_rank_batch, resolve_device
from fastmeal.errors import SetupError
from fastmeal.registry import BACKENDS, resolve

__all__ = ["CorruptImageError", "DataError", "DatasetIndex", "Loader", "build_index", "build_loader", "check_loaders",
           "choose_backend", "dali_available", "images_dtype"]

log = logging.getLogger(__name__)


@runtime_checkable
class Loader(Protocol):
    """What the trainer reads. ``len()`` is the number of batches per epoch on this rank."""

    backend: str  # "dali" | "torchvision"
    classes: tuple[str, ...]  # class folder names; label i is classes[i]
    num_classes: int
    dataset_size: int  # samples in the whole split
    num_samples: int  # samples this rank sees per epoch
    index: DatasetIndex | None  # train: the split's files and image sizes (the plan's input); val: None

    @property
    def num_skipped(self) -> int:
        """Corrupt files skipped so far (``data.skip_corrupt=true``)."""
        ...

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next pass is epoch ``epoch`` from step ``start_step`` (the steps before it are not read)."""
        ...

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Dataset indices this rank reads in ``epoch``, in order; step k's batch is ``[k·B:(k+1)·B]``."""
        ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


_announced: set[str] = set()


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # the `nvidia` namespace package itself is absent
        return False


def choose_backend(requested: str) -> str:
    """``auto`` → the first backend of :data:`fastmeal.registry.BACKENDS` that is installed (DALI, then
    torchvision); a named backend that is not installed fails with its install command."""
    if requested == "auto":
        return next(name for name in BACKENDS if resolve(BACKENDS, name).available())
    if requested not in BACKENDS:
        raise DataError(f"data.backend={requested!r} is not one of auto, {', '.join(BACKENDS)}")
    loader = resolve(BACKENDS, requested)
    if not loader.available():
        raise DataError(f"data.backend={requested} is not installed; install it with `{loader.install_hint}` or use "
                        "data.backend=auto")
    return requested


def build_loader(cfg: Config, split: str, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None, drop_single_last: bool = False) -> Loader:
    """The loader of ``split`` ("train" or "val") for this rank.

    Args:
        cfg: the run's config; ``data.*`` and ``runtime.seed`` are read.
        split: ``"train"`` (augmented, reshuffled every epoch, sharded) or ``"val"`` (deterministic, every
            sample exactly once over all ranks).
        rank: this process's rank; ``world_size``: the number of ranks.
        device: where batches are delivered; ``None`` resolves ``runtime.device``.
        drop_single_last: leave out a last train batch of one image per rank (a training run: BatchNorm cannot
            train on it); the soft-label bank keeps it (another batch size may need its record).

    Returns:
        A :class:`Loader`. The per-rank batch is ``data.batch_size / world_size`` for train and
        ``data.resolved_eval_batch_size / world_size`` for val (both config values are global).
    """
    if split not in ("train", "val"):
        raise DataError(f"split={split!r} must be 'train' or 'val'")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    device = device if device is not None else resolve_device(cfg.runtime.device)
    global_batch = cfg.data.batch_size if split == "train" else cfg.data.resolved_eval_batch_size
    batch_size = per_rank_batch(global_batch, world_size)
    backend = choose_backend(cfg.data.backend)
    if cfg.data.backend == "auto" and rank == 0 and backend not in _announced:
        _announced.add(backend)  # once per process, not once per split
        skipped = [f"{name} is not installed: `{resolve(BACKENDS, name).install_hint}`" for name in BACKENDS
                   if name != backend and list(BACKENDS).index(name) < list(BACKENDS).index(backend)]
        log.info("data.backend=auto chose %s%s", backend, f" ({'; '.join(skipped)})" if skipped else "")
    scanned = scan_split(cfg.data.root, split)
    # Both splits' headers are read at start-up (cached): a val file that cannot decode fails now, not after
    # the first epoch. Only the train loader keeps the index (the crop plan reads its sizes).
    index = _shared_index(cfg, scanned, rank=rank, world_size=world_size)
    if split != "train":
        check_readable(index, cfg.data.skip_corrupt)
        index = None
    loader = resolve(BACKENDS, backend)
    return loader(cfg, scanned, split, rank=rank, world_size=world_size, device=device, batch_size=batch_size,
                  index=index, drop_single_last=drop_single_last and split == "train")


def _shared_index(cfg: Config, split, *, rank: int, world_size: int) -> DatasetIndex:
    """A split's index; in a process group rank 0 builds (and caches) it while the others wait."""
    import torch.distributed as tdist

    grouped = world_size > 1 and tdist.is_available() and tdist.is_initialized()
    workers = max(1, cfg.data.workers)
    progress = rank == 0 and cfg.logging.progress_bar
    if grouped and rank != 0:
        tdist.barrier()  # rank 0 has cached it: read it from there
        return build_index(split, workers=workers, progress=False)
    index = build_index(split, workers=workers, progress=progress)
    if grouped:
        tdist.barrier()
    return index


def check_loaders(cfg: Config, train_loader: Any, val_loader: Any | None) -> None:
    """Fail with the fix when the splits' classes differ from each other or from ``model.num_classes``."""
    train_classes = getattr(train_loader, "classes", None)
    val_classes = getattr(val_loader, "classes", None) if val_loader is not None else None
    if train_classes is not None and val_classes is not None and tuple(train_classes) != tuple(val_classes):
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        parts = [f"only in train/: {', '.join(only_train[:10])}" if only_train else "",
                 f"only in val/: {', '.join(only_val[:10])}" if only_val else ""]
        differ = "; ".join(p for p in parts if p) or "the same names in another order"
        raise SetupError(f"data.root={cfg.data.root!r}: the train split has {len(train_classes)} classes and the val "
                         f"split {len(val_classes)}, and their names differ ({differ}); labels come from the sorted "
                         "folder names, so both splits must hold the same class folders (fastmeal data check lists "
                         "them)")
    for split, loader in (("train", train_loader), ("val", val_loader)):
        if loader is not None and loader.num_classes != cfg.model.num_classes:
            raise SetupError(f"data.root={cfg.data.root!r}: the {split} split has {loader.num_classes} classes but "
                             f"model.num_classes={cfg.model.num_classes}; set --set model.num_classes="
                             f"{loader.num_classes} (teachers, student and dataset must agree)")
