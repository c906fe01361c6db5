"""Training from a bank: the train loader's crops, each with the record the builder stored for it.

:class:`BankLoader` wraps the run's train loader (the Loader protocol) and adds to every batch the
records of its images: step ``k`` of epoch ``e`` on a rank holds dataset images
``epoch_indices(e)[k·B:(k+1)·B]``, whose crops are the crop plan's for ``(seed, e, i)`` — the crops
the teachers saw when the bank was built. Batches are :class:`~fastmeal.batch.Batch` es whose targets
hold ``probs`` ``[B, K]`` fp16 and ``classes`` ``[B, K]`` int16, on the training device.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fastmeal.bank import store
from fastmeal.bank.build import check_bank_config, run_identity
from fastmeal.batch import Batch
from fastmeal.config import Config
from fastmeal.data.common import host_to_device

log = logging.getLogger("fastmeal.bank")


class BankLoader:
    """A train loader whose batches carry their bank records; everything else is the wrapped loader's."""

    def __init__(self, loader: Any, reader: store.BankReader, device: torch.device) -> None:
        self.loader = loader
        self.reader = reader
        self.device = device
        self._epoch = 0
        self._start_step = 0

    def __getattr__(self, name: str) -> Any:  # backend, classes, num_classes, dataset_size, index, ...
        if name in ("loader", "reader", "device"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next pass is epoch ``epoch`` from step ``start_step`` (its records follow the same steps)."""
        self._epoch, self._start_step = epoch, start_step
        if start_step:
            self.loader.set_epoch(epoch, start_step=start_step)
        else:
            self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Batch]:
        epoch, step = self._epoch, self._start_step
        self._epoch, self._start_step = epoch + 1, 0  # like the loaders: a pass without set_epoch is the next epoch
        indices = np.asarray(self.loader.epoch_indices(epoch), dtype=np.int64)
        batch = self.loader.batch_size
        self.reader.load_epoch(epoch)
        for images, labels in self.loader:
            idx = indices[step * batch:(step + 1) * batch]
            if len(idx) != images.shape[0]:
                raise RuntimeError(f"epoch {epoch} step {step}: the loader gave {images.shape[0]} images for "
                                   f"{len(idx)} planned indices (loader and epoch_indices disagree)")
            probs, classes = self.reader.records(epoch, idx)
            probs, classes = (host_to_device(torch.from_numpy(a), self.device) for a in (probs, classes))
            yield Batch(images, labels, {"probs": probs, "classes": classes})
            step += 1


def open_bank(cfg: Config, loader: Any) -> store.BankReader:
    """The bank ``bank.path`` checked against the run: dataset, seed, image size, plan, teachers, epochs.

    The dataset must be the bank's file for file (relative paths, labels, file and image sizes: a copy
    of it anywhere matches); the teachers must be the bank's tags, and a teacher named with a local
    weights file must be the file the bank was built from (SHA-256), so that the run's config names no
    weights the bank never used.

    Raises:
        BankError: naming every field that differs, the first files that differ, the teacher file that
            differs, the missing epochs, or the damaged file.
    """
    check_bank_config(cfg)
    manifest = store.read_manifest(cfg.bank.path)
    store.check_dataset(cfg.bank.path, manifest, loader.index, f"data.root={cfg.data.root!r}")
    # The dataset matched (possibly by the mtime-including digest of an older bank): compare the rest.
    expect = {**run_identity(cfg, loader.index), "dataset_digest": manifest["dataset_digest"]}
    reader = store.BankReader(cfg.bank.path, expect=expect, epochs=range(cfg.schedule.epochs))
    have = [t["tag"] for t in reader.manifest["teachers"]]
    want = [t.tag for t in cfg.model.teachers]
    if have != want:
        raise store.BankError(f"the bank {cfg.bank.path} was built from teachers {have} but model.teachers names {want}"
                              "; build a bank for these teachers or set model.teachers to the bank's")
    for i, (built, teacher) in enumerate(zip(reader.manifest["teachers"], cfg.model.teachers, strict=True)):
        _check_teacher_weights(cfg, i, built, teacher)
    log.info("bank %s: epochs %s, top-%d, teachers %s (captured mass %.4f, KL %.5f)", cfg.bank.path,
             store.format_ranges(reader.epochs), reader.top_k, ", ".join(have),
             reader.manifest.get("summary", {}).get("captured_mass", float("nan")),
             reader.manifest.get("summary", {}).get("kl", float("nan")))
    return reader


def _check_teacher_weights(cfg: Config, i: int, built: dict[str, str], teacher: Any) -> None:
    """Refuse teacher ``i`` of the run when its weights are not those the bank was built from.

    A run naming a local file is compared by the file's SHA-256 (a bank built before those were stored:
    by the weights as loaded, which needs the model built once on the CPU). A run naming the hub's
    weights of the tag matches a bank built from the hub's; a bank built from a file needs that file
    named (the hub's weights are not loaded to compare: a bank run needs no teacher weights at all).
    """
    key = f"model.teachers[{i}]"
    bank_file = built.get("weights") or ""
    if not teacher.weights:
        if bank_file:
            raise store.BankError(f"the bank {cfg.bank.path} was built with {key} = {built['tag']}@{bank_file} "
                                  f"(SHA-256 {built.get('file_sha256') or built['sha256']}), but this run names "
                                  f"the hub's weights of {teacher.tag}; name the same file: {teacher.tag}@FILE")
        return
    try:
        digest = store.file_sha256(teacher.weights)
    except OSError as err:
        raise store.BankError(f"{key} weights file {teacher.weights} cannot be read ({err.strerror})") from err
    if built.get("file_sha256"):
        same, what = digest == built["file_sha256"], f"file SHA-256 {digest}, the bank's {built['file_sha256']}"
    else:
        from fastmeal.models.factory import create_model, load_weights

        model = load_weights(create_model(teacher.tag, num_classes=cfg.model.num_classes, what=key),
                             teacher.weights, what=key)
        loaded = store.hash_state_dict(model.state_dict())
        same, what = loaded == built["sha256"], f"weights SHA-256 {loaded}, the bank's {built['sha256']}"
    if not same:
        raise store.BankError(f"{key} = {teacher.tag}@{teacher.weights} is not the teacher the bank {cfg.bank.path} "
                              f"was built from ({bank_file or 'the hub weights of ' + built['tag']}): {what}. Name "
                              "the bank's teacher files, or build a bank for these teachers")
