"""Images/sec of the input pipeline: the DALI backend vs the torchvision (reference) backend.

Both backends are built by ``fastmeal.data.build_loader`` from the same config, on the same JPEG files,
with the same number of CPU threads (``--workers``: DataLoader worker processes for torchvision, DALI
CPU threads for DALI), the same per-device batch and crop size, and deliver the same thing: a
normalised channels-last batch and its labels on the device (fp32 on the CPU; on CUDA the teachers'
dtype, fp16, with DALI's ``mixed`` GPU decoding). Train (RandomResizedCrop + flip) and val (resize +
centre crop) pipelines are measured separately.

Train is measured twice per backend, in the same run: ``variant=plan`` is the product (the crop plan,
:mod:`fastmeal.data.plan`: boxes computed in Python per batch, fed to DALI's ROI decoder /
cropped with PIL), ``variant=fused`` the augmentation it replaced, kept here only as the comparison
point: DALI's fused ``decoders.image_random_crop`` drawing its own boxes, and torchvision's
``RandomResizedCrop`` drawing from torch's RNG in the workers. Both variants share everything else
(files, order, batches, collation, output). ``plan_over_fused`` is their ratio (images/s and per
CPU-second); the plan's cost goal is at most 5 % on the CPU.

For each split: every file is read once first (no cold-disk reads in the timed region), each backend
runs ``--warmup`` batches, then the backends take turns for ``--repeats`` timed runs of ``--batches``
consecutive batches each (turns, so that a load change on a shared machine hits both; epochs chain:
the torchvision DataLoader restarts its workers' prefetch at each epoch, DALI prefetches across the
boundary, as each would on ImageNet). A backend idles during the other's turn, so it starts each run
with its prefetch queue full (torchvision: ``workers x prefetch`` batches, DALI: ``prefetch``); runs of
many batches make that head start small. ``images_per_s`` is the median over repeats of images /
wall time (synchronised on CUDA); ``images_per_cpu_s`` divides by the CPU time the loader's process,
its threads and its worker processes used instead (on a shared machine the wall time depends on the
other users' load, the CPU time much less). The DALI/torchvision ratios per split are stored with the
rows.

``--isolate`` takes the variants out of each other's way: every timed run is a fresh process that builds
only its variant (warm-up included), and the order alternates repeat by repeat. On a 2-core machine the
in-process turns depend on which loader was built first (benchmarks/README.md); isolated runs do not.

Usage::

    python benchmarks/bench_loader.py --data DIR [--backend both|dali|torchvision] [--workers N]
        [--json benchmarks/results/loader_<device>.json]

Make ImageNet-like data with ``fastmeal data synth DIR --size-range 375 500``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastmeal.config import r50_224  # noqa: E402
from fastmeal.data import build_loader, dali_available  # noqa: E402
from fastmeal.data.common import CROP_AREA, CROP_ASPECT, scan_split  # noqa: E402
from fastmeal.distributed import resolve_device  # noqa: E402

FUSED = "@fused"  # the variant key suffix of the pre-plan augmentation


def fused_loader(cfg, backend: str, device: torch.device):
    """The train loader with the pre-plan augmentation: random draws inside the pipeline (module docstring)."""
    if backend == "torchvision":
        from torch.utils.data import DataLoader

        from fastmeal.data.torchvision import FolderDataset, _collate, build_transform

        loader = build_loader(cfg.replace({"data.backend": "torchvision"}), "train", device=device)
        data = cfg.data
        dataset = FolderDataset(scan_split(data.root, "train"), build_transform("train", data.image_size,
                                                                               data.resolved_eval_resize))
        # The same DataLoader as the product's, reading (index) items with RandomResizedCrop in the workers.
        loader._batches = None
        loader._loader = DataLoader(dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                                    num_workers=data.workers, collate_fn=_collate, pin_memory=device.type == "cuda",
                                    persistent_workers=data.workers > 0,
                                    prefetch_factor=data.prefetch if data.workers else None)
        return loader
    from nvidia.dali import fn, types

    from fastmeal.data import build_index
    from fastmeal.data.dali import DaliLoader, decoder_args, resize_flip_normalize

    class FusedRandomCropDali(DaliLoader):
        """The pre-plan DALI train graph: paths in, DALI's fused random-crop decoder draws the boxes."""

        def _input_types(self):
            return [types.UINT8]

        def _source(self):
            return (self._encoded_paths(self._feed_next()),)

        def _define(self, inputs, *, decoder_device, dali_dtype):
            data = self.cfg.data
            images = fn.decoders.image_random_crop(fn.io.file.read(inputs[0]), random_area=list(CROP_AREA),
                                                   random_aspect_ratio=list(CROP_ASPECT), num_attempts=10,
                                                   **decoder_args(decoder_device, data.dali_hw_decoder_load))
            return resize_flip_normalize(images, fn.random.coin_flip(probability=0.5), image_size=data.image_size,
                                         dali_dtype=dali_dtype)

    split = scan_split(cfg.data.root, "train")
    return FusedRandomCropDali(cfg.replace({"data.backend": "dali"}), split, "train", rank=0, world_size=1,
                               device=device, batch_size=cfg.data.batch_size, index=build_index(split, progress=False))


