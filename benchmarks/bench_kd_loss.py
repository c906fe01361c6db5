"""Forward + backward time and peak memory of the MEAL V2 loss: reference op chain, torch.compile, fused kernel.

Modes, each computing the same loss (kd + discriminator BCE) and its gradients w.r.t. the student
logits and the discriminator's parameters:

* ``reference`` — :func:`fastmeal.losses.reference_meal_v2_loss`, the original code's eager op chain
  (a softmax per teacher, stack, mean, log_softmax, bmm, mean; D targets built on the host each step).
  The reference runs in fp32; teacher logits are fp32 by default, as fastmeal's engine hands them over (its
  fp16/bf16 teachers keep their classifier in fp32); ``--teacher-dtype fp16`` measures half logits (cast to
  fp32 for the reference, the casts timed).
* ``compiled`` — ``torch.compile`` of that same function (Inductor, default mode).
* ``torch`` — :func:`fastmeal.losses.meal_v2_loss` with ``impl="torch"`` (fp32 math, cached targets).
* ``kernel`` — :func:`fastmeal.losses.meal_v2_loss` with ``impl="triton"`` (the fused ensemble-KD kernel).

Before timing, every mode's loss and gradients are checked against ``reference``.

This is a micro-benchmark of a launch-bound op: its ``speedup_vs_ref`` is the loss's own speed-up, not the
step's. With ``--train-step-json`` (a ``bench_train_step`` result of the same machine, as the device suite
passes) each row also gets what matters for training: ``loss_share_of_step_pct`` (this mode's loss time as
a share of the fastmeal step at the same batch) and ``step_speedup_from_loss`` (the whole step's speed-up
that replacing the reference chain by this mode gives, all else equal: Amdahl's law on measured times).

Rows are measured in order of value (the cheap modes at every batch first, then ``compiled`` at one batch
size, because Inductor compiles cold for every shape) and the JSON is rewritten after every row, so a run
stopped by ``--budget-s`` or killed by the suite keeps what it measured.

Usage::

    python benchmarks/bench_kd_loss.py --json benchmarks/results/kd_loss.json [--quick] [--budget-s S]
        [--train-step-json train_step.json]

On a machine without CUDA it is only a smoke run (Triton interpreter, tiny batches, no
``torch.compile`` unless ``--compile on``): the numbers then say nothing about speed, and the JSON
notes and stdout say so.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
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
COLUMNS = ["mode", "batch", "classes", "teachers", "median_ms", "min_ms", "max_ms", "peak_mib", "speedup_vs_ref",
           "loss_share_of_step_pct", "step_speedup_from_loss"]
COMPILE_RESERVE_S = 45.0  # what a cold Inductor compile of the chain needs to be started


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


def step_times_ms(path: str | None) -> tuple[dict[int, float], str]:
    """Per-batch milliseconds of one fastmeal step without the loader, from a ``bench_train_step`` result,
    and the mode of this benchmark whose loss that step ran (``loss.impl=auto``: the kernel on CUDA)."""
    if not path or not Path(path).is_file():
        return {}, "kernel"
    doc = json.loads(Path(path).read_text())
    times = {r["batch"]: 1e3 * r["batch"] / r["step_images_per_s"] for r in doc.get("rows", [])
             if r.get("mode") == "fastmeal" and r.get("step_images_per_s")}
    return times, "torch" if str(doc.get("device", "")).startswith("cpu") else "kernel"


def add_step_share(rows: list[dict], step_ms: dict[int, float], in_step: str) -> None:
    """``loss_share_of_step_pct`` and ``step_speedup_from_loss`` of every row whose batch has a step time.

    The fastmeal step contains the loss of mode ``in_step`` (the kernel on CUDA); with another loss in its
    place it would take ``step - in_step + mode``. So the reference chain's step is
    ``step - in_step + reference`` and a mode's step speed-up over it is that over ``step - in_step + mode``.
    """
    by_key = {(r["mode"], r["batch"]): r["median_ms"] for r in rows}
    for row in rows:
        step, inside = step_ms.get(row["batch"]), by_key.get((in_step, row["batch"]))
        ref = by_key.get(("reference", row["batch"]))
        if step is None or inside is None or ref is None:
            continue
        mode_step = step - inside + row["median_ms"]
        row["loss_share_of_step_pct"] = 100 * row["median_ms"] / mode_step
        row["step_speedup_from_loss"] = (step - inside + ref) / mode_step


def main(argv: list[str] | None = None) -> dict:
    parser = harness.loss_bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--teachers", type=int, default=2)
    parser.add_argument("--teacher-dtype", choices=sorted(DTYPES), default="fp32",
                        help="the teacher logits' dtype (fp32: what the teacher engine hands the loss)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="benchmark torch.compile of the reference chain (auto: only on CUDA)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="start no row after this many seconds (0: none)")
    parser.add_argument("--train-step-json", help="a bench_train_step result: the loss's share of the whole step")
    args = parser.parse_args(argv)
    began = time.perf_counter()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    notes: list[str] = []
    if on_cuda:
        batches = args.batches or [64, 128, 256]  # bench_train_step's per-GPU batches: the step share needs them
        warmup, repeats, inner = (3, 5, 5) if args.quick else (10, 20, 20)
    else:
        batches = args.batches or ([8] if args.quick else [8, 16])  # 8: bench_train_step --quick's batch
        warmup, repeats, inner = 1, 3, 1
        notes.append("CPU SMOKE RUN: no CUDA, Triton kernels run in the interpreter and tiny batches are used; "
                     "these times say nothing about speed on a GPU.")
    compile_reference = args.compile == "on" or (args.compile == "auto" and on_cuda)
    if not compile_reference:
        notes.append("torch.compile mode skipped: " + ("--compile off" if args.compile == "off" else
                     "no CUDA (Inductor's CPU build takes minutes on a shared CPU and its time would mean nothing "
                     "here; pass --compile on to force it)"))
    teacher_dtype = DTYPES[args.teacher_dtype]
    step_ms, in_step = step_times_ms(args.train_step_json)
    compile_batch = batches[len(batches) // 2]
    settings = {"batches": batches, "classes": args.classes, "teachers": args.teachers,
                "compiled_batch": compile_batch if compile_reference else None, "budget_s": args.budget_s,
                "train_step_json": args.train_step_json, "step_ms_by_batch": step_ms,
                "teacher_dtype": args.teacher_dtype, "student_dtype": "fp32", "discriminator": "Discriminator(C)",
                "warmup": warmup, "repeats": repeats, "inner": inner, "quick": args.quick,
                "timed": "forward + backward (autograd.grad w.r.t. student logits and D parameters)"}
    print(f"bench_kd_loss on {harness.device_name(device)}" + ("  [CPU SMOKE RUN: times are not meaningful]"
                                                              if not on_cuda else ""))

    modes = _build_modes(compile_reference)
    # In order of value: the eager modes at every batch, then the compiled chain at one batch (a cold Inductor
    # compile per shape, and the host-built D target makes it recompile: minutes over several batches).
    plan = [(name, batch) for batch in batches for name in modes if name != "compiled"]
    if "compiled" in modes:
        plan.append(("compiled", compile_batch))
    rows: list[dict] = []
    inputs: dict[int, tuple] = {}
    reference_median: dict[int, float] = {}
    skipped: list[str] = []
    notes.append("every mode's loss parts and gradients were checked against the reference chain before timing "
                 "(rtol 1e-4 on the loss, 1e-3 on gradients: with half teacher logits the kernel hands D their "
                 "mean rounded to that dtype)")

    def write(final: bool) -> dict:
        add_step_share(rows, step_ms, in_step)
        extra = [] if final else [f"PARTIAL: {len(rows)} of {len(plan)} rows so far"]
        return harness.write_result(args.json, benchmark="kd_loss", settings=settings, rows=rows,
                                    notes=[*notes, *extra], device=device)

    for name, batch in plan:
        spent = time.perf_counter() - began
        if args.budget_s and spent + (COMPILE_RESERVE_S if name == "compiled" else 0.0) > args.budget_s:
            skipped.append(f"{name}@{batch}")
            continue
        if batch not in inputs:
            gen = torch.Generator().manual_seed(batch)
            student = (4 * torch.randn(batch, args.classes, generator=gen)).to(device).requires_grad_()
            teachers = (4 * torch.randn(args.teachers, batch, args.classes, generator=gen)).to(device, teacher_dtype)
            torch.manual_seed(0)
            disc = Discriminator(args.classes).to(device)
            inputs[batch] = (student, teachers, disc, _fwd_bwd(_reference_loss, student, teachers, disc))
        student, teachers, disc, reference = inputs[batch]
        loss_fn = modes[name]
        try:
            _check_against_reference(name, loss_fn, student, teachers, disc, reference)
        except Exception as err:  # noqa: BLE001 - a failing compiled mode is recorded, the others still run
            if name != "compiled":
                raise
            notes.append(f"compiled mode dropped: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        fn = functools.partial(_fwd_bwd, loss_fn, student, teachers, disc)
        times = harness.time_region(fn, warmup=warmup, repeats=repeats, device=device, inner=inner)
        stats = harness.summarize(times)
        if name == "reference":
            reference_median[batch] = stats["median_s"]
        ref_s = reference_median.get(batch)
        rows.append({"mode": name, "batch": batch, "classes": args.classes, "teachers": args.teachers,
                     "median_ms": 1e3 * stats["median_s"], "min_ms": 1e3 * stats["min_s"],
                     "max_ms": 1e3 * stats["max_s"], "repeats": stats["repeats"],
                     "peak_mib": _peak_mib(fn, device),
                     "speedup_vs_ref": ref_s / stats["median_s"] if ref_s else None, "checked_vs_reference": True,
                     "loss_share_of_step_pct": None, "step_speedup_from_loss": None})
        write(final=False)  # after every row: a kill keeps what was measured
        print(f"  {name:9s} B={batch:<5d} {1e3 * stats['median_s']:9.4g} ms", flush=True)
    if skipped:
        notes.append(f"--budget-s {args.budget_s:g}: not started: {', '.join(skipped)}")
    if step_ms:
        notes.append("loss_share_of_step_pct / step_speedup_from_loss: from the fastmeal step times of "
                     f"{args.train_step_json} (batches {sorted(step_ms)}), whose loss was this run's {in_step!r} "
                     "mode; the loss speed-up alone "
                     "(speedup_vs_ref) is not the step's")
    else:
        notes.append("no train-step result given (--train-step-json), or none at these batches: the loss's share of "
                     "the step is not reported; speedup_vs_ref is the loss's own speed-up, not the step's")
    return harness.report(write(final=True), COLUMNS)


if __name__ == "__main__":
    main()
