"""Compile the Triton kernels for real GPUs without one, and tabulate registers, spills and shared memory.

Triton compiles ahead of time for any target: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc,
32))`` lowers a kernel to PTX and assembles it with the ``ptxas`` shipped in the triton wheel; the
``cuobjdump`` shipped next to it reads the cubin's resource usage. This script compiles every variant the
launchers (``launch_config`` in ``kernels/ensemble_kd.py`` and ``kernels/topk_soft_ce.py``) can choose, for
sm_80 (A100), sm_90 (H100/H200) and sm_100 (B200), and writes a summary per kernel and arch (``rows``: the
table of benchmarks/README.md) and one row per variant (``details``):

    kernel, arch, K, BLOCK, num_warps, dtypes, the class counts it serves, registers per thread,
    stack bytes (ptxas puts only spilled registers there in these kernels: they have no local arrays
    and make no calls), shared memory bytes, and the cold compile time.

Which variants (the full product is too large to compile in CI: 27 dtype triples × 64 K for top-K):

* every (BLOCK, num_warps) the launcher picks over all class counts (probed at each power of two and one
  above it, so every block bucket is hit, up to 2^16 + 1 classes);
* the dtypes the trainer passes (``fastmeal.losses``: fp32 student rows; teachers in fp32, fp16 or bf16;
  the bank's fp16 probabilities and int16 classes) at every K for the ensemble (1-8 teachers) and at
  ``TOPK_KS`` for the bank's top-K;
* the other dtypes the ops accept (fp16/bf16 students; fp32/bf16 probabilities; int32/int64 indices, one
  factor changed at a time) at the largest K, on the blocks of 1,024 classes and wider, where registers
  run short.

Usage::

    python benchmarks/kernel_resources.py --json benchmarks/results/kernel_resources.json

Exit status 0 when every variant compiled; 1 when one failed (the row says why); 3 (and a reason) when
this triton has no ptxas/cuobjdump for NVIDIA targets.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import triton

ARCHS = (80, 90, 100)
ENSEMBLE_KS = tuple(range(1, 9))  # kernels/ensemble_kd.py: MAX_TEACHERS = 8
TOPK_KS = (1, 2, 3, 4, 5, 6, 8, 10, 16, 20, 32, 48, 64)  # bank.top_k is in [1, 64], default 5
WIDE = 1024  # blocks at least this wide get the other accepted dtypes too
CLASS_PROBES = sorted({1000, 21843, *(n for i in range(17) for n in (2**i, 2**i + 1))})
SKIP = 3  # exit status: no NVIDIA toolchain in this triton
_TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int16": "i16", "int32": "i32",
                    "int64": "i64"}


def toolchain() -> tuple[str | None, str]:
    """``(bin folder, "")`` of the wheel's ptxas and cuobjdump, or ``(None, reason)`` when they are absent."""
    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [name for name in ("ptxas", "ptxas-blackwell", "cuobjdump") if not (folder / name).is_file()]
    if missing:
        return None, f"triton {triton.__version__} has no {', '.join(missing)} in {folder}"
    return str(folder), ""


def _launches(op: str, k: int) -> dict[tuple, list[int]]:
    """The distinct ``(kernel name, constexprs, num_warps)`` the launcher picks, each with the class counts probed."""
    if op == "ensemble_kd":
        from fastmeal.kernels.ensemble_kd import launch_config
    else:
        from fastmeal.kernels.topk_soft_ce import launch_config
    seen: dict[tuple, list[int]] = {}
    for num_classes in CLASS_PROBES:
        if op == "topk_soft_ce" and k > num_classes:
            continue
        kernel, constexprs, num_warps = launch_config(num_classes, k)
        seen.setdefault((kernel.fn.__name__, tuple(sorted(constexprs.items())), num_warps), []).append(num_classes)
    return seen


