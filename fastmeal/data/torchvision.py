"""The reference's input pipeline: ImageFolder + PIL + torchvision transforms + DataLoader.

This is what the original MEAL V2 code runs (SPEC, "The reference implementation's pipeline"), so it
is the reference mode of the benchmarks and the fallback when DALI is not installed:

* train: ``RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3), bilinear)`` →
  ``RandomHorizontalFlip()`` → ``ToTensor()`` → ``Normalize(ImageNet mean, std)``;
* val: ``Resize(int(256/224·S), bilinear)`` → ``CenterCrop(S)`` → ``ToTensor()`` → ``Normalize``;
* ``DataLoader`` with ``data.workers`` worker processes and ``pin_memory`` on CUDA.

Departures, none of which changes what a batch contains: the dataset is ImageFolder's file list from
:func:`fastmeal.data.common.scan_split` (identical order and labels) read with the same PIL loader but
with errors that name the file; the training sampler is always a ``DistributedSampler`` (a world of one
included) so that the order is a function of (seed, epoch), and a pass without ``set_epoch`` is the next
epoch; val shards are exact (no padding); workers are persistent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import weakref
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, default_collate, get_worker_info
from torchvision import transforms

from fastmeal.config import Config
from fastmeal.data.common import (
    CROP_AREA,
    CROP_ASPECT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    LoaderBase,
    Split,
    build_sampler,
    clamp_workers,
    epoch_counts,
    load_rgb,
    next_decodable,
)
from fastmeal.distributed import ignore_preemption_signals

log = logging.getLogger(__name__)

# Every loader with worker processes, for close_loaders() on every exit path.
LIVE_LOADERS: weakref.WeakSet[TorchvisionLoader] = weakref.WeakSet()


def build_transform(split: str, image_size: int, eval_resize: int) -> transforms.Compose:
    """The reference's transforms for ``split`` (module docstring); PIL image in, ``[3,S,S]`` fp32 out."""
    bilinear = transforms.InterpolationMode.BILINEAR
    if split == "train":
        head = [transforms.RandomResizedCrop(image_size, scale=CROP_AREA, ratio=CROP_ASPECT, interpolation=bilinear),
                transforms.RandomHorizontalFlip()]
    else:
        head = [transforms.Resize(eval_resize, interpolation=bilinear), transforms.CenterCrop(image_size)]
    return transforms.Compose([*head, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class FolderDataset(Dataset):
    """ImageFolder over a scanned :class:`Split`, with errors that name the file.

    ``__getitem__`` returns ``(image [3,S,S] fp32, label, skipped)`` where ``skipped`` is the tuple of
    corrupt paths that were replaced to produce this sample (empty unless ``skip_corrupt``). A corrupt
    file's slot is filled by the next decodable file in dataset order
    (:func:`fastmeal.data.common.next_decodable`), so the epoch keeps its sample count.
    """

    def __init__(self, split: Split, transform: transforms.Compose, *, skip_corrupt: bool = False):
        self.split = split
        self.paths = split.paths
        self.labels = split.labels
        self.transform = transform
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        try:
            return self.transform(load_rgb(self.paths[index])), self.labels[index], ()
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise CorruptImageError(f"{err}; set data.skip_corrupt=true to skip such files") from err
            bad = {self.paths[index]}
            index = next_decodable(self.paths, index + 1, bad)
            return self.transform(load_rgb(self.paths[index])), self.labels[index], tuple(sorted(bad))


def _collate(batch: list[tuple[torch.Tensor, int, tuple[str, ...]]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """default_collate, but the images are stacked straight into channels-last memory.

    The loader hands out channels-last batches; stacking into that layout here, in the worker, saves the
    main process a second full copy of every batch. Inside a worker the batch is allocated in shared
    memory, as default_collate does, so that handing it to the main process copies nothing.
    """
    first = batch[0][0]
    shape = (len(batch), *first.shape)  # [B, 3, S, S]
    if get_worker_info() is not None:
        storage = first._typed_storage()._new_shared(math.prod(shape), device=first.device)
        images = first.new(storage).resize_(shape)
    else:
        images = first.new_empty(shape)
    images = images.as_strided(shape, torch.empty(shape, device="meta").to(memory_format=torch.channels_last).stride())
    torch.stack([img for img, _, _ in batch], out=images)
    labels = default_collate([label for _, label, _ in batch])
    skipped = [p for _, _, bad in batch for p in bad]
    return images, labels, skipped


def _worker_errors_named(loader: DataLoader) -> Iterator:
    """Iterate ``loader``; a worker's CorruptImageError comes out with its own message, not the worker's traceback."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except CorruptImageError as err:
            # torch re-raises a worker's exception with the whole worker traceback as its message.
            last = str(err).strip().splitlines()[-1]
            raise CorruptImageError(last.split(": ", 1)[1] if last.startswith("fastmeal.") else last) from None
        yield batch


class TorchvisionLoader(LoaderBase):
    """Batches ``(images [B,3,S,S] channels-last, labels [B] int64)`` on ``device`` (the Loader protocol)."""

    backend = "torchvision"

    def __init__(self, cfg: Config, split: Split, split_name: str, *, rank: int, world_size: int,
                 device: torch.device, batch_size: int):
        super().__init__(cfg, split, device=device, batch_size=batch_size)
        self.split_name = split_name
        train = split_name == "train"
        dataset = FolderDataset(split, build_transform(split_name, cfg.data.image_size, cfg.data.resolved_eval_resize),
                                skip_corrupt=cfg.data.skip_corrupt)
        self.sampler = build_sampler(split_name, len(dataset), rank=rank, world_size=world_size, seed=cfg.runtime.seed)
        drop_last = train and cfg.data.last_batch == "drop"
        self.num_batches, self.num_samples = epoch_counts(len(self.sampler), batch_size, drop_last)
        workers = clamp_workers(cfg.data.workers)
        # Worker seeds come from this generator: runtime.seed + rank gives each rank its own augmentations.
        generator = torch.Generator().manual_seed(cfg.runtime.seed + rank)
        # DataLoader workers are forked, as in the reference. A child forked while a DALI pipeline's threads
        # run deadlocks (seen with DALI 2.4 on the CPU), so then the workers come from a fresh forkserver.
        dali = sys.modules.get("fastmeal.data.dali")
        context = None
        if workers and dali is not None and len(dali.LIVE_PIPELINES):
            log.warning("a DALI pipeline lives in this process: DataLoader workers start from a forkserver "
                        "(forking now could deadlock them)")
            context = "forkserver"
        self._loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                  collate_fn=_collate, pin_memory=device.type == "cuda", drop_last=drop_last,
                                  persistent_workers=workers > 0, generator=generator, multiprocessing_context=context,
                                  # the rank handles SIGTERM/SIGUSR1 (preemption); its workers must not die of it
                                  worker_init_fn=ignore_preemption_signals,
                                  prefetch_factor=cfg.data.prefetch if workers else None)
        LIVE_LOADERS.add(self)

    def close(self) -> None:
        """End the worker processes now (idempotent); the loader can still be iterated afterwards.

        Called on every exit path (``fastmeal.data.close_loaders``): the workers ignore SIGTERM (the rank
        handles preemption), so multiprocessing's exit-time ``terminate()`` + ``join()`` would wait on them
        forever.
        """
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is None:
            return
        workers = list(getattr(iterator, "_workers", ()))
        with contextlib.suppress(Exception):
            iterator._shutdown_workers()  # the graceful way: each worker reads its end marker and exits
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        self._loader._iterator = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Without set_epoch the next pass is the next epoch (the DALI backend does the same), not a
        # replay of the last order as a bare DistributedSampler would give.
        self.sampler.set_epoch(self._epoch)
        self._epoch += 1
        for images, labels, skipped in _worker_errors_named(self._loader):
            for path in skipped:
                if path not in self._skipped:
                    self._skipped.add(path)
                    log.warning("skipped corrupt image %s (data.skip_corrupt=true; %d skipped so far); its slot "
                                "in the batch holds the next decodable file", path, len(self._skipped))
            images = images.to(self.device, non_blocking=True)
            yield (images.to(dtype=self.dtype, memory_format=torch.channels_last),
                   labels.to(self.device, non_blocking=True))
