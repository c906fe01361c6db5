"""The plain-PyTorch MEAL V2 loss against a direct float64 formula, and the reference op chain."""

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from fastmeal.losses import (
    bank_meal_v2_loss,
    decode_topk,
    discriminator_loss,
    discriminator_targets,
    meal_v2_loss,
    reference_meal_v2_loss,
    soft_cross_entropy,
)
from fastmeal.models.discriminator import Discriminator


def _inputs(k=2, b=7, c=1000, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(b, c, generator=g)).to(dtype).requires_grad_()
    teachers = (3 * torch.randn(k, b, c, generator=g)).to(dtype)
    return student, teachers


def _float64_loss(student, teachers, disc):
    """SPEC steps 2-8 written out directly in float64 (no shared code with fastmeal.losses)."""
    s = student.detach().double().requires_grad_()
    t = teachers.double()
    p = torch.softmax(t, dim=-1).mean(0)
    log_q = torch.log_softmax(s, dim=-1)
    kd = -(p * log_q).sum() / s.shape[0]
    kl = (p * (p.log() - log_q)).sum() / s.shape[0]
    d64 = copy.deepcopy(disc).double()
    b = s.shape[0]
    targets = torch.cat([torch.tensor([[1.0, 0.0]]).expand(b, 2), torch.tensor([[0.0, 1.0]]).expand(b, 2)]).double()
    scores = d64(torch.cat([s, t.mean(0)]))
    z = scores
    d = (torch.clamp(z, min=0) - z * targets + torch.log1p(torch.exp(-z.abs()))).mean()  # stable BCE-with-logits
    loss = kd + d
    loss.backward()
    return {"loss": loss, "kd": kd, "kl": kl, "d": d, "grad_s": s.grad,
            "grad_d": [prm.grad for prm in d64.parameters()]}


@pytest.mark.parametrize("k,b,c", [(1, 1, 10), (2, 7, 1000), (3, 5, 97)])
def test_matches_float64_formula(k, b, c):
    torch.manual_seed(0)
    disc = Discriminator(c)
    student, teachers = _inputs(k, b, c)
    ref = _float64_loss(student, teachers, disc)
    out = meal_v2_loss(student, teachers, disc)
    assert set(out) == {"loss", "kd", "kl", "d"}
    for key in ("loss", "kd", "kl", "d"):
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key].double(), ref[key].detach(), rtol=1e-6, atol=1e-6)
    out["loss"].backward()
    torch.testing.assert_close(student.grad.double(), ref["grad_s"], rtol=1e-6, atol=1e-6)
    for prm, g64 in zip(disc.parameters(), ref["grad_d"], strict=True):
        torch.testing.assert_close(prm.grad.double(), g64, rtol=1e-6, atol=1e-6)


def test_grad_output_scales_gradient():
    torch.manual_seed(0)
    disc = Discriminator(97)
    student, teachers = _inputs(2, 5, 97)
    ref = _float64_loss(student, teachers, disc)
    (2.5 * meal_v2_loss(student, teachers, disc)["loss"]).backward()
    torch.testing.assert_close(student.grad.double(), 2.5 * ref["grad_s"], rtol=1e-6, atol=1e-6)


def test_without_discriminator():
    student, teachers = _inputs(2, 7, 100)
    out = meal_v2_loss(student, teachers, None)
    assert set(out) == {"loss", "kd", "kl"}
    assert out["loss"] is out["kd"]
    out["loss"].backward()
    p = torch.softmax(teachers.double(), -1).mean(0)
    expected = (torch.softmax(student.detach().double(), -1) - p) / student.shape[0]  # d kd / d s = (q - p) / B
    torch.testing.assert_close(student.grad.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k,b,c", [(1, 1, 10), (2, 7, 1000), (3, 5, 97)])
def test_reference_chain_computes_the_same_value(k, b, c):
    torch.manual_seed(0)
    disc = Discriminator(c)
    student, teachers = _inputs(k, b, c)
    ours = meal_v2_loss(student, teachers, disc)
    s_ref = student.detach().clone().requires_grad_()
    ref = reference_meal_v2_loss(s_ref, list(teachers), disc)
    assert set(ref) == {"loss", "kd", "d"}
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-6, atol=1e-6)
    ours["loss"].backward()
    ref["loss"].backward()
    torch.testing.assert_close(student.grad, s_ref.grad, rtol=1e-5, atol=1e-8)
    # A [K, B, C] tensor works as well as a list of K tensors.
    torch.testing.assert_close(reference_meal_v2_loss(s_ref, teachers, disc)["loss"], ref["loss"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    torch.manual_seed(0)
    disc = Discriminator(1000)
    student, teachers = _inputs(2, 7, 1000, dtype=dtype)
    out = meal_v2_loss(student, teachers, disc)
    # The value is the float64 formula's on the same (already rounded) inputs to fp32 accuracy: a computation
    # in half precision would be off by ~1e-3.
    ref = _float64_loss(student, teachers, disc)
    for key in ("loss", "kd", "kl", "d"):
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key].double(), ref[key].detach(), rtol=1e-6, atol=1e-6)
    out["loss"].backward()
    assert student.grad.dtype == dtype
    # The gradient is summed in fp32 and rounded to the input dtype once: within one rounding of the exact one.
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(student.grad.double(), ref["grad_s"], rtol=ulp, atol=1e-7)