def _dtype_sets(op: str) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(the trainer's dtype tuples, the other accepted ones): (teacher, student) or (student, probs, indices)."""
    if op == "ensemble_kd":
        used = [(t, "fp32") for t in ("fp32", "fp16", "bf16")]
        other = [(t, s) for s in ("fp16", "bf16") for t in ("fp32", "fp16", "bf16")]
        return used, other
    used = [("fp32", "fp16", "i16")]
    other = [("fp16", "fp16", "i16"), ("bf16", "fp16", "i16"), ("fp32", "fp32", "i16"), ("fp32", "bf16", "i16"),
             ("fp32", "fp16", "i32"), ("fp32", "fp16", "i64")]
    return used, other


def variants(archs: tuple[int, ...] = ARCHS) -> list[dict[str, Any]]:
    """Every variant to compile (see the module docstring), as plain dicts (they cross process boundaries)."""
    jobs = []
    for op, ks in (("ensemble_kd", ENSEMBLE_KS), ("topk_soft_ce", TOPK_KS)):
        used, other = _dtype_sets(op)
        for k in ks:
            for (kernel, constexprs, num_warps), classes in _launches(op, k).items():
                block = dict(constexprs)["BLOCK"]
                dtype_sets = used + (other if k == ks[-1] and block >= WIDE else [])
                for dtypes in dtype_sets:
                    for arch in archs:
                        jobs.append({"op": op, "kernel": kernel, "arch": arch, "K": k, "BLOCK": block,
                                     "num_warps": num_warps, "constexprs": dict(constexprs), "dtypes": list(dtypes),
                                     "classes_min": min(classes),
                                     "classes_max": None if max(classes) == CLASS_PROBES[-1] else max(classes)})
    return jobs


def _signature(fn, op: str, dtypes: list[str], constexprs: dict[str, int]) -> dict[str, str]:
    """Triton's type of each argument, as the launcher's call would have it (strides and counts are i32)."""
    if op == "ensemble_kd":
        t, s = dtypes
        pointers = [t, s, t, s, "fp32", "fp32"]  # t, s, t_bar, grad, ce_rows, kl_rows
    else:
        s, p, i = dtypes
        pointers = [s, p, i, "fp32", s, "fp32", "fp32"]  # s, probs, indices, target, grad, ce_rows, kl_rows
    pointers = iter(pointers)
    sig = {}
    for param in fn.params:
        name = param.name
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + next(pointers)
        else:
            sig[name] = "fp32" if name == "inv_batch" else "i32"
    return sig


def compile_one(job: dict[str, Any], bin_dir: str) -> dict[str, Any]:
    """Compile one variant for its arch; the job's row with registers, stack (spill) and shared bytes added."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = __import__(f"fastmeal.kernels.{job['op']}", fromlist=[job["kernel"]])
    fn = getattr(module, job["kernel"])
    row = dict(job)
    row.pop("constexprs")
    start = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(fn, _signature(fn, job["op"], job["dtypes"], job["constexprs"]),
                                            job["constexprs"]),
                                  target=GPUTarget("cuda", job["arch"], 32), options={"num_warps": job["num_warps"]})
    except Exception as exc:  # noqa: BLE001 - a failed variant is a row of the table, and fails the run
        row.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[-400:]}")
        return row
    row["compile_s"] = round(time.perf_counter() - start, 3)
    row.update(status="ok", **_resource_usage(compiled.asm["cubin"], bin_dir))
    return row


def _resource_usage(cubin: bytes, bin_dir: str) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output: {out[-500:]}")
    regs, stack, shared, local = map(int, match.groups())
    return {"registers": regs, "stack_bytes": stack, "shared_bytes": shared, "local_bytes": local}


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def run(jobs: list[dict[str, Any]], bin_dir: str, workers: int) -> list[dict[str, Any]]:
    """Compile ``jobs`` in ``workers`` processes, with a fresh triton cache (cold compile times)."""
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache_dir:
        _worker_init(cache_dir)
        with concurrent.futures.ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(cache_dir,)) as pool:
            return list(pool.map(compile_one, jobs, [bin_dir] * len(jobs), chunksize=8))


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kernel and arch: variants, failures, the most registers, and the variants that spill."""
    out = []
    for key in sorted({(r["kernel"], r["arch"]) for r in rows}):
        group = [r for r in rows if (r["kernel"], r["arch"]) == key]
        ok = [r for r in group if r["status"] == "ok"]
        spills = [r for r in ok if r["stack_bytes"] > 0]
        out.append({"kernel": key[0], "arch": f"sm_{key[1]}", "variants": len(group),
                    "failed": len(group) - len(ok), "max_registers": max((r["registers"] for r in ok), default=0),
                    "max_shared": max((r["shared_bytes"] for r in ok), default=0), "spilling": len(spills),
                    "spills_at": " ".join(sorted({f"K{r['K']}/B{r['BLOCK']}/w{r['num_warps']}" for r in spills}))})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the table here")
    parser.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), help="compute capabilities")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    # The kernels must be compiled, not interpreted: under TRITON_INTERPRET=1 (the CPU tests) @triton.jit gives
    # an interpreter object that triton.compile cannot lower. Triton reads it when the kernels are imported.
    os.environ.pop("TRITON_INTERPRET", None)
    bin_dir, reason = toolchain()
    if bin_dir is None:
        print(f"SKIPPED: {reason}")
        return SKIP
    jobs = variants(tuple(args.archs))
    print(f"compiling {len(jobs)} variants for {', '.join(f'sm_{a}' for a in args.archs)} "
          f"with {args.workers} processes ...", flush=True)
    start = time.perf_counter()
    rows = run(jobs, bin_dir, args.workers)
    wall = time.perf_counter() - start
    notes = [f"{len(rows)} variants compiled in {wall:.0f} s wall with {args.workers} processes (a cold triton "
             "cache); stack_bytes > 0 means registers spilled to local memory"]
    doc = harness.write_result(args.json, benchmark="kernel_resources", device="cpu",
                               settings={"archs": args.archs, "ensemble_ks": ENSEMBLE_KS, "topk_ks": TOPK_KS,
                                         "class_probes": CLASS_PROBES, "wall_s": round(wall, 1)},
                               rows=summary(rows), details=rows, notes=notes)
    harness.report(doc, ["kernel", "arch", "variants", "failed", "max_registers", "max_shared", "spilling",
                         "spills_at"])
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed[:5]:
        print("FAILED:", r["kernel"], f"sm_{r['arch']}", r["K"], r["BLOCK"], r["num_warps"], r["dtypes"], r["error"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
