"""Linear-probe fit: all penalties as one batched L-BFGS problem vs one after the other (fastmeal.probe.fit_probe).

Features are random Gaussian blobs of a realm's shape (N train, d, C); both solvers run the same algorithm
(one L-BFGS state per λ), so the numbers they reach are the same and only the time differs. Run:

    python benchmarks/bench_probe_fit.py --json benchmarks/results/probe_fit_cpu-2core.json
"""

from __future__ import annotations

import argparse
import functools

import harness
import torch

from fastmeal.probe import LAMBDAS, fit_probe


def blobs(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(n) % classes
    return centres[labels] + torch.randn(n, d, generator=g) * 1.5, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the result document here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100, help="L-BFGS steps (the protocol runs 1000)")
    parser.add_argument("--shapes", default="240x256x8,1000x512x50",
                        help="NxDxC realm shapes (train images x feature size x classes), comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes.split(","):
        n, d, c = (int(v) for v in shape.split("x"))
        train, val, test = blobs(n, d, c, 0), blobs(n // 2, d, c, 1), blobs(n // 2, d, c, 2)
        for batched in (True, False):
            fit = functools.partial(fit_probe, train, {"val": val, "test": test}, c, num_steps=args.steps,
                                    eval_every=args.steps, batched=batched, device=device)
            times = harness.time_region(fit, warmup=0, repeats=args.repeats, device=device)
            rows.append({"shape": shape, "solver": "batched" if batched else "per-lambda", **harness.summarize(times)})
        rows[-2]["speedup"] = rows[-1]["median_s"] / rows[-2]["median_s"]
    doc = harness.write_result(args.json, benchmark="probe_fit", device=device, rows=rows,
                               settings={"steps": args.steps, "lambdas": list(LAMBDAS), "shapes": args.shapes},
                               notes=["both solvers take the same L-BFGS steps per lambda; only the batching differs"])
    harness.report(doc, ["shape", "solver", "median_s", "min_s", "max_s", "speedup"])


if __name__ == "__main__":
    main()
