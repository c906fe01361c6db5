"""Forward + backward time and peak memory of the MEAL V2 loss: reference op chain, torch.compile, fused kernel.

Modes, each computing the same loss (kd + discriminator BCE) and its gradients w.r.t. the student
logits and the discriminator's parameters:

* ``reference`` — :func:`fastmeal.losses.reference_meal_v2_loss`, the original code's eager op chain
  (a softmax per teacher, stack, mean, log_softmax, bmm, mean; D targets built on the host each step).
  The reference runs in fp32, so it is handed the fp16 teacher logits cast to fp32 (the casts are timed).
* ``compiled`` — ``torch.compile`` of that same function (Inductor, default mode).
* ``torch`` — :func:`fastmeal.losses.meal_v2_loss` with ``impl="torch"`` (fp32 math, cached targets).
* ``kernel`` — :func:`fastmeal.losses.meal_v2_loss` with ``impl="triton"`` (the fused ensemble-KD kernel).

Before timing, every mode's loss and gradients are checked against ``reference``.

Usage::

    python benchmarks/bench_kd_loss.py --json benchmarks/results/kd_loss.json [--quick]

On a machine without CUDA it is only a smoke run (Triton interpreter, tiny batches, no
``torch.compile`` unless ``--compile on``): the numbers then say nothing about speed, and the JSON
notes and stdout say so.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before fastmeal.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastmeal.losses import meal_v2_loss, reference_meal_v2_loss  # noqa: E402
from fastmeal.models.discriminator import Discriminator  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COLUMNS = ["mode", "batch", "classes", "teachers", "median_ms", "min_ms", "max_ms", "peak_mib", "speedup_vs_ref"]


def _reference_loss(student, teachers, disc):
    # The reference pipeline is fp32 end to end: its teachers would hand it fp32 logits.
    return reference_meal_v2_loss(student, [t.float() for t in teachers], disc)


def _build_modes(compile_reference: bool) -> dict:
    modes = {"reference": _reference_loss}
    if compile_reference:
        modes["compiled"] = torch.compile(_reference_loss)
    modes["torch"] = lambda s, t, d: meal_v2_loss(s, t, d, impl="torch")
    modes["kernel"] = lambda s, t, d: meal_v2_loss(s, t, d, impl="triton")
    return modes


def _fwd_bwd(loss_fn, student, teachers, disc):
    """One forward and backward; gradients returned (not accumulated) so repeats do identical work."""
    out = loss_fn(student, teachers, disc)
    grads = torch.autograd.grad(out["loss"], [student, *disc.parameters()])
    return out, grads


def _check_against_reference(name, loss_fn, student, teachers, disc, reference) -> None:
    out, grads = _fwd_bwd(loss_fn, student, teachers, disc)
    ref_out, ref_grads = reference
    # The kernel path hands D the mean teacher logits rounded to fp16 (the reference's stay fp32):
    # a 2^-11 relative change of D's input, hence 1e-4 rather than fp32-level tolerances.
    for key in ("loss", "kd", "d"):
        torch.testing.assert_close(out[key], ref_out[key], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, key=key: f"{name}: {key} differs from the reference: {m}")
    for i, (g, g_ref) in enumerate(zip(grads, ref_grads, strict=True)):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-5,
                                   msg=lambda m, i=i: f"{name}: gradient {i} differs from the reference: {m}")


def _peak_mib(fn, device: torch.device) -> float | None:
    """Peak memory allocated by one call above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result document here")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (and the smallest sizes on a CPU)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 64 256 1024 on CUDA)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--teachers", type=int, default=2)
    parser.add_argument("--teacher-dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="benchmark torch.compile of the reference chain (auto: only on CUDA)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    notes: list[str] = []
    if on_cuda:
        batches = args.batches or [64, 256, 1024]
        warmup, repeats, inner = (3, 5, 5) if args.quick else (10, 20, 20)
    else:
        batches = args.batches or ([4] if args.quick else [4, 16])
        warmup, repeats, inner = 1, 3, 1
        notes.append("CPU SMOKE RUN: no CUDA, Triton kernels run in the interpreter and tiny batches are used; "
                     "these times say nothing about speed on a GPU.")
    compile_reference = args.compile == "on" or (args.compile == "auto" and on_cuda)
    if not compile_reference:
        notes.append("torch.compile mode skipped: " + ("--compile off" if args.compile == "off" else
                     "no CUDA (Inductor's CPU build takes minutes on a shared CPU and its time would mean nothing "
                     "here; pass --compile on to force it)"))
    teacher_dtype = DTYPES[args.teacher_dtype]
    settings = {"batches": batches, "classes": args.classes, "teachers": args.teachers,
                "teacher_dtype": args.teacher_dtype, "student_dtype": "fp32", "discriminator": "Discriminator(C)",
                "warmup": warmup, "repeats": repeats, "inner": inner, "quick": args.quick,
                "timed": "forward + backward (autograd.grad w.r.t. student logits and D parameters)"}
    print(f"bench_kd_loss on {harness.device_name(device)}" + ("  [CPU SMOKE RUN: times are not meaningful]"
                                                              if not on_cuda else ""))

    modes = _build_modes(compile_reference)
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        student = (4 * torch.randn(batch, args.classes, generator=gen)).to(device).requires_grad_()
        teachers = (4 * torch.randn(args.teachers, batch, args.classes, generator=gen)).to(device, teacher_dtype)
        torch.manual_seed(0)
        disc = Discriminator(args.classes).to(device)
        reference = _fwd_bwd(_reference_loss, student, teachers, disc)
        reference_median = None
        for name, loss_fn in list(modes.items()):
            try:
                _check_against_reference(name, loss_fn, student, teachers, disc, reference)
            except Exception as err:  # noqa: BLE001 - a failing mode is recorded, the others still run
                if name != "compiled":
                    raise
                notes.append(f"compiled mode dropped: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                del modes[name]
                continue
            fn = functools.partial(_fwd_bwd, loss_fn, student, teachers, disc)
            times = harness.time_region(fn, warmup=warmup, repeats=repeats, device=device, inner=inner)
            stats = harness.summarize(times)
            if name == "reference":
                reference_median = stats["median_s"]
            rows.append({"mode": name, "batch": batch, "classes": args.classes, "teachers": args.teachers,
                         "median_ms": 1e3 * stats["median_s"], "min_ms": 1e3 * stats["min_s"],
                         "max_ms": 1e3 * stats["max_s"], "repeats": stats["repeats"],
                         "peak_mib": _peak_mib(fn, device),
                         "speedup_vs_ref": reference_median / stats["median_s"], "checked_vs_reference": True})
    notes.append("every mode's loss parts and gradients were checked against the reference chain before timing "
                 "(rtol 1e-4 on the loss, 1e-3 on gradients: the kernel feeds D fp16-rounded mean teacher logits)")

    doc = harness.write_result(args.json, benchmark="kd_loss", settings=settings, rows=rows, notes=notes,
                               device=device)
    return harness.report(doc, COLUMNS)


if __name__ == "__main__":
    main()
