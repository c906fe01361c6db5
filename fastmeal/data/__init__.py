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

import atexit
import contextlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from fastmeal.config import Config
from fastmeal.data.common import CorruptImageError, DataError, images_dtype, scan_split
from fastmeal.data.index import DatasetIndex, build_index
from fastmeal.distributed import per_rank_batch, resolve_device

__all__ = ["CorruptImageError", "DataError", "DatasetIndex", "Loader", "build_index", "build_loader", "choose_backend",
           "close_loaders",
           "dali_available", "images_dtype"]

log = logging.getLogger(__name__)

DALI_INSTALL = "pip install nvidia-dali-cuda120  (CUDA 13: nvidia-dali-cuda130)"


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


def close_loaders() -> None:
    """End the worker processes of every loader of this process (``fastmeal`` calls it on every exit path).

    Also registered with ``atexit`` ahead of multiprocessing's own exit handler, which would otherwise
    ``terminate()`` and then ``join()`` the workers forever: they ignore SIGTERM, on purpose (preemption).
    """
    module = sys.modules.get("fastmeal.data.torchvision")
    if module is None:
        return
    for iterator in list(module.LIVE_ITERATORS):
        module.close_iterator(iterator)


def _close_at_exit() -> None:
    """At interpreter exit: close every tracked loader, then SIGKILL any daemonic child still alive.

    multiprocessing's own exit handler (it runs after this one) ``terminate()``s daemonic children with
    SIGTERM and joins them; loader workers ignore SIGTERM, so a worker that no tracked iterator owns any
    more (one whose iterator is being collected, or a DataLoader made outside fastmeal's loaders) would
    make the process hang at exit. Killing daemonic children is what that handler means to do anyway.
    """
    import multiprocessing
    import signal

    close_loaders()
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if not children:
        return
    # torch's SIGCHLD handler raises when it sees a worker killed; the process is exiting, so it goes.
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


def _register_exit_handler() -> None:
    import multiprocessing.util  # noqa: F401 - registers multiprocessing's atexit handler first; ours runs before it

    atexit.register(_close_at_exit)


_register_exit_handler()


def dali_available() -> bool:
    """Whether ``nvidia.dali`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # the `nvidia` namespace package itself is absent
        return False


def choose_backend(requested: str) -> str:
    """``auto`` → ``dali`` when DALI is installed, else ``torchvision``; ``dali`` without DALI fails."""
    if requested == "torchvision":
        return "torchvision"
    if requested == "dali":
        if not dali_available():
            raise DataError(f"data.backend=dali but NVIDIA DALI is not installed; install it with `{DALI_INSTALL}` "
                            "or use data.backend=torchvision")
        return "dali"
    if requested != "auto":
        raise DataError(f"data.backend={requested!r} is not one of auto, dali, torchvision")
    return "dali" if dali_available() else "torchvision"


def build_loader(cfg: Config, split: str, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None) -> Loader:
    """The loader of ``split`` ("train" or "val") for this rank.

    Args:
        cfg: the run's config; ``data.*`` and ``runtime.seed`` are read.
        split: ``"train"`` (augmented, reshuffled every epoch, sharded) or ``"val"`` (deterministic, every
            sample exactly once over all ranks).
        rank: this process's rank; ``world_size``: the number of ranks.
        device: where batches are delivered; ``None`` resolves ``runtime.device``.

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
        log.info("data.backend=auto chose %s%s", backend,
                 "" if backend == "dali" else f" (DALI is not installed: `{DALI_INSTALL}` for the fast loader)")
    scanned = scan_split(cfg.data.root, split)
    index = _shared_index(cfg, scanned, rank=rank, world_size=world_size) if split == "train" else None
    kwargs = dict(rank=rank, world_size=world_size, device=device, batch_size=batch_size, index=index)
    if backend == "dali":
        from fastmeal.data.dali import DaliLoader

        return DaliLoader(cfg, scanned, split, **kwargs)
    from fastmeal.data.torchvision import TorchvisionLoader

    return TorchvisionLoader(cfg, scanned, split, **kwargs)


def _shared_index(cfg: Config, split, *, rank: int, world_size: int) -> DatasetIndex:
    """The train split's index; in a process group rank 0 builds (and caches) it while the others wait."""
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
