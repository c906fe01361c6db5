"""The fused ensemble-KD Triton kernel against a float64 reference (TRITON_INTERPRET=1 on the CPU)."""

import pytest
import torch
from tiny import KERNEL_DEVICES, assert_loss_paths_agree

from fastmeal.kernels.ensemble_kd import ensemble_kd, ensemble_kd_forward
from fastmeal.losses import meal_v2_loss
from fastmeal.models.discriminator import Discriminator

# The interpreter evaluates the masked-off branch of tl.where too (0 · -inf, log 0 on padding lanes)
# and numpy warns about it; the selected values are what the tests check.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICES = KERNEL_DEVICES

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# Tolerances. The float64 reference is computed from the *same, already rounded* inputs, so input
# rounding is not part of the error: what is left is fp32 arithmetic inside the kernel and the one
# rounding of each output to its storage dtype.
# * ce / kl are fp32 scalars for every input dtype: a tree sum of C <= 21,843 fp32 terms of size
#   p·|log q| (log q down to about -40 at our logit scale) errs by ~log2(C) · 2^-24 · Σ|terms| ≈ 1e-5.
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-5}
# * t̄ = (Σ_k t_k) / K is exact to ~2 fp32 ulps, then rounded once to the teacher dtype: half an ulp
#   is 2^-24 (fp32), 2^-11 (fp16), 2^-8 (bf16) relative; rtol is twice that. atol covers values near 0
#   (fp16 subnormals, fp32 error of a cancelling sum of |t| <= ~20).
T_BAR_TOL = {FP32: {"rtol": 2.5e-7, "atol": 1e-6}, FP16: {"rtol": 2**-10, "atol": 1e-5},
             BF16: {"rtol": 2**-7, "atol": 1e-5}}
# * grad·B = q - p is an fp32 difference of two probabilities whose error is ~|log-sum-exp| · 2^-24
#   relative (q = exp(s - lse)), ≤ 1e-6 absolute; then rounded once to the student dtype (rtol as
#   for t̄), and for fp16 the stored (q - p)/B may be subnormal: spacing 2^-24, i.e. 2^-24 · B on this scale.
GRAD_TOL = {FP32: {"rtol": 1e-5, "atol": 1e-6}, FP16: {"rtol": 2**-10, "atol": 1e-6},
            BF16: {"rtol": 2**-7, "atol": 1e-6}}


def _grad_tol(dtype: torch.dtype, batch: int) -> dict[str, float]:
    tol = dict(GRAD_TOL[dtype])
    if dtype == FP16:
        tol["atol"] += 2.0**-24 * batch
    return tol


def _logits(shape, dtype, device, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)


def _reference(student, teachers):
    """float64 ce, kl, t̄ and d ce / d s written out directly, from the inputs as they are stored."""
    s, t = student.double(), teachers.double()
    p = torch.softmax(t, dim=-1).mean(0)
    log_q = torch.log_softmax(s, dim=-1)
    ce = -(p * log_q).sum(-1)
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1)
    return ce.mean(), kl.mean(), t.mean(0), (log_q.exp() - p) / s.shape[0]


def _poisoned_outputs(batch, num_classes, t_dtype, s_dtype, device, row_pad=0):
    """NaN-filled outputs; t̄ and grad rows are ``row_pad`` wider than C to catch writes past a row."""
    nan = float("nan")
    ce = torch.full((batch,), nan, device=device)
    kl = torch.full((batch,), nan, device=device)
    t_bar = torch.full((batch, num_classes + row_pad), nan, device=device, dtype=t_dtype)[:, :num_classes]
    grad = torch.full((batch, num_classes + row_pad), nan, device=device, dtype=s_dtype)[:, :num_classes]
    return ce, kl, t_bar, grad


