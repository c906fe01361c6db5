"""The sparse-target (top-K) soft-CE Triton kernel against a float64 reference (TRITON_INTERPRET=1 on the CPU)."""

import pytest
import torch
from tiny import KERNEL_DEVICES, assert_loss_paths_agree

from fastmeal.kernels.topk_soft_ce import topk_soft_ce, topk_soft_ce_forward
from fastmeal.losses import bank_meal_v2_loss, decode_topk
from fastmeal.models.discriminator import Discriminator

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DEVICES = KERNEL_DEVICES
FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16

# The float64 reference reads the same stored (rounded) inputs, so what is left is fp32 arithmetic
# in the kernel: a tree sum of C fp32 terms p·|log q| (≈1e-5 relative, as for ensemble_kd), the
# decoded target exact to a few fp32 ulps (one division), and q - p to ~1e-6 absolute, then one
# rounding of the gradient to the student dtype (half an ulp: 2^-11 fp16, 2^-8 bf16; rtol twice that).
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-5}
TARGET_TOL = {"rtol": 1e-6, "atol": 1e-7}
GRAD_TOL = {FP32: {"rtol": 1e-5, "atol": 1e-6}, FP16: {"rtol": 2**-10, "atol": 1e-6},
            BF16: {"rtol": 2**-7, "atol": 1e-6}}


def _grad_tol(dtype, batch):
    tol = dict(GRAD_TOL[dtype])
    if dtype == FP16:  # (q - p)/B stored in fp16 may be subnormal: spacing 2^-24, i.e. 2^-24·B on the B scale
        tol["atol"] += 2.0**-24 * batch
    return tol


