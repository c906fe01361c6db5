"""Every Triton kernel variant the launchers can choose compiles for real GPUs (sm_80, sm_90, sm_100), on a CPU.

``benchmarks/kernel_resources.py`` lowers each variant to PTX and assembles it with the ptxas shipped in the
triton wheel (no GPU, no driver), then reads the cubin's registers and stack with the wheel's cuobjdump. The
CPU tests run the kernels in Triton's interpreter, which never meets ptxas: this is what catches a kernel
that does not compile, or spills, on the GPUs users have. Which variants (all launcher choices; dtypes and
top-K values sampled where the full product is too large for CI) is the script's docstring.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import kernel_resources  # noqa: E402

IMAGENET_1K = 1000


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    bin_dir, reason = kernel_resources.toolchain()
    if bin_dir is None:
        pytest.skip(f"no NVIDIA toolchain to compile with: {reason}")
    out = tmp_path_factory.mktemp("kernels") / "kernel_resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "kernel_resources.py"), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())["details"]


def test_the_variants_are_the_launchers_choices():
    """Every (kernel, BLOCK, num_warps) the launcher picks for some class count is in the compile list."""
    from fastmeal.kernels import ensemble_kd, topk_soft_ce

    jobs = kernel_resources.variants((90,))
    listed = {(j["kernel"], j["K"], j["BLOCK"], j["num_warps"]) for j in jobs}
    for num_classes in (1, 10, 100, 129, 1000, 1024, 1025, 4096, 4097, 8192, 21843, 60000):
        for k in kernel_resources.ENSEMBLE_KS:
            kernel, constexprs, num_warps = ensemble_kd.launch_config(num_classes, k)
            assert (kernel.fn.__name__, k, constexprs["BLOCK"], num_warps) in listed
        for k in kernel_resources.TOPK_KS:
            if k <= num_classes:
                kernel, constexprs, num_warps = topk_soft_ce.launch_config(num_classes, k)
                assert (kernel.fn.__name__, k, constexprs["BLOCK"], num_warps) in listed
    assert {j["arch"] for j in kernel_resources.variants()} == {80, 90, 100}


@pytest.mark.slow
def test_every_variant_compiles_for_sm80_sm90_sm100(table):
    proc, rows = table
    failed = [r for r in rows if r["status"] != "ok"]
    assert not failed, failed[:3]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(rows) == len(kernel_resources.variants())
    for r in rows:
        # A real cubin: registers allocated, within the 255 a thread can address and the 64 K of an SM's file.
        assert 0 < r["registers"] <= 255 and r["registers"] * 32 * r["num_warps"] <= 65536, r


@pytest.mark.slow
def test_no_spills_up_to_four_and_none_for_imagenet_1k(table):
    """ptxas spills registers to local memory (stack bytes) in no variant with K <= 4 (teachers, or top-K
    entries), and in no variant an ImageNet-1k head uses, whatever K."""
    _, rows = table
    spills = [r for r in rows if r["stack_bytes"] > 0 and (
        r["K"] <= 4 or r["classes_min"] <= IMAGENET_1K <= (r["classes_max"] or float("inf")))]
    assert not spills, [(r["kernel"], r["arch"], r["K"], r["BLOCK"], r["num_warps"], r["dtypes"], r["stack_bytes"])
                        for r in spills]
