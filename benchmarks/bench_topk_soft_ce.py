"""Forward + backward time of the soft-label bank's loss: plain PyTorch vs the sparse-target kernel, next to online.

Modes, each computing its loss (kd + discriminator BCE) and the gradients w.r.t. the student logits and
the discriminator's parameters:

* ``online`` — :func:`fastmeal.losses.meal_v2_loss` with ``impl="auto"`` on two fp16 teachers' logits
  (what a bank step replaces; for scale);
* ``bank_torch`` — :func:`fastmeal.losses.bank_meal_v2_loss` with ``impl="torch"``: decode the top-K
  records to a ``[B, C]`` target, then the soft CE and D in plain ops (the reference of the kernel);
* ``bank_kernel`` — the same with ``impl="triton"`` (:mod:`fastmeal.kernels.topk_soft_ce`).

Before timing, ``bank_kernel``'s loss and gradients are checked against ``bank_torch``.

Usage::

    python benchmarks/bench_topk_soft_ce.py --json benchmarks/results/topk_soft_ce.json [--quick]

Without CUDA it is only a smoke run (Triton interpreter, tiny batches): the JSON notes say so.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from fastmeal.losses import bank_meal_v2_loss, meal_v2_loss  # noqa: E402
from fastmeal.models.discriminator import Discriminator  # noqa: E402

COLUMNS = ["mode", "batch", "classes", "top_k", "median_ms", "min_ms", "max_ms", "speedup_vs_bank_torch"]


def _modes() -> dict:
    return {
        "online": lambda s, rec, t, d: meal_v2_loss(s, t, d, impl="auto"),
        "bank_torch": lambda s, rec, t, d: bank_meal_v2_loss(s, *rec, d, impl="torch"),
        "bank_kernel": lambda s, rec, t, d: bank_meal_v2_loss(s, *rec, d, impl="triton"),
    }


def _fwd_bwd(loss_fn, student, records, teachers, disc):
    out = loss_fn(student, records, teachers, disc)
    return out, torch.autograd.grad(out["loss"], [student, *disc.parameters()])


def main(argv: list[str] | None = None) -> dict:
    parser = harness.loss_bench_parser(__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    if device.type == "cuda":
        batches = args.batches or [64, 256, 1024]
        warmup, repeats, inner = (3, 5, 5) if args.quick else (10, 20, 20)
    else:
        batches = args.batches or [4]
        warmup, repeats, inner = 1, 3, 1
        notes.append("CPU SMOKE RUN: no CUDA, the Triton kernel runs in the interpreter on tiny batches; these "
                     "times say nothing about speed on a GPU.")
    settings = {"batches": batches, "classes": args.classes, "top_k": args.top_k, "teachers_online": 2,
                "warmup": warmup, "repeats": repeats, "inner": inner, "quick": args.quick,
                "records": "fp16 probabilities + int16 classes", "timed": "forward + backward"}
    print(f"bench_topk_soft_ce on {harness.device_name(device)}"
          + ("" if device.type == "cuda" else "  [CPU SMOKE RUN: times are not meaningful]"))
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        student = (4 * torch.randn(batch, args.classes, generator=gen)).to(device).requires_grad_()
        teachers = (4 * torch.randn(2, batch, args.classes, generator=gen)).to(device, torch.float16)
        probs, classes = torch.softmax(teachers.float(), -1).mean(0).topk(args.top_k, dim=-1)
        records = (probs.half(), classes.to(torch.int16))
        torch.manual_seed(0)
        disc = Discriminator(args.classes).to(device)
        ref_out, ref_grads = _fwd_bwd(_modes()["bank_torch"], student, records, teachers, disc)
        out, grads = _fwd_bwd(_modes()["bank_kernel"], student, records, teachers, disc)
        for key in ("loss", "kd", "d"):
            torch.testing.assert_close(out[key], ref_out[key], rtol=1e-5, atol=1e-5)
        for g, g_ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
        base = None
        for name, loss_fn in _modes().items():
            fn = functools.partial(_fwd_bwd, loss_fn, student, records, teachers, disc)
            stats = harness.summarize(harness.time_region(fn, warmup=warmup, repeats=repeats, device=device,
                                                          inner=inner))
            if name == "bank_torch":
                base = stats["median_s"]
            rows.append({"mode": name, "batch": batch, "classes": args.classes, "top_k": args.top_k,
                         "median_ms": 1e3 * stats["median_s"], "min_ms": 1e3 * stats["min_s"],
                         "max_ms": 1e3 * stats["max_s"], "repeats": stats["repeats"], "_median_s": stats["median_s"]})
        for row in rows:
            if row["batch"] == batch:
                row["speedup_vs_bank_torch"] = base / row.pop("_median_s")
    notes.append("bank_kernel's loss parts and gradients were checked against bank_torch before timing "
                 "(rtol 1e-5 on the loss, 1e-4 on gradients)")
    doc = harness.write_result(args.json, benchmark="topk_soft_ce", settings=settings, rows=rows, notes=notes,
                               device=device)
    return harness.report(doc, COLUMNS)


if __name__ == "__main__":
    main()