def _check_forward(student, teachers, *, s_dtype, t_dtype, **blocks):
    k, b, c = teachers.shape
    ce_rows, kl_rows, t_bar, grad = _poisoned_outputs(b, c, t_dtype, s_dtype, student.device, row_pad=3)
    ensemble_kd_forward(student, teachers, ce_rows=ce_rows, kl_rows=kl_rows, t_bar=t_bar, grad=grad, **blocks)
    ce, kl, t_bar64, grad64 = _reference(student, teachers)
    # Every element written (no NaN left from the poison) ...
    for name, out in (("ce", ce_rows), ("kl", kl_rows), ("t_bar", t_bar), ("grad", grad)):
        assert torch.isfinite(out).all(), f"{name} has unwritten or non-finite elements"
    # ... and nothing written past the end of a row.
    assert t_bar.as_strided((b, 3), (t_bar.stride(0), 1), c).isnan().all()
    assert grad.as_strided((b, 3), (grad.stride(0), 1), c).isnan().all()
    assert t_bar.dtype == t_dtype and grad.dtype == s_dtype
    torch.testing.assert_close(ce_rows.double().mean(), ce, **LOSS_TOL)
    torch.testing.assert_close(kl_rows.double().mean(), kl, **LOSS_TOL)
    torch.testing.assert_close(t_bar.double(), t_bar64, **T_BAR_TOL[t_dtype])
    torch.testing.assert_close(grad.double() * b, grad64 * b, **_grad_tol(s_dtype, b))


