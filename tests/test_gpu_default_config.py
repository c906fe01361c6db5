"""The configuration users get, on a GPU: Inductor + the Triton loss kernels + AMP together, online and bank.

``loss.impl=auto`` (the fused kernels on CUDA), ``precision.mode=amp`` (bf16 autocast where supported),
``runtime.compile=auto`` (torch.compile on CUDA), built by :func:`fastmeal.run.build_trainer` as
``fastmeal train`` builds it. A few steps on the same batches must stay compiled (no silent eager
fallback) and give the eager step's losses and weight updates within the tolerances below. The CPU test
runs the same comparison where compile=auto means eager on both sides: everything around the GPU test.
"""

from __future__ import annotations

import pytest
import torch
from gpu_runs import MODES, batches, build_bank_for, make_files, mode_trainer, step_batch

STEPS = 3
# Tolerances, compiled vs eager under bf16 autocast. Inductor fuses ops and keeps fp32 intermediates where eager
# rounds each op's output to bf16 (8 significant bits: 2^-8 = 0.4% per rounding), so a loss may differ by a few
# bf16 roundings: 2%. The weight *update* after STEPS SGD steps (not the weights, which the init dominates)
# accumulates those differences through the gradients: 5% of its norm per parameter tensor.
LOSS_RTOL, LOSS_ATOL = 2e-2, 1e-3
UPDATE_RTOL = 5e-2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_files(tmp_path_factory.mktemp("default-config"))


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in trainer.model.named_parameters()}


def _compare(files, tmp_path, device: str, mode: str, bank) -> None:
    torch._dynamo.reset()
    compiled = mode_trainer(files, tmp_path / "compiled", device, mode, bank)
    eager = mode_trainer(files, tmp_path / "eager", device, mode, bank, **{"runtime.compile": "off"})
    start = _weights(eager)
    assert _weights(compiled).keys() == start.keys()
    for name, value in _weights(compiled).items():  # the same initialisation (runtime.seed)
        torch.testing.assert_close(value, start[name], rtol=0, atol=0, msg=name)
    stream = batches(eager)
    for step in range(STEPS):
        batch = next(stream)
        out_c = compiled.train_step(step_batch(batch))
        out_e = eager.train_step(step_batch(batch))
        for part in out_e:
            torch.testing.assert_close(out_c[part].float(), out_e[part].float(), rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                       msg=f"step {step} {part}")
    assert compiled.compiled == (device == "cuda"), getattr(compiled, "compile_failure", None) or \
        "runtime.compile=auto: compiled on CUDA only, and it must not have fallen back to eager"
    assert getattr(compiled, "compile_failure", None) is None
    end_c, end_e = _weights(compiled), _weights(eager)
    for name, value in end_e.items():
        update_e, update_c = value - start[name], end_c[name] - start[name]
        error = (update_c - update_e).norm()
        assert error <= UPDATE_RTOL * update_e.norm() + 1e-7, f"{name}: update differs by {error:.3g} " \
            f"of {update_e.norm():.3g}"


@pytest.mark.parametrize("mode", MODES)
def test_default_config_steps_agree_on_the_cpu(files, tmp_path, mode):
    """The comparison the GPU test makes, on the CPU (both sides eager there: compile=auto is off without CUDA)."""
    bank = build_bank_for(files, tmp_path / "bank", "cpu") if mode == "bank" else None
    _compare(files, tmp_path, "cpu", mode, bank)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_default_config_stays_compiled_and_matches_eager(files, tmp_path, mode):
    bank = build_bank_for(files, tmp_path / "bank", "cuda") if mode == "bank" else None
    _compare(files, tmp_path, "cuda", mode, bank)
