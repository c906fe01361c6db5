"""``fastmeal bank build``: run the teacher ensemble once over every planned crop and store its top-K.

The builder reads each epoch exactly as a training run does — the configured train loader, whose
crop and flip of image *i* in epoch *e* are the crop plan's pure function of ``(runtime.seed, e, i)`` —
so the stored soft label of (e, i) is the one the online run computes on the same crop. Under
torchrun every rank builds its own slice of each epoch (the loader's ``epoch_indices`` on that rank);
``--epochs A:B`` builds a range, so separate jobs can build separate ranges into one folder.

Per batch: ``p = mean_k softmax(t_k)`` in fp32, its top-K (probabilities rounded toward zero to
fp16, :func:`round_down_half`; classes int16), and exactly, from the full ``p``, the captured mass ``Σ top-K p`` and
``KL(p ‖ p_decoded)`` of the stored record (:func:`fastmeal.losses.decode_topk`); the means over the
bank go into the manifest. Work is cut into chunks (:mod:`fastmeal.bank.store`); a chunk whose JSON
exists is never redone, so a killed build continues where it stopped.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fastmeal.bank import store
from fastmeal.config import Config
from fastmeal.console import progress_enabled
from fastmeal.distributed import DistInfo, barrier
from fastmeal.lifecycle import raise_if_stopped
from fastmeal.losses import decode_topk

log = logging.getLogger("fastmeal.bank")

#: Records per chunk by default (rounded up to whole batches): ~1.5 MB, about half a minute of one GPU.
DEFAULT_CHUNK_RECORDS = 65536


def parse_epochs(text: str | None, num_epochs: int) -> range:
    """``"A:B"`` → ``range(A, B)``; None → every epoch of the schedule."""
    if not text:
        return range(num_epochs)
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError as err:
        raise store.BankError(f"--epochs {text!r} must look like A:B (epochs A..B-1), e.g. 0:90") from err
    if not 0 <= start < stop:
        raise store.BankError(f"--epochs {text!r} must have 0 <= A < B")
    return range(start, stop)


def check_bank_config(cfg: Config) -> None:
    """What a bank cannot represent: one record per (epoch, image) means no batch-level mixing, no substitutes."""
    if cfg.data.cutmix:
        raise store.BankError("data.cutmix=true mixes the images of a batch before the teachers see them, so their "
                              "output is not a function of one image: a soft-label bank cannot hold it. Train the "
                              "CutMix preset online (without bank.path)")
    if cfg.data.skip_corrupt:
        raise store.BankError("data.skip_corrupt=true fills a corrupt file's slot with another image, which breaks the "
                              "bank's (epoch, image) -> record identity; remove the corrupt files (`fastmeal data "
                              "check`) and use data.skip_corrupt=false")


def teacher_identity(cfg: Config, models: Sequence[torch.nn.Module]) -> list[dict[str, str]]:
    """``[{tag, weights, sha256, file_sha256}]`` of the teachers: ``sha256`` hashes their weights as loaded
    (before folding), ``file_sha256`` the bytes of a local weights file ("" for the hub's)."""
    return [{"tag": t.tag, "weights": t.weights, "sha256": store.hash_state_dict(m.state_dict()),
             "file_sha256": store.file_sha256(t.weights) if t.weights else ""}
            for t, m in zip(cfg.model.teachers, models, strict=True)]


def run_identity(cfg: Config, index: Any) -> dict[str, Any]:
    """The identity fields a bank must share with a run of ``cfg`` over the dataset ``index`` (teachers aside)."""
    from fastmeal.data.plan import PLAN_VERSION

    return {"dataset_digest": index.digest, "dataset_size": len(index), "num_classes": cfg.model.num_classes,
            "seed": cfg.runtime.seed, "image_size": cfg.data.image_size, "plan_version": PLAN_VERSION}


@torch.no_grad()
def soft_label_records(teacher_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-K records of a batch and what they keep.

    Args:
        teacher_logits: ``[K_t, B, C]`` the ensemble's logits.
        top_k: K.

    Returns:
        ``probs`` ``[B, K]`` fp16, ``classes`` ``[B, K]`` int16 (largest first), and per row the captured
        mass ``Σ top-K p`` and ``KL(p ‖ decoded)`` (fp32, computed from the full fp32 ``p``).
    """
    p = torch.softmax(teacher_logits.float(), dim=-1).mean(0)
    values, classes = p.topk(top_k, dim=-1)
    probs, classes = round_down_half(values), classes.to(torch.int16)
    decoded = decode_topk(probs, classes, p.shape[-1])
    # A class the decoding gives 0 (all mass in the stored top-K) where p is a denormal-sized positive
    # would make the KL infinite over a mass below 1e-38: such classes count at the smallest normal float.
    decoded = decoded.clamp(min=torch.finfo(torch.float32).tiny)
    kl = (torch.xlogy(p, p) - torch.xlogy(p, decoded)).sum(-1)
    return probs, classes, values.sum(-1), kl


def round_down_half(values: Tensor) -> Tensor:
    """Non-negative fp32 values to fp16, rounded toward zero instead of to nearest.

    A stored probability is then never above the teacher's, so the stored top-K never sums to more than
    the true top-K mass and the remainder that decoding spreads over the other classes is never cut to 0
    by rounding (to nearest, a confident teacher's 0.99995 becomes 1.0: the other classes would get
    nothing). Costs one fp16 ulp at most (2^-11 relative) instead of half of one.
    """
    half = values.half()
    over = half.float() > values
    # For positive fp16 values the bit patterns are ordered: one less is the next value toward zero.
    return torch.where(over, (half.view(torch.int16) - 1).view(torch.float16), half)


def build_bank(cfg: Config, out: str | Path, *, epochs: range | None = None, top_k: int = 5,
               chunk_records: int = DEFAULT_CHUNK_RECORDS, dist: DistInfo | None = None, progress: bool = True,
               loader: Any | None = None, teachers: Callable[[Tensor], Tensor] | None = None,
               teacher_info: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Build (or continue) the bank of ``cfg`` in ``out`` for ``epochs`` (default: the whole schedule).

    Args:
        cfg: the run whose soft labels are stored (data, model.teachers, teacher_engine, runtime.seed);
            ``data.batch_size`` is the global build batch.
        out: the bank folder (created; an existing bank must have the same identity).
        epochs: the epochs to build.
        top_k: K, the probabilities kept per record.
        chunk_records: records per chunk and rank (rounded up to whole batches).
        dist: this process's rank (default: join torchrun's process group, or a single process).
        progress: show a progress bar (rank 0).
        loader, teachers, teacher_info: injected parts (tests): the train loader, the ensemble
            ``[B,3,S,S] -> [K,B,C]`` and its identity; built from ``cfg`` when None.

    Returns:
        A summary: epochs built, crops computed by this rank, crops/s, and the bank's captured mass and KL.
    """
    from fastmeal.distributed import check_global_batches, init_distributed, world_size_from_env

    check_bank_config(cfg)
    # Every record is needed: keep the partial last batch whatever the training run does with it.
    cfg = cfg.replace({"data.last_batch": "keep"})
    epochs = epochs if epochs is not None else range(cfg.schedule.epochs)
    if dist is None:
        check_global_batches(cfg.data, world_size_from_env())
        dist = init_distributed(cfg.runtime.device)
    out = Path(out)
    # Before any work: a second build of the same epochs is refused at once (other epochs may build alongside).
    locks = _claim_epochs(out, epochs) if dist.is_main else None
    try:
        return _build(cfg, out, epochs, dist, top_k, chunk_records, progress, loader, teachers, teacher_info)
    finally:
        if locks is not None:
            os.close(locks)  # releases every epoch's lock


BUILD_LOCK = ".build.lock"


def _claim_epochs(out: Path, epochs: range) -> int | None:
    """Lock ``epochs`` of the bank at ``out`` for this build; refuse a training run dir.

    One POSIX byte-range lock per epoch (byte ``e`` of ``BANK/.build.lock``): builds of disjoint
    ``--epochs`` ranges run side by side (the documented way to split a build over jobs); a build of an
    epoch another process is building is refused. The kernel drops the locks when the process ends.

    Returns:
        The lock file's descriptor (closing it releases the locks), or None where the file system has no locks.
    """
    import fcntl

    from fastmeal.rundir import LOCK_NAME, RUN_FILES

    run_files = [name for name in (*RUN_FILES, "checkpoints", LOCK_NAME) if (out / name).exists()]
    if run_files:
        raise store.BankError(f"{out} is a training run dir (it holds {', '.join(run_files)}): build the bank into "
                              "a folder of its own, e.g. --out banks/NAME")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    busy = []
    try:
        for epoch in epochs:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, epoch)
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                busy.append(epoch)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            log.warning("cannot lock %s (%s): nothing stops two builds of the same epochs", out / BUILD_LOCK, err)
            return None
        raise
    if busy:
        os.close(fd)
        raise store.BankError(f"epoch(s) {store.format_ranges(busy)} of the bank {out} are being built by another "
                              "process: two builds of the same epochs would do the same work twice. Wait for it to "
                              "end, or build other epochs (--epochs A:B)")
    return fd


def _build(cfg: Config, out: Path, epochs: range, dist: DistInfo, top_k: int, chunk_records: int, progress: bool,
           loader: Any, teachers: Callable[[Tensor], Tensor] | None,
           teacher_info: list[dict[str, str]] | None) -> dict[str, Any]:
    """:func:`build_bank` once the bank folder is claimed."""
    if loader is None:
        from fastmeal.data import build_loader

        loader = build_loader(cfg, "train", rank=dist.rank, world_size=dist.world_size, device=dist.device)
    if teachers is None:
        from fastmeal.models.factory import build_teacher_models, build_teachers

        models = build_teacher_models(cfg)
        teacher_info = teacher_identity(cfg, models)
        # The per-rank batch's CUDA graphs are captured now, before the loader runs (as `fastmeal train` does).
        teachers = build_teachers(cfg, dist.device, models=models, batch_sizes=[loader.batch_size])
    if teacher_info is None:
        raise ValueError("teacher_info is needed with injected teachers")
    if loader.num_classes != cfg.model.num_classes:
        raise store.BankError(f"the train split has {loader.num_classes} classes but model.num_classes="
                              f"{cfg.model.num_classes}")
    manifest = store.make_manifest(teachers=teacher_info, top_k=top_k, **run_identity(cfg, loader.index),
                                   extra={"backend": loader.backend, "teacher_dtype": cfg.teacher_engine.dtype})
    if dist.is_main:
        manifest = store.open_or_create(out, manifest, loader.index)
    barrier()
    if not dist.is_main:
        manifest = store.open_or_create(out, manifest, loader.index)  # exists now: checks this rank agrees

    batch = loader.batch_size
    steps_per_chunk = max(1, math.ceil(chunk_records / batch))
    existing = store.scan_chunks(out)
    plans = []
    for epoch in epochs:
        indices = np.asarray(loader.epoch_indices(epoch), dtype=np.int64)
        layout = store.EpochLayout(world_size=dist.world_size, records_per_rank=len(indices),
                                   chunk_records=steps_per_chunk * batch)
        done = existing.get(epoch, [])
        if done and store.epoch_status(done)[0] is not None:
            continue  # complete, whoever built it
        other = {c["world_size"] for c in done} - {dist.world_size}
        if other:
            raise store.BankError(f"epoch {epoch} of {out} was partly built by {sorted(other)} rank(s); continue it "
                                  f"with that many ranks, or delete {store.epoch_file(out, epoch)} and its chunks")
        # A chunk is known by its number: chunks of another size cover other records (those between would be skipped).
        sizes = {c["chunk_records"] for c in done} - {layout.chunk_records}
        if sizes:
            raise store.BankError(f"epoch {epoch} of {out} was partly built in chunks of {sorted(sizes)} records, "
                                  f"this build's are {layout.chunk_records} (bank.chunk_records rounded up to whole "
                                  f"batches of {batch}): continue it with the same bank.chunk_records and "
                                  f"data.batch_size, or delete {store.epoch_file(out, epoch)} and its chunks")
        plans.append((epoch, indices, layout))
    todo_crops = sum(layout.chunk_span(dist.rank, c)[1] for epoch, _, layout in plans
                     for c in range(layout.chunks_per_rank)
                     if not store.chunk_file(out, epoch, layout.world_size, dist.rank, c).exists())
    complete = [e for e in epochs if e not in {p[0] for p in plans}]
    partial = sum(1 for epoch, _, _ in plans for _ in existing.get(epoch, []))
    if dist.is_main and (complete or partial):
        log.info("continuing the bank %s: epochs %s already complete%s; building %s", out,
                 store.format_ranges(complete) or "none", f", {partial} chunk(s) of the others done" if partial else "",
                 store.format_ranges([p[0] for p in plans]) or "nothing")
    bar = tqdm(total=todo_crops, unit="crop", unit_scale=True, desc="bank build", dynamic_ncols=True,
               disable=not (dist.is_main and progress_enabled(progress)))
    start = time.perf_counter()
    computed = 0
    for epoch, indices, layout in plans:
        writer = store.EpochWriter(out, manifest, epoch, layout, dist.rank)
        for chunk in range(layout.chunks_per_rank):
            if writer.chunk_done(chunk):
                continue
            records = _compute_chunk(loader, teachers, epoch, indices, chunk, steps_per_chunk, batch, top_k,
                                     writer.dtype, bar)
            stats = {"mass_sum": float(records.pop("mass_sum")), "kl_sum": float(records.pop("kl_sum")),
                     "samples": int(records["rows"].shape[0])}
            writer.write_chunk(chunk, records["rows"], stats)
            computed += stats["samples"]
    bar.close()
    seconds = time.perf_counter() - start
    barrier()
    summary = summarize(out)
    if dist.is_main:
        store.update_manifest(out, summary=summary)
        log.info("bank %s: epochs %s complete; captured mass %.4f, KL(p_full || p_decoded) %.5f nats; "
                 "%.1f MB per epoch", out, store.format_ranges(summary["epochs"]), summary["captured_mass"],
                 summary["kl"], summary["bytes_per_epoch"] / 1e6)
    return {"out": str(out), "epochs_built": [e for e, _, _ in plans], "crops_computed": computed,
            "seconds": seconds, "crops_per_s": computed / seconds if seconds > 0 and computed else float("nan"),
            "world_size": dist.world_size, **summary}


def _compute_chunk(loader: Any, teachers: Callable[[Tensor], Tensor], epoch: int, indices: np.ndarray, chunk: int,
                   steps_per_chunk: int, batch: int, top_k: int, dtype: np.dtype, bar: tqdm) -> dict[str, Any]:
    """One chunk's records: its steps of the epoch, from the loader positioned at its first step.

    Records and statistics stay on the device until the chunk is complete (one copy and one host sync
    per chunk, not per batch, so the loader and the teachers keep running ahead).
    """
    first_step = chunk * steps_per_chunk
    count = min(steps_per_chunk * batch, len(indices) - first_step * batch)
    probs_parts, classes_parts, mass_parts, kl_parts = [], [], [], []
    loader.set_epoch(epoch, start_step=first_step)
    filled = 0
    for step, (images, _labels) in enumerate(loader, start=first_step):
        raise_if_stopped()
        n = len(indices[step * batch:(step + 1) * batch])
        if n != images.shape[0]:
            raise RuntimeError(f"epoch {epoch} step {step}: the loader gave {images.shape[0]} images for {n} "
                               "planned indices (loader and epoch_indices disagree)")
        probs, classes, mass, kl = soft_label_records(teachers(images), top_k)
        probs_parts.append(probs)
        classes_parts.append(classes)
        mass_parts.append(mass)
        kl_parts.append(kl)
        filled += n
        bar.update(n)
        if filled >= count:
            break
    if filled != count:
        raise RuntimeError(f"epoch {epoch} chunk {chunk}: the loader ended after {filled} of {count} images")
    rows = np.zeros(count, dtype=dtype)
    rows["index"] = indices[first_step * batch:first_step * batch + count]
    rows["probs"] = torch.cat(probs_parts).cpu().numpy()
    rows["classes"] = torch.cat(classes_parts).cpu().numpy()
    return {"rows": rows, "mass_sum": torch.cat(mass_parts).double().sum().item(),
            "kl_sum": torch.cat(kl_parts).double().sum().item()}


def summarize(root: str | Path) -> dict[str, Any]:
    """What the bank holds: complete epochs, bytes per epoch, mean captured mass and mean KL over its records."""
    manifest = store.read_manifest(root)
    chunks = store.scan_chunks(root)
    complete = store.complete_epochs(root)
    samples = sum(c["samples"] for e in complete for c in chunks[e])
    mass = sum(c["mass_sum"] for e in complete for c in chunks[e])
    kl = sum(c["kl_sum"] for e in complete for c in chunks[e])
    return {"epochs": sorted(complete), "samples": samples,
            "captured_mass": mass / samples if samples else float("nan"),
            "kl": kl / samples if samples else float("nan"),
            "bytes_per_record": manifest["record_bytes"],
            "bytes_per_epoch": manifest["dataset_size"] * manifest["record_bytes"]}