# (K, B, C, dtype): every (K, B, C) value appears; the expensive B = 64 rows once per dtype.
FORWARD_CASES = [
    (1, 1, 10, FP32), (2, 7, 997, FP32), (3, 7, 1000, FP32), (1, 64, 10, FP32), (2, 64, 1000, FP32),
    (3, 1, 4099, FP32), (2, 7, 4099, FP32),
    (1, 1, 10, FP16), (3, 7, 997, FP16), (2, 64, 1000, FP16), (2, 1, 4099, FP16),
    (2, 1, 10, BF16), (1, 7, 1000, BF16), (3, 64, 997, BF16), (3, 7, 4099, BF16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,b,c,dtype", FORWARD_CASES)
def test_forward_matches_float64(device, k, b, c, dtype):
    student = _logits((b, c), dtype, device, seed=1)
    teachers = _logits((k, b, c), dtype, device, seed=2)
    _check_forward(student, teachers, s_dtype=dtype, t_dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t_dtype", [FP16, BF16])
def test_fp32_student_with_half_teachers(device, t_dtype):
    # What meal_v2_loss passes under AMP: an fp32 student (gradient kept in fp32), half-precision teachers.
    student = _logits((7, 997), FP32, device, seed=3)
    teachers = _logits((2, 7, 997), t_dtype, device, seed=4)
    _check_forward(student, teachers, s_dtype=FP32, t_dtype=t_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["every_other_row", "batch_major", "class_strided"])
def test_non_contiguous_teachers(device, layout):
    k, b, c = 3, 7, 997
    if layout == "every_other_row":  # a [K, 2B, C] slice [:, ::2]: row stride 2C
        teachers = _logits((k, 2 * b, c), FP32, device, seed=5)[:, ::2]
    elif layout == "batch_major":  # [B, K, C] permuted: K stride C, row stride K·C
        teachers = _logits((b, k, c), FP32, device, seed=5).permute(1, 0, 2)
    else:  # classes not contiguous: the launcher makes a contiguous copy
        teachers = _logits((k, c, b), FP32, device, seed=5).transpose(1, 2)
    assert not teachers.is_contiguous()
    student = _logits((2 * b, c), FP32, device, seed=6)[1::2]  # a strided student too
    _check_forward(student, teachers, s_dtype=FP32, t_dtype=FP32)


# The two-pass online-softmax path: forced with small blocks (cheap), then ImageNet-21k's real width.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,b,c,dtype,blocks", [
    (2, 7, 997, FP32, {"max_fused_block": 256, "loop_block": 128}),  # 8 blocks, the last one partial
    (3, 7, 1024, FP16, {"max_fused_block": 512, "loop_block": 256}),  # exactly 4 full blocks
    (1, 1, 1000, BF16, {"max_fused_block": 64, "loop_block": 64}),
    (2, 2, 21843, FP32, {}),  # C > MAX_FUSED_BLOCK with the default blocks
])
def test_online_softmax_path(device, k, b, c, dtype, blocks):
    student = _logits((b, c), dtype, device, seed=7)
    teachers = _logits((k, b, c), dtype, device, seed=8)
    _check_forward(student, teachers, s_dtype=dtype, t_dtype=dtype, **blocks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", [{}, {"max_fused_block": 256, "loop_block": 128}], ids=["fused", "looped"])
def test_classes_ruled_out_by_a_teacher(device, blocks):
    # -inf teacher logits (p = 0 there) are legitimate; a whole leading block of them must not turn the
    # online softmax's running max into -inf - -inf = NaN.
    student = _logits((3, 997), FP32, device, seed=9)
    teachers = _logits((2, 3, 997), FP32, device, seed=10)
    teachers[0, :, :300] = float("-inf")
    ce_rows, kl_rows, t_bar, grad = ensemble_kd_forward(student, teachers, **blocks)
    ce, kl, _, grad64 = _reference(student, teachers)
    assert torch.isfinite(ce_rows).all() and torch.isfinite(kl_rows).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(ce_rows.double().mean(), ce, **LOSS_TOL)
    torch.testing.assert_close(kl_rows.double().mean(), kl, **LOSS_TOL)
    torch.testing.assert_close(grad.double() * 3, grad64 * 3, **GRAD_TOL[FP32])
    assert torch.isneginf(t_bar[:, :300]).all()  # the mean of raw logits keeps the -inf, as torch does


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", [{}, {"max_fused_block": 256, "loop_block": 128}], ids=["fused", "looped"])
@pytest.mark.parametrize("where,value", [("teacher", float("nan")), ("teacher", float("inf")),
                                         ("student", float("nan")), ("student", float("inf"))])
def test_non_finite_inputs_give_nan(device, blocks, where, value):
    student = _logits((4, 997), FP32, device, seed=11)
    teachers = _logits((2, 4, 997), FP32, device, seed=12)
    if where == "teacher":
        teachers[1, 2, 500] = value
    else:
        student[2, 500] = value
    ce_rows, kl_rows, _, grad = ensemble_kd_forward(student, teachers, **blocks)
    # The poisoned row is NaN (loud, like torch's softmax of such a row), the other rows are untouched.
    assert ce_rows[2].isnan() and kl_rows[2].isnan() and grad[2].isnan().any()
    keep = [0, 1, 3]
    ce, kl, _, grad64 = _reference(student[keep], teachers[:, keep])
    torch.testing.assert_close(ce_rows[keep].double().mean(), ce, **LOSS_TOL)
    torch.testing.assert_close(grad[keep].double() * 4, grad64 * 3, **GRAD_TOL[FP32])  # (q - p)/B with B = 4
    assert ensemble_kd(student, teachers, **blocks)[0].isnan()  # and the batch mean is NaN


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
def test_op_values_and_gradient_with_grad_output(device, dtype):
    b, c = 7, 997
    student = _logits((b, c), dtype, device, seed=13).requires_grad_()
    teachers = _logits((3, b, c), dtype, device, seed=14)
    ce, kl, t_bar = ensemble_kd(student, teachers)
    ce64, kl64, t_bar64, grad64 = _reference(student.detach(), teachers)
    assert ce.dtype == kl.dtype == torch.float32 and t_bar.dtype == dtype
    assert ce.requires_grad and not kl.requires_grad and not t_bar.requires_grad
    torch.testing.assert_close(ce.double(), ce64, **LOSS_TOL)
    torch.testing.assert_close(kl.double(), kl64, **LOSS_TOL)
    torch.testing.assert_close(t_bar.double(), t_bar64, **T_BAR_TOL[dtype])
    (-2.5 * ce).backward()  # grad_output = -2.5
    assert student.grad.dtype == dtype
    # One more rounding (the product with grad_output, in the student dtype): one more rtol unit.
    tol = _grad_tol(dtype, b)
    tol["rtol"] *= 2
    torch.testing.assert_close(student.grad.double() * b, -2.5 * grad64 * b, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_op_looped_path_gradient(device):
    student = _logits((3, 1000), FP32, device, seed=15).requires_grad_()
    teachers = _logits((2, 3, 1000), FP32, device, seed=16)
    ce, _, _ = ensemble_kd(student, teachers, max_fused_block=256, loop_block=128)
    ce.backward(torch.tensor(0.75, device=device))
    ce64, _, _, grad64 = _reference(student.detach(), teachers)
    torch.testing.assert_close(ce.double(), ce64, **LOSS_TOL)
    torch.testing.assert_close(student.grad.double() * 3, 0.75 * grad64 * 3, **GRAD_TOL[FP32])


@pytest.mark.parametrize("device", DEVICES)
def test_custom_op_registration(device):
    # Schema, fake (meta) kernel, autograd registration and AOT dispatch, as torch.compile uses them.
    student = _logits((2, 10), FP32, device, seed=17).requires_grad_()
    teachers = _logits((2, 2, 10), FP32, device, seed=18)
    torch.library.opcheck(torch.ops.fastmeal.ensemble_kd.default, (student, teachers, 8192, 4096))


@pytest.mark.parametrize("device", DEVICES)
def test_traced_by_torch_compile_without_graph_break(device):
    student = _logits((3, 50), FP32, device, seed=19).requires_grad_()
    teachers = _logits((2, 3, 50), FP32, device, seed=20)
    # aot_eager: Dynamo + AOTAutograd tracing with the fake kernel, no Inductor codegen (slow on a CPU).
    compiled = torch.compile(lambda s, t: 3.0 * ensemble_kd(s, t)[0], backend="aot_eager", fullgraph=True)
    compiled(student, teachers).backward()
    ce64, _, _, grad64 = _reference(student.detach(), teachers)
    torch.testing.assert_close(student.grad.double() * 3, 3.0 * grad64 * 3, **GRAD_TOL[FP32])


def test_rejects_bad_inputs():
    s = torch.randn(4, 10)
    with pytest.raises(ValueError, match="K, B, C"):
        ensemble_kd_forward(s, torch.randn(2, 5, 10))
    with pytest.raises(ValueError, match="1 to 8 teachers"):
        ensemble_kd_forward(s, torch.randn(9, 4, 10))
    with pytest.raises(TypeError, match="logits must be one of"):
        ensemble_kd_forward(s.double(), torch.randn(2, 4, 10))
    with pytest.raises(ValueError, match="grad must be"):
        ensemble_kd_forward(s, torch.randn(2, 4, 10), grad=torch.empty(4, 10, dtype=torch.float16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t_dtype", [FP32, FP16])
def test_meal_v2_loss_triton_equals_torch(device, t_dtype):
    torch.manual_seed(0)
    b, c = 7, 997
    disc_torch = Discriminator(c).to(device)
    disc_triton = Discriminator(c).to(device)
    disc_triton.load_state_dict(disc_torch.state_dict())
    student = _logits((b, c), FP32, device, seed=21)
    teachers = _logits((2, b, c), t_dtype, device, seed=22)
    s_torch, s_triton = student.clone().requires_grad_(), student.clone().requires_grad_()
    ref = meal_v2_loss(s_torch, teachers, disc_torch, impl="torch")
    out = meal_v2_loss(s_triton, teachers, disc_triton, impl="triton")
    assert set(out) == set(ref) == {"loss", "kd", "kl", "d"}
    # fp16 teachers: the kernel hands D the mean logits rounded to fp16 (torch's path keeps fp32),
    # a 2^-11 relative change of D's input.
    tol = LOSS_TOL if t_dtype == FP32 else {"rtol": 1e-4, "atol": 1e-4}
    assert_loss_paths_agree(out, ref, (s_triton, s_torch), (disc_triton, disc_torch), tol)
    # The discriminator's share of the student gradient is there in the triton path too.
    (g_d,) = torch.autograd.grad(meal_v2_loss(s_triton, teachers, disc_triton, impl="triton")["d"], s_triton)
    assert g_d.abs().sum() > 0
