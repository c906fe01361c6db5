"""Images/sec of the frozen teacher ensemble: the reference's FP32 NCHW eager teachers vs our engine.

Variants, each for every teacher alone and for the whole ensemble, at each batch size:

* ``fp32_nchw_eager`` — the reference: FP32, NCHW, eager, BatchNorm as is (cuDNN may use TF32, as
  PyTorch's defaults let the reference code do today);
* ``fp16_cl`` — FP16 (``--dtype``) and channels-last, eager;
* ``fp16_cl_fold`` — the same with BatchNorm folded into the convolutions;
* ``fp16_cl_fold_graph`` — the same replayed as a CUDA graph (our default engine);
* ``fp16_nchw_fold_graph`` — NCHW instead of channels-last, to choose the layout per teacher
  (SENet154 is known to run slower in channels-last sometimes);
* ``fp16_cl_fold_graph_compile`` — ``torch.compile`` inside the graph (the ensemble only, at the middle
  batch size: Inductor takes about a minute per teacher and shape);
* ``bf16_cl_fold_graph`` (``bf16_cl_fold`` on a CPU, which runs real bf16 there) — the engine in bf16
  (``teacher_engine.dtype=bf16``), the ensemble at the middle batch size: its ``kl_vs_ref`` is the cost of
  bf16 in soft-target terms.

In fp16/bf16 the engine keeps each teacher's classifier in fp32 and returns fp32 logits; ``max_rel_err``
and ``kl_vs_ref`` (KL of the FP32 reference's softmax to the variant's, per row, averaged) are that
engine's distance to FP32. Every variant runs under the same ``cudnn.benchmark`` (``--cudnn-benchmark``,
on by default as in ``fastmeal train``).

Random weights (speed does not depend on them), with BatchNorm statistics calibrated on one random
batch so that activations have a realistic scale and FP16 cannot overflow. Before timing, every
variant is checked: its output buffer is poisoned with NaN and must be fully rewritten by one call,
and its logits are compared with the reference's on the same images (max relative error, and the
KL divergence between the softmaxes). The batch is handed over in the variant's input dtype and
layout, as the loader produces it.

The run keeps to a time budget (``--budget-s``; the GPU suite gives this script 150 s): rows are
measured in order of importance (the ensemble's reference and default engine first, compile last)
and whatever the budget does not reach is recorded as skipped.

Usage::

    python benchmarks/bench_teachers.py --json benchmarks/results/teachers.json [--quick]

Without CUDA it is a smoke run: small stand-ins of the teachers (same timm block types), 64 px,
FP32 (the engine's CPU dtype), no CUDA graphs, no compile; the notes and stdout say so.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastmeal.models.teachers import TeacherEnsemble  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The SPEC's r50_224 teachers (random weights: the tags only pick the architecture).
GPU_TEACHERS = {"senet154": dict(model_name="senet154"), "resnet152s": dict(model_name="resnet152s")}
# CPU stand-ins: the same timm classes and block types, one block per stage, narrower stages.
CPU_TEACHERS = {
    "senet154_small": dict(model_name="senet154", layers=(1, 1, 1, 1), channels=(32, 64, 128, 256)),
    "resnet152s_small": dict(model_name="resnet152s", layers=(1, 1, 1, 1), channels=(32, 64, 128, 256)),
}
COLUMNS = ["target", "variant", "batch", "img_per_s", "median_ms", "speedup_vs_ref", "max_rel_err", "kl_vs_ref",
           "status"]


@dataclass(frozen=True)
class Variant:
    name: str
    low_precision: bool
    channels_last: bool
    fold_bn: bool
    cuda_graph: bool
    compile: bool
    dtype: torch.dtype | None = None  # the low precision when it is not --dtype's


VARIANTS = {v.name: v for v in (
    Variant("fp32_nchw_eager", False, False, False, False, False),
    Variant("fp16_cl", True, True, False, False, False),
    Variant("fp16_cl_fold", True, True, True, False, False),
    Variant("fp16_cl_fold_graph", True, True, True, True, False),
    Variant("fp16_nchw_fold_graph", True, False, True, True, False),
    Variant("fp16_cl_fold_graph_compile", True, True, True, True, True),
    Variant("bf16_cl_fold_graph", True, True, True, True, False, torch.bfloat16),
    Variant("bf16_cl_fold", True, True, True, False, False, torch.bfloat16),
)}
REFERENCE = "fp32_nchw_eager"
COMPILE_RESERVE_S = 60.0  # budget left that a torch.compile row needs to start


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``images`` (one train-mode pass), then eval.

    timm's random init leaves running mean 0 / variance 1, which in eval mode lets activations grow
    layer after layer (FP16 would overflow) and zero-initialises the last BN of each residual branch.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.momentum = None
                m.reset_running_stats()
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.0)
        model.train()
        model(images)
    return model.eval()


def _plan(targets: list[str], batches: list[int], variants: list[str]) -> list[tuple[str, str, int]]:
    """(target, variant, batch) in order of importance; one ensemble is built per (target, variant)."""
    ensemble, teachers = targets[0], targets[1:]
    order: list[tuple[str, str]] = []
    order += [(ensemble, v) for v in (REFERENCE, "fp16_cl_fold_graph")]
    order += [(t, v) for t in teachers for v in (REFERENCE, "fp16_cl_fold_graph", "fp16_nchw_fold_graph")]
    order += [(tg, v) for v in ("fp16_cl", "fp16_cl_fold") for tg in targets]
    order += [(ensemble, "fp16_nchw_fold_graph")]
    plan = []
    for target, variant in order:
        if variant in variants:
            plan += [(target, variant, b) for b in batches]
    # bf16's distance to FP32 (and its speed) at one batch size: the graph variant on CUDA, eager on a CPU.
    bf16 = "bf16_cl_fold_graph" if "bf16_cl_fold_graph" in variants else "bf16_cl_fold"
    if bf16 in variants:
        plan.insert(len(batches) * 2, (ensemble, bf16, batches[len(batches) // 2]))
    # Inductor compiles per input shape (about a minute per teacher): the ensemble at one batch size.
    if "fp16_cl_fold_graph_compile" in variants:
        plan.append((ensemble, "fp16_cl_fold_graph_compile", batches[len(batches) // 2]))
    return plan


def _check(ens: TeacherEnsemble, x: torch.Tensor, reference: torch.Tensor | None) -> dict:
    """Poison the output, run once, require every element rewritten; compare with the reference."""
    out = ens(x)
    out.fill_(float("nan"))
    out = ens(x).float()
    if not torch.isfinite(out).all():
        raise RuntimeError("the output has NaN/inf after a call on a NaN-poisoned buffer (not every element written, "
                           "or an overflow)")
    if reference is None:
        return {}
    err = ((out - reference).abs().max() / reference.abs().max()).item()
    log_p, log_q = reference.double().log_softmax(-1), out.double().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return {"max_rel_err": err, "kl_vs_ref": kl}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result document here")
    parser.add_argument("--quick", action="store_true", help="B=64 only, no compile, fewer repeats")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 64 128 256 on CUDA)")
    parser.add_argument("--image-size", type=int, help="default 224 on CUDA, 64 on the CPU")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="the engine's low precision")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="the torch.compile variants (auto: on CUDA and not --quick)")
    parser.add_argument("--budget-s", type=float, default=125.0, help="stop starting new rows after this long")
    parser.add_argument("--cudnn-benchmark", choices=["on", "off"], default="on",
                        help="torch.backends.cudnn.benchmark for every variant (on: what fastmeal train does)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    notes: list[str] = []
    if on_cuda:
        specs = GPU_TEACHERS
        batches = args.batches or ([64] if args.quick else [64, 128, 256])
        size = args.image_size or 224
        warmup, repeats, inner = (3, 3, 2) if args.quick else (3, 5, 3)
        low = DTYPES[args.dtype]
        variants = [v for v in VARIANTS if args.compile == "on" or (args.compile == "auto" and not args.quick)
                    or not VARIANTS[v].compile]
    else:
        specs = CPU_TEACHERS
        batches = args.batches or ([4] if args.quick else [4, 8])
        size = args.image_size or 64
        warmup, repeats, inner = 1, 3, 1
        low = torch.float32  # the engine runs FP32 on the CPU (fastmeal.models.factory.teacher_dtype)
        variants = [v for v in VARIANTS if not VARIANTS[v].cuda_graph and v != "bf16_cl_fold"] + ["bf16_cl_fold"]
        notes.append("CPU SMOKE RUN: no CUDA; small stand-ins of senet154/resnet152s (same timm blocks, one block "
                     f"per stage), {size} px, FP32 (the 'fp16' variants run FP32: the engine's CPU dtype) except "
                     "bf16_cl_fold, which is real bf16 (emulated slowly by most CPUs); no CUDA graphs, no compile. "
                     "The times say nothing about a GPU; the bf16 row's kl_vs_ref is bf16's rounding, as on a GPU.")
        # One intra-op thread: on a shared CPU, two OpenMP threads waiting for each other made these small
        # convolutions up to 50x slower, and erratically so.
        torch.set_num_threads(1)
        if hasattr(os, "getloadavg"):
            notes.append(f"one intra-op thread; CPU load average at start {os.getloadavg()[0]:.1f} on "
                         f"{os.cpu_count()} cores (a shared machine: other jobs' load slows these rows unevenly)")
    if on_cuda and not any(VARIANTS[v].compile for v in variants):
        notes.append("torch.compile variants skipped (" + ("--quick" if args.quick else "--compile off") + ")")
    names = list(specs)
    targets = ["+".join(names), *names]
    settings = {"teachers": names, "image_size": size, "batches": batches, "low_precision": str(low),
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "warmup": warmup, "repeats": repeats, "inner": inner, "quick": args.quick, "budget_s": args.budget_s,
                "input": "random N(0,1) images in the variant's dtype and layout (as the loader hands them over)",
                "weights": "random (pretrained=False), BN statistics calibrated on one random batch"}
    print(f"bench_teachers on {harness.device_name(device)}: {', '.join(names)} at {size} px"
          + ("" if on_cuda else "  [CPU SMOKE RUN: times are not meaningful]"))

    torch.manual_seed(0)
    calib = torch.randn(16 if on_cuda else 8, 3, size, size, device=device)
    base = {}
    for name, spec in specs.items():
        with torch.device(device):  # initialise on the device: senet154's 115M parameters init slowly on a CPU
            model = timm.create_model(**spec, pretrained=False)
        base[name] = calibrate_batchnorm(model, calib)
    del calib

    inputs = {b: torch.randn(b, 3, size, size, device=device) for b in batches}
    references: dict[tuple[str, int], torch.Tensor] = {}
    ref_median: dict[tuple[str, int], float] = {}
    rows: list[dict] = []
    built: tuple[tuple[str, str], TeacherEnsemble] | None = None
    plan = _plan(targets, batches, variants)
    for target, variant_name, batch in plan:
        variant = VARIANTS[variant_name]
        dtype = (variant.dtype or low) if variant.low_precision else torch.float32
        row = {"target": target, "variant": variant_name, "batch": batch, "image_size": size,
               "dtype": str(dtype).removeprefix("torch.")}
        left = args.budget_s - (time.perf_counter() - start)
        # Inductor compiles each teacher for about a minute: do not start one that would overrun.
        if left < (COMPILE_RESERVE_S if variant.compile else 0):
            rows.append({**row, "status": "skipped: time budget"})
            continue
        try:
            if built is None or built[0] != (target, variant_name):
                built = None
                gc.collect()
                if on_cuda:
                    torch.cuda.empty_cache()
                models = [copy.deepcopy(base[n]) for n in target.split("+")]
                ens = TeacherEnsemble(models, device=device, dtype=dtype,
                                      channels_last=variant.channels_last, fold_bn=variant.fold_bn,
                                      cuda_graph=variant.cuda_graph and on_cuda, compile=variant.compile)
                built = ((target, variant_name), ens)
            ens = built[1]
            x = inputs[batch].to(ens.dtype, memory_format=ens.input_memory_format)
            ref = references.get((target, batch))
            if ref is None and "+" not in target and (targets[0], batch) in references:
                ref = references[(targets[0], batch)][targets[0].split("+").index(target)][None]
            row.update(_check(ens, x, ref))
            if variant_name == REFERENCE:
                references[(target, batch)] = ens(x).float().clone()
            times = harness.time_region(lambda ens=ens, x=x: ens(x), warmup=warmup, repeats=repeats, device=device,
                                        inner=inner)
            stats = harness.summarize(times)
            if variant_name == REFERENCE:
                ref_median[(target, batch)] = stats["median_s"]
            base_s = ref_median.get((target, batch))
            row.update({"img_per_s": batch / stats["median_s"], "median_ms": 1e3 * stats["median_s"],
                        "min_ms": 1e3 * stats["min_s"], "max_ms": 1e3 * stats["max_s"], "repeats": stats["repeats"],
                        "speedup_vs_ref": base_s / stats["median_s"] if base_s else None, "status": "ok"})
            if variant.fold_bn:
                row["bn_folded"] = sum(t["bn_folded"] for t in ens.report["teachers"])
                row["bn_left"] = sum(t["bn_left"] for t in ens.report["teachers"])
        except Exception as err:  # noqa: BLE001 - one failing row (OOM, compile error) is recorded, the rest run
            row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            built = None
        rows.append(row)
        # Written after every row: if the suite's time limit kills the run, what was measured remains.
        harness.write_result(args.json, benchmark="teachers", settings=settings, rows=rows,
                             notes=[*notes, f"PARTIAL: {len(rows)} of {len(plan)} rows so far"], device=device)
        print(f"  {target:28s} {variant_name:28s} B={batch:<4d} {row.get('img_per_s', 0):9.1f} img/s  "
              f"x{row.get('speedup_vs_ref') or 0:.2f}  {row['status']}", flush=True)

    ensemble_rows = [r for r in rows if r["target"] == targets[0] and r["variant"] == "fp16_cl_fold_graph"
                     and r.get("speedup_vs_ref")]
    if ensemble_rows:
        notes.append("ensemble, default engine (fp16 CL fold graph) vs FP32 NCHW eager reference: "
                     + ", ".join(f"B={r['batch']}: {r['speedup_vs_ref']:.2f}x" for r in ensemble_rows)
                     + " (SPEC goal on an H100: >= 3x)")
    for name in names:
        by_layout = {}
        for r in rows:
            if r["target"] == name and r["variant"] in ("fp16_cl_fold_graph", "fp16_nchw_fold_graph") \
                    and r.get("img_per_s"):
                by_layout.setdefault(r["variant"], []).append(r["img_per_s"])
        if len(by_layout) == 2:
            cl, nchw = (sum(by_layout[v]) / len(by_layout[v]) for v in ("fp16_cl_fold_graph", "fp16_nchw_fold_graph"))
            notes.append(f"{name}: channels-last {cl:.0f} vs NCHW {nchw:.0f} img/s (mean over batches) -> "
                         f"model.teachers[].channels_last={'true' if cl >= nchw else 'false'}")
    notes.append(f"wall time {time.perf_counter() - start:.0f} s (budget {args.budget_s:.0f} s)")
    doc = harness.write_result(args.json, benchmark="teachers", settings=settings, rows=rows, notes=notes,
                               device=device)
    return harness.report(doc, COLUMNS)


if __name__ == "__main__":
    main()
