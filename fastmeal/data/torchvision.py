"""The reference's input pipeline: ImageFolder + PIL + torchvision transforms + DataLoader.

This is what the original MEAL V2 code runs (SPEC, "The reference implementation's pipeline"), so it
is the reference mode of the benchmarks and the fallback when DALI is not installed:

* train: ``RandomResizedCrop(S, scale=(0.08, 1), ratio=(3/4, 4/3), bilinear)`` →
  ``RandomHorizontalFlip()`` → ``ToTensor()`` → ``Normalize(ImageNet mean, std)``, with the box and the
  flip taken from the crop plan (:func:`fastmeal.data.plan.plan_crops`) instead of torch's RNG: PIL crops
  the planned box and torchvision resizes it exactly as ``RandomResizedCrop`` does with that box
  (``F.resized_crop``), so the output is the reference's transform, bit for bit, given the box;
* val: ``Resize(int(256/224·S), bilinear)`` → ``CenterCrop(S)`` → ``ToTensor()`` → ``Normalize``;
* ``DataLoader`` with ``data.workers`` worker processes and ``pin_memory`` on CUDA.

Departures, none of which changes what a batch contains: the dataset is ImageFolder's file list from
:func:`fastmeal.data.common.scan_split` (identical order and labels) read with the same PIL loader but
with errors that name the file; the training sampler is always a ``DistributedSampler`` (a world of one
included) so that the order is a function of (seed, epoch), and a pass without ``set_epoch`` is the next
epoch; a train pass may start at any step (``set_epoch(epoch, start_step)``: the batch sampler begins
there, nothing before it is read); val shards are exact (no padding); workers are persistent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info
from torchvision import transforms
from torchvision.transforms import functional as TF

from fastmeal.config import Config
from fastmeal.data.base import LoaderBase
from fastmeal.data.common import (
    CROP_AREA,
    CROP_ASPECT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    DataError,
    Split,
    clamp_workers,
    epoch_order,
    load_rgb,
    next_decodable,
)
from fastmeal.data.index import DatasetIndex
from fastmeal.data.plan import plan_crops
from fastmeal.lifecycle import register_loader, unregister_loader, worker_init, workers_starting

log = logging.getLogger(__name__)

# The label of an evaluation slot whose file was corrupt (data.skip_corrupt=true): the row is dropped.
SKIPPED_LABEL = -1


def close_iterator(iterator: Any) -> None:
    """End a DataLoader iterator's worker processes now: the graceful way, then SIGKILL for any left.

    The iterators are what :func:`fastmeal.lifecycle.close_loaders` closes, not the loaders: after an
    exception, an iterator can outlive its loader in a cycle with the traceback.
    """
    workers = list(getattr(iterator, "_workers", ()))
    if any(getattr(w, "_parent_pid", os.getpid()) != os.getpid() for w in workers):
        # Inherited through a fork (a rank forked from a process that had loaders): not this process's
        # workers, and shutting them down from here would use the parent's queues.
        unregister_loader(iterator)
        return
    with contextlib.suppress(Exception):
        iterator._shutdown_workers()  # each worker reads its end marker and exits; its pids are unregistered
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)
    unregister_loader(iterator)


_BILINEAR = transforms.InterpolationMode.BILINEAR


def build_transform(split: str, image_size: int, eval_resize: int) -> transforms.Compose:
    """The reference's own transforms for ``split``; PIL image in, ``[3,S,S]`` fp32 out.

    The val loader uses it; the train loader replays the plan instead (:func:`planned_crop`), and the
    train transform here, with torch's RNG, is the reference that benchmarks and tests compare with.
    """
    if split == "train":
        head = [transforms.RandomResizedCrop(image_size, scale=CROP_AREA, ratio=CROP_ASPECT, interpolation=_BILINEAR),
                transforms.RandomHorizontalFlip()]
    else:
        head = [transforms.Resize(eval_resize, interpolation=_BILINEAR), transforms.CenterCrop(image_size)]
    return transforms.Compose([*head, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def planned_crop(img: Image.Image, box: tuple[int, int, int, int], flip: bool, image_size: int) -> torch.Tensor:
    """The reference's train transform with its random draws replaced by ``box`` and ``flip``.

    ``RandomResizedCrop.forward`` is ``F.resized_crop(img, *get_params(...), size, bilinear, antialias)``:
    the same call with the planned ``(top, left, height, width)``; then ``RandomHorizontalFlip``'s
    ``F.hflip`` when ``flip``, ``ToTensor``, ``Normalize``. PIL image in, ``[3,S,S]`` fp32 out.
    """
    top, left, height, width = box
    img = TF.resized_crop(img, top, left, height, width, [image_size, image_size], interpolation=_BILINEAR,
                          antialias=True)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


class FolderDataset(Dataset):
    """ImageFolder over a scanned :class:`Split` with the eval transform, with errors that name the file.

    ``__getitem__`` returns ``(image [3,S,S] fp32, label, skipped)`` where ``skipped`` is the tuple of
    corrupt paths that were replaced to produce this sample (empty unless ``skip_corrupt``). A corrupt
    file's slot is filled by the next decodable file in dataset order
    (:func:`fastmeal.data.common.next_decodable`), so a batch keeps its shape; in evaluation the slot's
    label is :data:`SKIPPED_LABEL` and the loader drops it, so the file is not counted (nor is a
    duplicate of another image).
    """

    def __init__(self, split: Split, transform: transforms.Compose, *, skip_corrupt: bool = False):
        self.paths = split.paths
        self.labels = split.labels
        self.transform = transform
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> tuple[Image.Image, int, tuple[str, ...]]:
        """``(image, the index read, skipped paths)``: the file, or the next decodable one with skip_corrupt."""
        try:
            return load_rgb(self.paths[index]), index, ()
        except CorruptImageError as err:
            if not self.skip_corrupt:
                raise CorruptImageError(f"{err}; set data.skip_corrupt=true to skip such files") from err
            bad = {self.paths[index]}
            index = next_decodable(self.paths, index + 1, bad)
            return load_rgb(self.paths[index]), index, tuple(sorted(bad))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        img, read, skipped = self._load(index)
        return self.transform(img), self.labels[read] if read == index else SKIPPED_LABEL, skipped


class PlannedDataset(FolderDataset):
    """The train split: items are ``(epoch, dataset index)``; each image is cropped as the plan says.

    ``__getitems__`` (what the DataLoader's fetcher calls with a whole batch) plans the batch in one
    vectorised call. A substituted corrupt file is cropped with the plan of the file actually read.
    """

    def __init__(self, index: DatasetIndex, *, seed: int, image_size: int, substitutes: dict[int, int],
                 skip_corrupt: bool = False):
        self.paths = list(index.paths)
        self.labels = index.labels.tolist()
        self.heights, self.widths = index.heights, index.widths
        self.seed, self.image_size = seed, image_size
        self.substitutes = dict(substitutes)
        self.skip_corrupt = skip_corrupt

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, tuple[str, ...]]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list[tuple[torch.Tensor, int, tuple[str, ...]]]:
        (epoch,) = {e for e, _ in items}  # a batch belongs to one epoch (PlannedBatches)
        loaded = [self._load(self.substitutes.get(i, i)) for _, i in items]
        reads = np.array([read for _, read, _ in loaded], dtype=np.int64)
        plan = plan_crops(self.seed, epoch, reads, self.heights[reads], self.widths[reads])
        out = []
        for k, (img, read, skipped) in enumerate(loaded):
            if img.size != (self.widths[read], self.heights[read]):
                raise DataError(f"{self.paths[read]} is {img.size[0]}x{img.size[1]} but the dataset index says "
                                f"{self.widths[read]}x{self.heights[read]}: the file changed during the run; "
                                "restart it to index the dataset again")
            out.append((planned_crop(img, plan.box(k), bool(plan.flip[k]), self.image_size), self.labels[read],
                        skipped))
        return out


class PlannedBatches(Sampler[list[tuple[int, int]]]):
    """The batch sampler of the train loader: one pass = the batches of ``epoch`` from ``start_step`` on.

    It holds the loader's sampler and counts, not the loader: no loader <-> DataLoader reference cycle, so
    the DataLoader and its workers go with the last reference to the loader, not at a later collection.
    """

    def __init__(self, sampler: Sampler[int], *, batch_size: int, num_batches: int, num_samples: int):
        self.sampler, self.batch_size = sampler, batch_size
        self.num_batches, self.num_samples = num_batches, num_samples
        self.epoch, self.start_step = 0, 0

    def __iter__(self):
        order = epoch_order(self.sampler, self.epoch, self.num_samples)
        b = self.batch_size
        for k in range(self.start_step, self.num_batches):
            yield [(self.epoch, int(i)) for i in order[k * b:(k + 1) * b]]

    def __len__(self) -> int:
        return self.num_batches - self.start_step


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
    with workers_starting():  # workers started here ignore the rank's signals from their first instant
        iterator = iter(loader)
    if getattr(iterator, "_workers", None):
        register_loader(iterator, close_iterator)
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
                 device: torch.device, batch_size: int, index: DatasetIndex | None = None,
                 drop_single_last: bool = False, transform: transforms.Compose | None = None):
        """``transform``: a val loader's own PIL → ``[3,S,S]`` transform instead of the SPEC eval transform
        (the transfer probe's bicubic resize and its model's normalisation); None for train."""
        super().__init__(cfg, split, split_name, rank=rank, world_size=world_size, device=device,
                         batch_size=batch_size, index=index, drop_single_last=drop_single_last)
        workers = clamp_workers(cfg.data.workers)
        if self.train:
            dataset: FolderDataset = PlannedDataset(index, seed=cfg.runtime.seed, image_size=cfg.data.image_size,
                                                    substitutes=self.substitutes, skip_corrupt=cfg.data.skip_corrupt)
            self._batches: PlannedBatches | None = PlannedBatches(self.sampler, batch_size=batch_size,
                                                                  num_batches=self.num_batches,
                                                                  num_samples=self.num_samples)
            order = {"batch_sampler": self._batches}
        else:
            transform = transform or build_transform("val", cfg.data.image_size, cfg.data.resolved_eval_resize)
            dataset = FolderDataset(split, transform, skip_corrupt=cfg.data.skip_corrupt)
            self._batches = None
            order = {"sampler": self.sampler, "batch_size": batch_size}
        # DataLoader workers are forked, as in the reference. A child forked while a DALI pipeline's threads
        # run deadlocks (seen with DALI 2.4 on the CPU), so then the workers come from a fresh forkserver.
        dali = sys.modules.get("fastmeal.data.dali")
        context = None
        if workers and dali is not None and len(dali.LIVE_PIPELINES):
            log.warning("a DALI pipeline lives in this process: DataLoader workers start from a forkserver "
                        "(forking now could deadlock them)")
            context = "forkserver"
        # No random number is drawn in the workers (the plan is a function of the item): their seeds do not
        # matter; the generator only keeps DataLoader from drawing its base seed from the global RNG.
        self._loader = DataLoader(dataset, **order, num_workers=workers, collate_fn=_collate,
                                  pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                  generator=torch.Generator().manual_seed(cfg.runtime.seed + rank),
                                  multiprocessing_context=context,
                                  # the rank handles SIGTERM/SIGUSR1 (preemption); its workers must not die of it
                                  worker_init_fn=worker_init,
                                  prefetch_factor=cfg.data.prefetch if workers else None)


    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._begin_pass()
        if self._batches is not None:
            self._batches.epoch, self._batches.start_step = epoch, start
        for images, labels, skipped in _worker_errors_named(self._loader):
            for path in skipped:
                if path not in self._skipped:
                    self._skipped.add(path)
                    log.warning("skipped corrupt image %s (data.skip_corrupt=true; %d skipped so far); %s", path,
                                len(self._skipped), "its slot in the batch holds the next decodable file" if self.train
                                else "not evaluated: the val total is smaller by the skipped files")
            if not self.train:  # evaluation counts each readable file once and no stand-in
                keep = labels != SKIPPED_LABEL
                if not bool(keep.all()):
                    images, labels = images[keep], labels[keep]
                if not len(labels):
                    continue
            images = images.to(self.device, non_blocking=True)
            yield (images.to(dtype=self.dtype, memory_format=torch.channels_last),
                   labels.to(self.device, non_blocking=True))