def test_discriminator_gradient_reaches_the_student():
    torch.manual_seed(0)
    disc = Discriminator(100)
    student, teachers = _inputs(2, 7, 100)
    d = meal_v2_loss(student, teachers, disc)["d"]
    (grad,) = torch.autograd.grad(d, student)
    assert grad.abs().sum() > 0
    # ... and equals the gradient of the discriminator term alone, taken through D.
    s2 = student.detach().clone().requires_grad_()
    targets = torch.tensor([[1.0, 0.0]] * 7 + [[0.0, 1.0]] * 7)
    F.binary_cross_entropy_with_logits(disc(torch.cat([s2, teachers.mean(0)])), targets).backward()
    torch.testing.assert_close(grad, s2.grad)


def test_teachers_get_no_gradient():
    torch.manual_seed(0)
    disc = Discriminator(50)
    student, teachers = _inputs(2, 4, 50)
    teachers.requires_grad_()
    meal_v2_loss(student, teachers, disc)["loss"].backward()
    assert teachers.grad is None


def test_kd_is_kl_plus_teacher_entropy():
    student, teachers = _inputs(3, 16, 200, seed=3)
    out = meal_v2_loss(student, teachers, None)
    p = torch.softmax(teachers.double(), -1).mean(0)
    entropy = -(p * p.log()).sum(-1).mean()
    kl64 = (p * (p.log() - torch.log_softmax(student.detach().double(), -1))).sum(-1).mean()
    torch.testing.assert_close(out["kl"].double(), kl64, rtol=1e-5, atol=1e-6)  # KL from its own formula
    torch.testing.assert_close(out["kd"].double(), kl64 + entropy, rtol=1e-6, atol=1e-6)  # CE = KL + H(p)
    assert out["kd"] >= out["kl"] >= 0
    assert not out["kl"].requires_grad


def test_kl_is_zero_when_student_matches_a_single_teacher():
    student, teachers = _inputs(1, 4, 30)
    out = meal_v2_loss(teachers[0].clone().requires_grad_(), teachers, None)
    assert abs(out["kl"].item()) < 1e-6


def test_soft_cross_entropy():
    student, teachers = _inputs(1, 5, 40)
    probs = torch.softmax(teachers[0], -1)
    expected = -(probs.double() * torch.log_softmax(student.detach().double(), -1)).sum(-1).mean()
    torch.testing.assert_close(soft_cross_entropy(student, probs).double(), expected, rtol=1e-6, atol=1e-6)


def test_targets_are_built_once_and_cached():
    discriminator_targets.cache_clear()
    a = discriminator_targets(7, torch.device("cpu"))
    assert a.shape == (14, 2) and a.dtype == torch.float32
    torch.testing.assert_close(a, torch.tensor([[1.0, 0.0]] * 7 + [[0.0, 1.0]] * 7))
    disc = Discriminator(20)
    student, teachers = _inputs(2, 7, 20)
    for _ in range(3):
        meal_v2_loss(student, teachers, disc)
    assert discriminator_targets(7, torch.device("cpu")) is a  # the same tensor object every step
    info = discriminator_targets.cache_info()
    assert info.misses == 1 and info.hits >= 4
    assert discriminator_targets(8, torch.device("cpu")).shape == (16, 2)  # another batch size, another entry


def test_targets_first_built_under_inference_mode_still_train():
    discriminator_targets.cache_clear()
    disc = Discriminator(20)
    student, teachers = _inputs(2, 3, 20)
    with torch.inference_mode():
        discriminator_loss(disc, student.detach(), teachers.mean(0))
    meal_v2_loss(student, teachers, disc)["loss"].backward()  # would raise if the cached targets were inference tensors
    assert student.grad is not None


def test_bad_arguments():
    student, teachers = _inputs(2, 4, 10)
    with pytest.raises(ValueError, match="impl"):
        meal_v2_loss(student, teachers, None, impl="cuda")
    with pytest.raises(ValueError, match="K, B, C"):
        meal_v2_loss(student, teachers[:, :3], None)


def test_auto_uses_torch_on_cpu():
    student, teachers = _inputs(2, 4, 10)
    auto = meal_v2_loss(student, list(teachers), None, impl="auto")
    torch.testing.assert_close(auto["kd"], meal_v2_loss(student, teachers, None, impl="torch")["kd"], rtol=0, atol=0)


