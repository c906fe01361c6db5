"""Evaluation with the SPEC protocol: single centre crop, top-1/top-5 and CE loss over every val image once.

The loader does the protocol's preprocessing (resize the short side to int(256/224·S), centre-crop S,
normalise) and shards the split without padding, so summing counts over ranks counts each image
exactly once. Counts stay on the device until the end of the pass: one host sync per evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastmeal.config import Config
from fastmeal.console import progress_enabled
from fastmeal.lifecycle import raise_if_stopped
from fastmeal.metrics import DeviceMeans, topk_correct
from fastmeal.profiling import phase

log = logging.getLogger("fastmeal.evaluate")

_COUNTS = ("top1", "top5", "loss")


def resolve_precision(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, use a grad scaler)`` for ``precision.mode`` on ``device``.

    ``amp`` is bf16 on GPUs that support it (Ampere and later), else fp16 with a grad scaler; on the
    CPU it is fp32, since CPU bf16 autocast ran ~20x slower than fp32 matmuls on the 2-core dev machine
    (bench_train_step measured it) and most CPUs lack native bf16 (``amp-bf16`` still forces it).
    ``fp32`` is the reference's numerics (no autocast).
    """
    if mode == "fp32" or (mode == "amp" and device.type != "cuda"):
        return None, False
    if mode == "amp":
        mode = "amp-bf16" if torch.cuda.is_bf16_supported() else "amp-fp16"
    if mode == "amp-bf16":
        return torch.bfloat16, False
    if mode == "amp-fp16":
        return torch.float16, True
    raise ValueError(f"precision.mode={mode!r} is not one of amp, amp-bf16, amp-fp16, fp32")


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing for fp32 (``dtype=None``)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Any, *, device: torch.device, autocast_dtype: torch.dtype | None = None,
             channels_last: bool = True, progress: bool = False, desc: str = "eval",
             all_ranks: bool = True, stoppable: bool = True) -> dict[str, float]:
    """Top-1, top-5 (in %) and mean cross-entropy of ``model`` over every sample of ``loader``.

    The model is put in eval mode for the pass and returned to its previous mode afterwards.

    Args:
        model: maps ``[B, 3, S, S]`` to ``[B, C]`` logits.
        loader: yields ``(images [B, 3, S, S], labels [B])`` on ``device`` (the Loader protocol).
        device: where the model and batches are.
        autocast_dtype: run the model under autocast to this dtype; None = as the inputs come (fp32).
        channels_last: feed channels-last images.
        progress: show a progress bar.
        desc: the bar's label.
        all_ranks: sum the counts over all ranks (collective: every rank must call it).
        stoppable: end the pass at a stop request (:class:`~fastmeal.lifecycle.Stopped`); the trainer's
            evaluation runs to its end instead (its epoch checkpoint follows it).

    Returns:
        ``top1``, ``top5``, ``loss`` (CE in fp32, mean over samples), ``count`` (samples seen, all
        ranks), ``seconds`` and ``images_per_s``.
    """
    was_training = model.training
    model.eval()
    sums = DeviceMeans(_COUNTS, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    start = time.perf_counter()
    try:
        bar = tqdm(loader, desc=desc, disable=not progress_enabled(progress), leave=False, dynamic_ncols=True)
        for images, labels in bar:
            if stoppable:
                raise_if_stopped()
            with phase("eval"):
                with autocast_context(device, autocast_dtype):
                    logits = model(images.contiguous(memory_format=memory_format))
                logits = logits.float()
                counts = topk_correct(logits, labels, (1, 5))
                ce = F.cross_entropy(logits, labels, reduction="sum").reshape(1)
                sums.add_counts(torch.cat([counts, ce]), labels.shape[0])
    finally:
        model.train(was_training)
    totals, count = sums.read(all_ranks=all_ranks)  # means over samples: fractions correct, mean CE
    seconds = time.perf_counter() - start
    return {"top1": 100.0 * totals["top1"], "top5": 100.0 * totals["top5"], "loss": totals["loss"], "count": count,
            "seconds": seconds, "images_per_s": count / seconds if seconds > 0 else float("nan")}


def evaluate_config(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """``fastmeal eval``: the student of ``cfg`` (tag + ``model.student_weights``) on ``data.root``'s val split.

    The class count comes from the dataset (``model.num_classes`` is set from it), so a weights file
    made for another count fails with the classifier shapes. Without a weights file the tag's
    pretrained weights are used (hub or cache).

    Args:
        cfg: ``model.student``, ``model.student_weights``, ``data.*`` (root, image_size,
            eval_resize, eval_batch_size, workers, backend), ``precision.*`` and ``runtime.device``.
        progress: show a progress bar.

    Returns:
        :func:`evaluate`'s metrics plus ``model``, ``weights``, ``image_size``, ``eval_resize`` and
        ``device``.
    """
    from fastmeal.data import build_loader
    from fastmeal.distributed import resolve_device
    from fastmeal.models.factory import build_student

    device = resolve_device(cfg.runtime.device)
    loader = build_loader(cfg, "val", device=device)
    if loader.num_classes != cfg.model.num_classes:
        cfg = cfg.replace({"model.num_classes": loader.num_classes})
    model = build_student(cfg).to(device)
    autocast_dtype, _ = resolve_precision(cfg.precision.mode, device)
    channels_last = cfg.precision.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    result = evaluate(model, loader, device=device, autocast_dtype=autocast_dtype, channels_last=channels_last,
                      progress=progress, desc=f"eval {cfg.model.student}", all_ranks=False)
    if result["count"] != loader.dataset_size:
        log.warning("evaluated %d images but the val split has %d (%d corrupt file(s) skipped: data.skip_corrupt=true)",
                    result["count"], loader.dataset_size, loader.num_skipped)
    return {"model": cfg.model.student, "weights": cfg.model.student_weights or "(pretrained)",
            "image_size": cfg.data.image_size, "eval_resize": cfg.data.resolved_eval_resize,
            "device": str(device), **result}