class SourceTimer:
    """Wall time spent in the DALI loader's per-batch Python (``external_source`` callback), per batch."""

    def __init__(self, loader) -> None:
        self.seconds, self.calls = 0.0, 0
        source = loader._source

        def timed():
            start = time.perf_counter()
            try:
                return source()
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        loader._source = timed

    def ms_per_batch(self) -> float:
        return 1e3 * self.seconds / max(self.calls, 1)


def _forever(loader):
    """Batches without end, chaining epochs as a training loop does."""
    while True:
        yield from loader


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all its threads, and its live child processes.

    The children are the DataLoader's workers; DALI works in threads of this process. Read from /proc
    (Linux); elsewhere only this process is counted.
    """
    own = os.times()
    total = own.user + own.system
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if fields[1] == me:  # fields[1] is the parent pid; utime and stime are fields 14 and 15 of stat
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _timed(stream, batches: int, device: torch.device) -> tuple[float, float]:
    """``(images/s, images per CPU-second)`` over ``batches`` consecutive batches of ``stream``."""
    harness.sync(device)
    start, cpu_start, images = time.perf_counter(), cpu_seconds(), 0
    for _ in range(batches):
        x, _ = next(stream)
        images += x.shape[0]
    harness.sync(device)
    # CPU time is counted in clock ticks: a run shorter than one tick is counted as one (a lower bound).
    cpu = max(cpu_seconds() - cpu_start, 1 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100))
    return images / (time.perf_counter() - start), images / cpu


def _warm_page_cache(root: str) -> tuple[int, int]:
    """Read every file once; returns (files, bytes)."""
    files = total = 0
    for split in ("train", "val"):
        for path in scan_split(root, split).paths:
            total += len(Path(path).read_bytes())
            files += 1
    return files, total


def _isolated_rows(args: argparse.Namespace, split: str, keys: list[str]) -> list[dict]:
    """``--isolate``: each repeat of each variant measured by a child process that builds only that variant.

    The order of the variants alternates repeat by repeat (A B, B A, ...), so a drift of the machine's speed
    hits them alike. The rows are the children's, their repeats pooled (medians over all of them).
    """
    import json
    import subprocess
    import tempfile

    common = ["--data", args.data, "--backend", args.backend, "--device", args.device, "--workers", str(args.workers),
              "--batch", str(args.batch), "--image-size", str(args.image_size), "--prefetch", str(args.prefetch),
              "--warmup", str(args.warmup), "--batches", str(args.batches), "--splits", split, "--repeats", "1",
              "--hw-decoder-loads", *map(str, args.hw_decoder_loads)]
    runs: dict[str, list[dict]] = {key: [] for key in keys}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for key in keys if repeat % 2 == 0 else keys[::-1]:
                out = Path(tmp) / "row.json"
                subprocess.run([sys.executable, __file__, *common, "--variant", key, "--json", str(out)], check=True,
                               stdout=subprocess.DEVNULL)
                runs[key].append(json.loads(out.read_text())["rows"][0])
    rows = []
    for key in keys:
        row = dict(runs[key][0])
        r = [x for run in runs[key] for x in run["all_images_per_s"]]
        c = [x for run in runs[key] for x in run["all_images_per_cpu_s"]]
        row.update(images_per_s=statistics.median(r), min_images_per_s=min(r), max_images_per_s=max(r),
                   images_per_cpu_s=statistics.median(c), repeats=len(r), all_images_per_s=r, all_images_per_cpu_s=c)
        if "source_ms_per_batch" in row:
            row["source_ms_per_batch"] = statistics.mean(run["source_ms_per_batch"] for run in runs[key])
        rows.append(row)
        print(f"{key:18s} {split:5s} {row['images_per_s']:9.1f} img/s  (min {min(r):.1f}, max {max(r):.1f}, "
              f"{len(r)} processes)  {row['images_per_cpu_s']:8.1f} img/CPU-s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--backend", default="both", choices=("both", "dali", "torchvision"))
    parser.add_argument("--splits", default="train,val", help="comma-separated: train, val")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="CPU threads/workers (default: all)")
    parser.add_argument("--batch", type=int, default=0, help="per-device batch (default: 64 CPU, 256 CUDA)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=0, help="warm-up batches (default: an epoch, at least 4)")
    parser.add_argument("--batches", type=int, default=0, help="batches per repeat (default: an epoch, at least 12)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hw-decoder-loads", type=float, nargs="*", default=[],
                        help="extra DALI train/val rows with these data.dali_hw_decoder_load values (CUDA only)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--no-fused", action="store_true", help="train: measure the plan only, not also the "
                        "pre-plan fused random crop")
    parser.add_argument("--fused-first", action="store_true", help="build and run the fused variant of each backend "
                        "before the plan (the order matters on a small shared machine: run both)")
    parser.add_argument("--isolate", action="store_true", help="each timed run in a fresh process that builds only "
                        "that variant (alternating the order repeat by repeat): nothing else alive in the process, "
                        "no build order")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # --isolate's child: measure only this variant
    parser.add_argument("--note", action="append", default=[], help="a note stored with the result (repeatable)")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    batch = args.batch or (256 if device.type == "cuda" else 64)
    backends = ["torchvision", "dali"] if args.backend == "both" else [args.backend]
    notes = list(args.note)
    if "dali" in backends and not dali_available():
        backends.remove("dali")
        notes.append("DALI is not installed here: only the torchvision backend was measured")
    # (key, backend, config overrides): the hardware-decoder share variants measure the default's choice.
    variants = [(b, b, {}) for b in backends]
    if "dali" in backends and args.hw_decoder_loads:
        if device.type == "cuda":
            variants += [(f"dali@hw{v:g}", "dali", {"data.dali_hw_decoder_load": v}) for v in args.hw_decoder_loads]
        else:
            notes.append("--hw-decoder-loads ignored: the hardware JPEG decoder needs CUDA")
    fused_variants = [] if args.no_fused else [(b + FUSED, b, {}) for b in backends]
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    num_files, num_bytes = _warm_page_cache(args.data)
    load_before = os.getloadavg()
    sizes = {split: len(scan_split(args.data, split)) for split in splits}
    # r50_224's settings (AMP: fp16 batches on CUDA, fp32 on the CPU), with the benchmark's data and threads.
    cfg = r50_224().replace({"data.root": args.data, "data.batch_size": batch, "data.eval_batch_size": batch,
                             "data.workers": args.workers, "data.prefetch": args.prefetch,
                             "data.image_size": args.image_size, "runtime.device": device.type})
    mean_kib = num_bytes / num_files / 1024
    print(f"{num_files} files ({mean_kib:.0f} KiB on average), device {harness.device_name(device)}, "
          f"{args.workers} workers/threads, batch {batch}, {args.image_size} px")
    rows = []
    for split in splits:
        # The variants take turns, repeat by repeat, so that a load change on a shared machine hits all of them.
        # torchvision is built and started first: forking its workers while a DALI pipeline lives is refused.
        split_variants = variants + (fused_variants if split == "train" else [])
        # Built (and first run) in this order: torchvision first, then plan before fused unless --fused-first.
        # The order moves the plan/fused ratio on a shared 2-core machine by up to ~25 % (benchmarks/README.md).
        split_variants.sort(key=lambda v: (v[1] != "torchvision", v[0].endswith(FUSED) != args.fused_first))
        if args.variant:
            split_variants = [v for v in split_variants if v[0] == args.variant]
        if args.isolate:
            rows += _isolated_rows(args, split, [key for key, _, _ in split_variants])
            continue
        streams, meta, timers = {}, {}, {}
        for key, backend, overrides in split_variants:
            if key.endswith(FUSED):
                loader = fused_loader(cfg, backend, device)
            else:
                loader = build_loader(cfg.replace({"data.backend": backend, **overrides}), split, device=device)
            if backend == "dali":
                timers[key] = SourceTimer(loader)
            per_epoch = len(loader)
            # At least 12 batches per repeat: a small dataset at batch 256 has only a few per epoch.
            warmup = args.warmup or max(per_epoch, 4)
            count = args.batches or max(per_epoch, 12)
            streams[key] = _forever(loader)
            x, _ = next(streams[key])
            for _ in range(warmup):
                next(streams[key])
            meta[key] = {"batches_per_repeat": count, "warmup_batches": warmup, "batches_per_epoch": per_epoch,
                         "dtype": str(x.dtype).replace("torch.", ""),
                         "channels_last": x.is_contiguous(memory_format=torch.channels_last)}
            if backend == "dali":
                meta[key]["hw_decoder_load"] = overrides.get("data.dali_hw_decoder_load", cfg.data.dali_hw_decoder_load)
            del loader, x
        rates = {key: [] for key in streams}
        per_cpu = {key: [] for key in streams}
        for _ in range(args.repeats):
            for key in streams:
                rate, cpu_rate = _timed(streams[key], meta[key]["batches_per_repeat"], device)
                rates[key].append(rate)
                per_cpu[key].append(cpu_rate)
        for key, backend, _ in split_variants:
            r, c = rates[key], per_cpu[key]
            row = {"backend": backend, "variant": key, "split": split, "images_per_s": statistics.median(r),
                   "min_images_per_s": min(r), "max_images_per_s": max(r), "images_per_cpu_s": statistics.median(c),
                   "repeats": len(r), "all_images_per_s": r, "all_images_per_cpu_s": c, **meta[key]}
            if key in timers:
                row["source_ms_per_batch"] = timers[key].ms_per_batch()
            rows.append(row)
            print(f"{key:18s} {split:5s} {statistics.median(r):9.1f} img/s  (min {min(r):.1f}, max {max(r):.1f}, "
                  f"{len(r)} x {meta[key]['batches_per_repeat']} batches)  {statistics.median(c):8.1f} img/CPU-s",
                  flush=True)
        streams.clear()  # ends the generators, so the loaders and their workers / pipelines go
        gc.collect()
    for split in splits:
        by_variant = {r["variant"]: r for r in rows if r["split"] == split}
        if "dali" in by_variant and "torchvision" in by_variant:
            ratio = by_variant["dali"]["images_per_s"] / by_variant["torchvision"]["images_per_s"]
            cpu_ratio = by_variant["dali"]["images_per_cpu_s"] / by_variant["torchvision"]["images_per_cpu_s"]
            for r in (by_variant["dali"], by_variant["torchvision"]):
                r["dali_over_torchvision"] = ratio
                r["dali_over_torchvision_per_cpu_s"] = cpu_ratio
            print(f"{split}: DALI / torchvision = {ratio:.2f}x in images/s, {cpu_ratio:.2f}x in images per CPU-second")
        for backend in backends:
            plan, fused = by_variant.get(backend), by_variant.get(backend + FUSED)
            if plan is not None and fused is not None:
                plan["plan_over_fused"] = plan["images_per_s"] / fused["images_per_s"]
                plan["plan_over_fused_per_cpu_s"] = plan["images_per_cpu_s"] / fused["images_per_cpu_s"]
                print(f"{split} {backend}: plan / fused = {plan['plan_over_fused']:.3f}x in images/s, "
                      f"{plan['plan_over_fused_per_cpu_s']:.3f}x per CPU-second")
    settings = {"data": os.path.abspath(args.data), "num_files": num_files, "mean_file_kib": mean_kib,
                "split_sizes": sizes, "device": str(device), "workers": args.workers, "batch": batch,
                "image_size": args.image_size, "eval_resize": cfg.data.resolved_eval_resize,
                "prefetch": args.prefetch, "fused_first": args.fused_first, "isolated": args.isolate,
                "precision": cfg.precision.mode,
                "torch_threads": torch.get_num_threads(),
                "load_average_1m_before_after": [load_before[0], os.getloadavg()[0]]}
    if max(load_before[0], os.getloadavg()[0]) > 0.5 * (os.cpu_count() or 1):
        notes.append(f"the machine was shared (1-minute load average {load_before[0]:.1f} before, "
                     f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs): images/s depends on the other "
                     "users' load; images per CPU-second (the loader's own CPU time) does not")
    harness.write_result(args.json, benchmark="loader", settings=settings, rows=rows, notes=notes, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
