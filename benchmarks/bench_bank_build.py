"""Soft-label bank build speed (crops/s) next to the online MEAL V2 step it replaces, in the same run.

Rows, with the same teachers (random weights), image size and JPEG set:

* ``online_step`` — fastmeal's online training step (:meth:`fastmeal.trainer.Trainer.train_step`:
  teachers + student + loss + backward + SGD) on one device-resident batch: the images/s a bank build
  must at least match to cost no more wall time than the teacher share of an online run;
* ``build_compute`` — what the builder does per batch on a device-resident batch: the teacher
  ensemble, the mean softmax, top-K, fp16/int16 records and the captured-mass / KL statistics, and the
  copy of the records to the host;
* ``build`` — :func:`fastmeal.bank.build.build_bank` end to end over one epoch of the JPEG set (the
  product's loader, chunked fsync'ed writes, checksums): ``crops_per_s`` as the build reports it.

``ratio_vs_online_step`` = row images/s ÷ ``online_step`` images/s.

Usage::

    python benchmarks/bench_bank_build.py --quick --json benchmarks/results/bank_build_quick_cpu-2core.json
    python benchmarks/bench_bank_build.py --data /tmp/jpegs --json $OUT/bank_build.json     # on a GPU

``--quick``: the tiny models of ``bench_train_step --quick`` (a CPU smoke run; its times say nothing
about GPU speed). Full size: SENet154 + ResNet-152s at 224 px, ResNet-50 student, batch 256.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bts  # noqa: E402
import harness  # noqa: E402

from fastmeal.bank.build import build_bank, soft_label_records  # noqa: E402
from fastmeal.data import build_loader  # noqa: E402
from fastmeal.distributed import DistInfo  # noqa: E402
from fastmeal.models.factory import build_discriminator, build_student, build_teachers, create_model  # noqa: E402

COLUMNS = ["mode", "batch", "loader", "images_per_s", "ratio_vs_online_step", "seconds", "images"]


def _rate(fn, batch: int, *, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    harness.sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    harness.sync(device)
    return batch * steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 64 px (the CPU smoke run)")
    parser.add_argument("--data", help="ImageFolder root with train/ (generated if absent; default: a temp dir)")
    parser.add_argument("--json", help="write the result document here")
    parser.add_argument("--batch", type=int, help="per-device batch (default 256; quick 8)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--workers", type=int, help="loader workers / DALI threads (default: CPUs - 2)")
    parser.add_argument("--backend", choices=["auto", "dali", "torchvision"], default="auto")
    args = parser.parse_args(argv)

    size = bts.QUICK if args.quick else bts.FULL
    batch = args.batch or (8 if args.quick else 256)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    on_cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else (1 if args.quick else max(1, (os.cpu_count() or 2) - 2))
    if args.quick and not on_cuda:
        torch.set_num_threads(1)
    notes = []
    if not on_cuda:
        notes.append("CPU SMOKE RUN: no CUDA (fp32 teachers, no CUDA graphs, shared CPU): these numbers say nothing "
                     "about speed on a GPU.")
    with contextlib.ExitStack() as stack:
        root, data_note = bts._ensure_data(args.data, size, os.cpu_count() or 1, stack)
        if data_note:
            notes.append(data_note)
        num_classes = len([p for p in (root / "train").iterdir() if p.is_dir()])
        cfg = bts.bench_config(size, root=root, num_classes=num_classes, batch=batch, workers=workers,
                               backend=args.backend, device=device).replace({"data.last_batch": "keep"})
        torch.manual_seed(0)
        teachers0 = [create_model(t.tag, num_classes=num_classes) for t in cfg.model.teachers]
        teachers = build_teachers(cfg, device, models=teachers0, batch_sizes=[batch])
        print(f"bench_bank_build on {harness.device_name(device)}: {' + '.join(size.teachers)} at {size.image_size} "
              f"px, batch {batch}, {workers} workers" + ("" if on_cuda else "  [CPU SMOKE RUN]"), flush=True)
        images = torch.randn(batch, 3, size.image_size, size.image_size, device=device).to(
            dtype=teachers.dtype, memory_format=teachers.input_memory_format)
        labels = torch.randint(num_classes, (batch,), device=device)
        warmup, steps = (1, 2) if args.quick else (5, 20)
        rows = []

        run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fastmeal-bench-bank-")))
        online = bts.FastmealRun(cfg, student=build_student(cfg), discriminator=build_discriminator(cfg),
                                 teachers=teachers, device=device, run_dir=run_dir / "run")
        online_rate = _rate(lambda: online.step(images, labels), batch, warmup=warmup, steps=steps, device=device)
        rows.append({"mode": "online_step", "batch": batch, "loader": "none (device-resident batch)",
                     "images_per_s": online_rate, "images": batch * steps})

        def compute() -> None:
            with torch.no_grad():
                probs, classes, mass, kl = soft_label_records(teachers(images), args.top_k)
                probs.cpu(), classes.cpu(), mass.sum().item(), kl.sum().item()

        rows.append({"mode": "build_compute", "batch": batch, "loader": "none (device-resident batch)",
                     "images_per_s": _rate(compute, batch, warmup=warmup, steps=steps, device=device),
                     "images": batch * steps})

        loader = build_loader(cfg, "train", device=device)
        info = [{"tag": t.tag, "weights": "", "sha256": "random-weights"} for t in cfg.model.teachers]
        start = time.perf_counter()
        built = build_bank(cfg, run_dir / "bank", epochs=range(1), top_k=args.top_k, dist=DistInfo(device=device),
                           progress=False, loader=loader, teachers=teachers, teacher_info=info)
        rows.append({"mode": "build", "batch": batch, "loader": loader.backend, "images_per_s": built["crops_per_s"],
                     "seconds": time.perf_counter() - start, "images": built["crops_computed"],
                     "captured_mass": built["captured_mass"], "kl": built["kl"]})
        notes.append("build: one epoch of the JPEG set through build_bank (decode + teachers + records + chunked "
                     "fsync'ed writes); its first batches include the loader's start-up. Random teacher weights: "
                     "captured mass and KL describe random teachers, not trained ones.")
    for row in rows:
        row["ratio_vs_online_step"] = row["images_per_s"] / online_rate
    settings = {"teachers": list(size.teachers), "student": size.student, "image_size": size.image_size,
                "batch": batch, "top_k": args.top_k, "workers": workers, "backend_requested": args.backend,
                "quick": args.quick, "warmup": warmup, "steps": steps,
                "teacher_engine": copy.deepcopy(teachers.report)}
    doc = harness.write_result(args.json, benchmark="bank_build", settings=settings,
                               rows=[{k: bts._round(v) for k, v in r.items()} for r in rows], notes=notes,
                               device=device)
    return harness.report(doc, COLUMNS)


if __name__ == "__main__":
    main()