def _float64_bank_loss(student, probs, classes, disc):
    """The bank rule in float64: the top-K kept, the rest spread evenly; D sees softmax(s) and the target."""
    s = student.detach().double().requires_grad_()
    b, c = s.shape
    target = torch.empty(b, c, dtype=torch.float64)
    for row in range(b):
        kept = probs[row].double()
        rest = max(1.0 - kept.sum().item(), 0.0) / (c - len(kept)) if c > len(kept) else 0.0
        target[row] = rest
        target[row, classes[row].long()] = kept
    log_q = torch.log_softmax(s, -1)
    kd = -(target * log_q).sum() / b
    kl = (torch.xlogy(target, target) - target * log_q).sum() / b
    d64 = copy.deepcopy(disc).double()
    labels = torch.tensor([[1.0, 0.0]] * b + [[0.0, 1.0]] * b, dtype=torch.float64)
    z = d64(torch.cat([torch.softmax(s, -1), target]))
    d = (torch.clamp(z, min=0) - z * labels + torch.log1p(torch.exp(-z.abs()))).mean()
    (kd + d).backward()
    return {"target": target, "loss": kd + d, "kd": kd, "kl": kl, "d": d, "grad_s": s.grad}


@pytest.mark.parametrize("b,c,k", [(5, 97, 5), (3, 10, 10), (4, 7, 1)])
def test_bank_loss_matches_float64_formula(b, c, k):
    torch.manual_seed(0)
    disc = Discriminator(c)
    student, teachers = _inputs(1, b, c)
    p = torch.softmax(teachers[0], -1)
    top = p.topk(k, dim=-1)
    probs, classes = top.values.half(), top.indices.to(torch.int16)  # as the bank stores them
    ref = _float64_bank_loss(student, probs, classes, disc)
    torch.testing.assert_close(decode_topk(probs, classes, c).double(), ref["target"], rtol=1e-6, atol=1e-7)
    out = bank_meal_v2_loss(student, probs, classes, disc)
    assert set(out) == {"loss", "kd", "kl", "d"} and not out["kl"].requires_grad
    for key in ("loss", "kd", "kl", "d"):
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key].double(), ref[key].detach(), rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    torch.testing.assert_close(student.grad.double(), ref["grad_s"], rtol=1e-5, atol=1e-7)
    without = bank_meal_v2_loss(student.detach(), probs, classes, None)
    assert set(without) == {"loss", "kd", "kl"} and without["loss"] is without["kd"]
    for bad in ((probs[:-1], classes[:-1]), (probs.flatten(), classes.flatten()), (probs, classes[:, :0])):
        with pytest.raises(ValueError, match="bank records must be"):
            bank_meal_v2_loss(student, *bad, None)


def test_impl_chooses_the_kernel_only_when_asked_or_on_cuda(monkeypatch):
    """``impl``: ``triton`` runs the fused kernels (faked here: recorded), ``torch`` never, ``auto`` not on the CPU."""
    from fastmeal.kernels import ensemble_kd, topk_soft_ce
    from fastmeal.losses import _ensemble_kd_torch, _topk_kd_torch

    calls = []
    monkeypatch.setattr(ensemble_kd, "ensemble_kd",
                        lambda s, t: calls.append("ensemble_kd") or _ensemble_kd_torch(s, t))
    monkeypatch.setattr(topk_soft_ce, "topk_soft_ce",
                        lambda s, p, i: calls.append("topk_soft_ce") or _topk_kd_torch(s, p, i))
    student, teachers = _inputs(2, 4, 10)
    probs, classes = torch.softmax(teachers[0], -1).topk(3)
    for impl, expected in (("torch", []), ("auto", []), ("triton", ["ensemble_kd", "topk_soft_ce"])):
        calls.clear()
        online = meal_v2_loss(student, teachers, None, impl=impl)
        bank = bank_meal_v2_loss(student, probs, classes, None, impl=impl)
        assert calls == expected, impl
        ref = _float64_loss(student, teachers, Discriminator(10))
        torch.testing.assert_close(online["kd"].double(), ref["kd"].detach(), rtol=1e-6, atol=1e-6)
        assert torch.isfinite(bank["kd"])
    with pytest.raises(ValueError, match="impl"):
        bank_meal_v2_loss(student, probs, classes, None, impl="cuda")


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="torch.compile cannot trace mutmut's trampolines")
def test_discriminator_loss_traced_by_torch_compile_equals_eager():
    """Under torch.compile the BCE targets are built inside the graph (not taken from the cache): same value."""
    torch.manual_seed(0)
    disc = Discriminator(20)
    student, teachers = _inputs(2, 3, 20)
    eager = discriminator_loss(disc, student, teachers.mean(0))
    compiled = torch.compile(discriminator_loss, backend="eager", fullgraph=True)(disc, student, teachers.mean(0))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    targets = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    expected = F.binary_cross_entropy_with_logits(disc(torch.cat([student, teachers.mean(0)])), targets)
    torch.testing.assert_close(compiled, expected)


def test_auto_is_the_kernel_on_cuda_when_triton_imports(monkeypatch):
    """``impl=auto`` on a CUDA tensor uses the kernel, unless triton does not import; ``torch`` never does."""
    from types import SimpleNamespace

    from fastmeal.losses import _use_triton

    on = {kind: SimpleNamespace(device=SimpleNamespace(type=kind)) for kind in ("cuda", "cpu")}
    assert _use_triton("auto", on["cuda"]) and _use_triton("triton", on["cpu"])
    assert not _use_triton("auto", on["cpu"]) and not _use_triton("torch", on["cuda"])
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert not _use_triton("auto", on["cuda"])