def _record(batch, num_classes, top_k, device, seed, *, prob_dtype=FP16, index_dtype=torch.int16):
    """A bank-like record: the top-K of a random softmax, stored as fp16 probabilities and int16 indices."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3.0 * torch.randn(batch, num_classes, generator=g, dtype=torch.float64), -1)
    probs, indices = p.topk(top_k, dim=-1)
    return probs.to(device, prob_dtype), indices.to(device, index_dtype)


def _logits(shape, dtype, device, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)


def _reference(student, probs, indices):
    """float64 ce, kl, the decoded target and d ce / d s, written out directly from the stored inputs."""
    s = student.double()
    b, c = s.shape
    k = probs.shape[1]
    p_top = probs.double()
    rest = (1.0 - p_top.sum(-1, keepdim=True)).clamp(min=0)
    target = (rest / (c - k) if c > k else torch.zeros_like(rest)).expand(b, c).clone()
    target.scatter_(1, indices.long(), p_top)
    log_q = torch.log_softmax(s, -1)
    ce = -(target * log_q).sum(-1)
    kl = (torch.xlogy(target, target) - target * log_q).sum(-1)
    return ce.mean(), kl.mean(), target, (log_q.exp() - target) / b


def _check_forward(student, probs, indices, **blocks):
    b, c = student.shape
    nan = float("nan")
    ce_rows = torch.full((b,), nan, device=student.device)
    kl_rows = torch.full((b,), nan, device=student.device)
    target = torch.full((b, c + 3), nan, device=student.device)[:, :c]
    grad = torch.full((b, c + 3), nan, device=student.device, dtype=student.dtype)[:, :c]
    topk_soft_ce_forward(student, probs, indices, ce_rows=ce_rows, kl_rows=kl_rows, target=target, grad=grad,
                         **blocks)
    ce, kl, target64, grad64 = _reference(student, probs, indices)
    for name, out in (("ce", ce_rows), ("kl", kl_rows), ("target", target), ("grad", grad)):
        assert torch.isfinite(out).all(), f"{name} has unwritten or non-finite elements"
    assert target.as_strided((b, 3), (target.stride(0), 1), c).isnan().all()  # nothing written past a row
    assert grad.as_strided((b, 3), (grad.stride(0), 1), c).isnan().all()
    torch.testing.assert_close(ce_rows.double().mean(), ce, **LOSS_TOL)
    torch.testing.assert_close(kl_rows.double().mean(), kl, **LOSS_TOL)
    torch.testing.assert_close(target.double(), target64, **TARGET_TOL)
    torch.testing.assert_close(grad.double() * b, grad64 * b, **_grad_tol(student.dtype, b))


# (B, C, K, student dtype): a prime number of rows and classes, a tiny case, the real case, K = C.
FORWARD_CASES = [
    (1, 10, 5, FP32), (7, 997, 5, FP32), (64, 1000, 5, FP32), (3, 5, 5, FP32), (7, 1000, 1, FP32),
    (7, 4099, 13, FP32), (1, 10, 3, FP16), (7, 997, 5, FP16), (64, 1000, 5, BF16), (7, 4099, 5, BF16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,c,k,dtype", FORWARD_CASES)
def test_forward_matches_float64(device, b, c, k, dtype):
    probs, indices = _record(b, c, k, device, seed=b + c + k)
    _check_forward(_logits((b, c), dtype, device, seed=1), probs, indices)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prob_dtype,index_dtype", [(FP32, torch.int64), (BF16, torch.int32)])
def test_other_record_dtypes(device, prob_dtype, index_dtype):
    probs, indices = _record(7, 997, 5, device, seed=3, prob_dtype=prob_dtype, index_dtype=index_dtype)
    _check_forward(_logits((7, 997), FP32, device, seed=4), probs, indices)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    probs, indices = _record(14, 997, 5, device, seed=5)
    student = _logits((14, 997), FP32, device, seed=6)
    _check_forward(student[1::2], probs[::2], indices[::2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,blocks", [(997, {"max_fused_block": 256, "loop_block": 128}),
                                      (1024, {"max_fused_block": 512, "loop_block": 256}),
                                      (21843, {})])
def test_online_softmax_path(device, c, blocks):
    probs, indices = _record(3, c, 5, device, seed=7)
    _check_forward(_logits((3, c), FP32, device, seed=8), probs, indices, **blocks)


@pytest.mark.parametrize("device", DEVICES)
def test_mass_above_one_leaves_no_rest(device):
    # fp16 rounding can make the stored top-K sum to slightly more than 1: the rest is 0, not negative.
    probs = torch.tensor([[0.6, 0.3, 0.1002]], dtype=FP16, device=device)
    indices = torch.tensor([[4, 0, 9]], dtype=torch.int16, device=device)
    assert probs.float().sum() > 1
    _, _, target, _ = topk_soft_ce_forward(_logits((1, 10), FP32, device, seed=9), probs, indices)
    assert (target[0, [1, 2, 3, 5, 6, 7, 8]] == 0).all()
    torch.testing.assert_close(target, decode_topk(probs, indices, 10))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", [{}, {"max_fused_block": 256, "loop_block": 128}], ids=["fused", "looped"])
@pytest.mark.parametrize("where", ["student_nan", "student_inf", "prob_nan"])
def test_non_finite_inputs_give_nan(device, blocks, where):
    probs, indices = _record(4, 997, 5, device, seed=10)
    student = _logits((4, 997), FP32, device, seed=11)
    if where == "student_nan":
        student[2, 500] = float("nan")
    elif where == "student_inf":
        student[2, 500] = float("inf")
    else:
        probs[2, 1] = float("nan")
    ce_rows, kl_rows, _, grad = topk_soft_ce_forward(student, probs, indices, **blocks)
    assert ce_rows[2].isnan() and kl_rows[2].isnan() and grad[2].isnan().any()
    keep = [0, 1, 3]
    ce, _, _, grad64 = _reference(student[keep], probs[keep], indices[keep])
    torch.testing.assert_close(ce_rows[keep].double().mean(), ce, **LOSS_TOL)
    torch.testing.assert_close(grad[keep].double() * 4, grad64 * 3, **GRAD_TOL[FP32])
    assert topk_soft_ce(student, probs, indices, **blocks)[0].isnan()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
def test_op_values_and_gradient_with_grad_output(device, dtype):
    b, c = 7, 997
    probs, indices = _record(b, c, 5, device, seed=12)
    student = _logits((b, c), dtype, device, seed=13).requires_grad_()
    ce, kl, target = topk_soft_ce(student, probs, indices)
    ce64, kl64, target64, grad64 = _reference(student.detach(), probs, indices)
    assert ce.requires_grad and not kl.requires_grad and not target.requires_grad
    torch.testing.assert_close(ce.double(), ce64, **LOSS_TOL)
    torch.testing.assert_close(kl.double(), kl64, **LOSS_TOL)
    torch.testing.assert_close(target.double(), target64, **TARGET_TOL)
    (-2.5 * ce).backward()
    assert student.grad.dtype == dtype
    tol = _grad_tol(dtype, b)
    tol["rtol"] *= 2  # one more rounding: the product with grad_output in the student dtype
    torch.testing.assert_close(student.grad.double() * b, -2.5 * grad64 * b, **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_op_registration(device):
    probs, indices = _record(2, 10, 3, device, seed=14)
    student = _logits((2, 10), FP32, device, seed=15).requires_grad_()
    torch.library.opcheck(torch.ops.fastmeal.topk_soft_ce.default, (student, probs, indices, 8192, 4096))


@pytest.mark.parametrize("device", DEVICES)
def test_traced_by_torch_compile_without_graph_break(device):
    probs, indices = _record(3, 50, 5, device, seed=16)
    student = _logits((3, 50), FP32, device, seed=17).requires_grad_()
    compiled = torch.compile(lambda s, p, i: 3.0 * topk_soft_ce(s, p, i)[0], backend="aot_eager", fullgraph=True)
    compiled(student, probs, indices).backward()
    _, _, _, grad64 = _reference(student.detach(), probs, indices)
    torch.testing.assert_close(student.grad.double() * 3, 3.0 * grad64 * 3, **GRAD_TOL[FP32])


def test_rejects_bad_inputs():
    s = torch.randn(4, 10)
    probs, indices = torch.rand(4, 5).half(), torch.arange(5, dtype=torch.int16).repeat(4, 1)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        topk_soft_ce_forward(s, probs[:3], indices[:3])
    with pytest.raises(ValueError, match="K=11"):
        topk_soft_ce_forward(s, torch.rand(4, 11).half(), torch.zeros(4, 11, dtype=torch.int16))
    with pytest.raises(TypeError, match="indices must be one of"):
        topk_soft_ce_forward(s, probs, indices.float())
    with pytest.raises(ValueError, match="grad must be"):
        topk_soft_ce_forward(s, probs, indices, grad=torch.empty(4, 10, dtype=torch.float16))


def test_decode_topk_spreads_the_rest_evenly():
    probs = torch.tensor([[0.5, 0.25], [1.0, 0.0]], dtype=FP16)
    indices = torch.tensor([[3, 1], [0, 2]], dtype=torch.int16)
    target = decode_topk(probs, indices, 6)
    torch.testing.assert_close(target, torch.tensor([[0.0625, 0.25, 0.0625, 0.5, 0.0625, 0.0625],
                                                     [1.0, 0, 0, 0, 0, 0]]))
    torch.testing.assert_close(target.sum(-1), torch.ones(2))


@pytest.mark.parametrize("device", DEVICES)
def test_bank_loss_triton_equals_torch(device):
    torch.manual_seed(0)
    b, c = 7, 997
    disc_torch, disc_triton = Discriminator(c).to(device), Discriminator(c).to(device)
    disc_triton.load_state_dict(disc_torch.state_dict())
    probs, indices = _record(b, c, 5, device, seed=18)
    student = _logits((b, c), FP32, device, seed=19)
    s_torch, s_triton = student.clone().requires_grad_(), student.clone().requires_grad_()
    ref = bank_meal_v2_loss(s_torch, probs, indices, disc_torch, impl="torch")
    out = bank_meal_v2_loss(s_triton, probs, indices, disc_triton, impl="triton")
    assert set(out) == set(ref) == {"loss", "kd", "kl", "d"}
    assert_loss_paths_agree(out, ref, (s_triton, s_torch), (disc_triton, disc_torch), LOSS_TOL)


def test_bank_loss_discriminator_sees_probabilities_and_reaches_the_student():
    torch.manual_seed(0)
    c = 10
    probs, indices = _record(4, c, 3, "cpu", seed=20)
    student = _logits((4, c), FP32, "cpu", seed=21).requires_grad_()
    seen = []

    class Spy(Discriminator):
        def forward(self, x):
            seen.append(x.detach())
            return super().forward(x)

    out = bank_meal_v2_loss(student, probs, indices, Spy(c), impl="torch")
    rows = seen[0]
    # cat[softmax(student), decoded target]: both halves are probability rows.
    torch.testing.assert_close(rows[:4], torch.softmax(student.detach(), -1))
    torch.testing.assert_close(rows[4:], decode_topk(probs, indices, c))
    (g_d,) = torch.autograd.grad(out["d"], student)
    assert g_d.abs().sum() > 0
