"""What every data backend shares of the Loader protocol; a backend is a subclass and a line in
:data:`fastmeal.registry.BACKENDS`."""

from __future__ import annotations

import logging

import numpy as np
import torch

from fastmeal.config import Config
from fastmeal.data.common import (
    CorruptImageError,
    Split,
    build_sampler,
    epoch_counts,
    epoch_order,
    images_dtype,
    next_decodable,
)
from fastmeal.data.index import DatasetIndex

log = logging.getLogger("fastmeal.data")


def check_readable(index: DatasetIndex, skip_corrupt: bool) -> None:
    """Fail at start-up, naming them, on files without a readable image header (unless ``data.skip_corrupt``)."""
    bad_paths = [index.paths[i] for i in index.unreadable]
    if bad_paths and not skip_corrupt:
        shown = ", ".join(bad_paths[:5]) + (" ..." if len(bad_paths) > 5 else "")
        raise CorruptImageError(f"cannot decode image file(s) {shown} ({len(bad_paths)} without a readable "
                                "image header); set data.skip_corrupt=true to skip such files")


class LoaderBase:
    """What both backends share of the Loader protocol (``fastmeal.data.Loader``).

    The order of an epoch (:meth:`epoch_indices`), where a pass starts (:meth:`set_epoch`) and, for train,
    the dataset index whose sizes the crop plan reads. Subclasses add ``backend`` and ``__iter__``, which
    takes its ``(epoch, start_step)`` from :meth:`_begin_pass`, and record skipped corrupt files in
    ``_skipped``.
    """

    install_hint = ""  # how to install the backend, for the error when it is asked for and absent

    @staticmethod
    def available() -> bool:
        """Whether the backend's libraries are installed (``data.backend=auto`` takes the first that is)."""
        return True

    def __init__(self, cfg: Config, split: Split, split_name: str, *, rank: int, world_size: int,
                 device: torch.device, batch_size: int, index: DatasetIndex | None = None,
                 drop_single_last: bool = False) -> None:
        self.device = device
        self.dtype = images_dtype(cfg, device)
        self.train = split_name == "train"
        self.seed = cfg.runtime.seed
        self.rank = rank
        self.classes = split.classes
        self.num_classes = len(split.classes)
        self.dataset_size = len(split)
        self.batch_size = batch_size
        self.index = index
        if self.train and index is None:
            raise ValueError("a train loader needs the split's DatasetIndex (the crop plan reads its image sizes)")
        self.sampler = build_sampler(split_name, len(split), rank=rank, world_size=world_size, seed=cfg.runtime.seed)
        drop_last = self.train and cfg.data.last_batch == "drop"
        per_rank = len(self.sampler)
        if drop_single_last and not drop_last and per_rank % batch_size == 1 and per_rank > 1:
            # BatchNorm cannot normalise one image in training mode ("Expected more than 1 value per channel").
            drop_last = True
            if rank == 0:
                log.warning("the last training batch of each epoch would hold 1 image per rank, which BatchNorm "
                            "cannot normalise: it is left out (1 of %d images per rank and epoch; the same in a "
                            "resumed run)", per_rank)
        self.num_batches, self.num_samples = epoch_counts(per_rank, batch_size, drop_last)
        self._skipped: set[str] = set()
        self._epoch = 0  # the epoch of the next pass
        self._start_step = 0  # and the step it starts at
        # dataset index -> the index read in its place (corrupt files, data.skip_corrupt=true)
        self.substitutes: dict[int, int] = {}
        if index is not None and len(index.unreadable):
            self._substitute_unreadable(index, cfg.data.skip_corrupt)

    def _substitute_unreadable(self, index: DatasetIndex, skip_corrupt: bool) -> None:
        """Files without a readable header fail now (or are replaced now), not hours into the run."""
        check_readable(index, skip_corrupt)
        bad: set[str] = {index.paths[i] for i in index.unreadable}
        for i in index.unreadable.tolist():
            self.substitutes[i] = next_decodable(index.paths, i + 1, bad)
            self._skipped.add(index.paths[i])
            logging.getLogger("fastmeal.data").warning(
                "skipped corrupt image %s (data.skip_corrupt=true; %d skipped so far); its slot holds %s",
                index.paths[i], len(self._skipped), index.paths[self.substitutes[i]])

    @property
    def num_skipped(self) -> int:
        """Corrupt files skipped so far (distinct paths), with ``data.skip_corrupt=true``."""
        return len(self._skipped)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next pass is epoch ``epoch`` from step ``start_step``; the steps before it are not decoded.

        The order is the sampler's for (runtime.seed, epoch); a train image's crop is the plan's for
        (runtime.seed, epoch, image). Without a call, a pass is the epoch after the previous one, from step 0.
        """
        if epoch < 0 or not 0 <= start_step <= self.num_batches:
            raise ValueError(f"set_epoch(epoch={epoch}, start_step={start_step}): the epoch must be >= 0 and the "
                             f"step in [0, {self.num_batches}]")
        self._epoch, self._start_step = epoch, start_step

    def _begin_pass(self) -> tuple[int, int]:
        """``(epoch, start_step)`` of the pass that starts now; the next one is the following epoch, from 0."""
        epoch, start = self._epoch, self._start_step
        self._epoch, self._start_step = epoch + 1, 0
        return epoch, start

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The dataset indices this rank reads in ``epoch``, in order: step k reads ``[k·B:(k+1)·B]``.

        Slots of corrupt files hold the file's index (``substitutes`` says which file is read instead).
        """
        return epoch_order(self.sampler, epoch, self.num_samples)

    def _step_batches(self, epoch: int, start_step: int) -> list[np.ndarray]:
        """The batches of ``epoch`` from ``start_step`` on, as arrays of dataset indices."""
        order = self.epoch_indices(epoch)
        b = self.batch_size
        return [order[k * b:(k + 1) * b] for k in range(start_step, self.num_batches)]

    def __len__(self) -> int:
        return self.num_batches
