"""Fused ensemble knowledge-distillation loss: soft cross-entropy, KL and mean teacher logits in one pass.

For K teachers' logits ``t`` ``[K, B, C]`` and student logits ``s`` ``[B, C]`` the op computes, in
fp32 whatever the input dtype, exactly what this PyTorch code computes::

    t32, s32 = t.float(), s.float()
    p = torch.softmax(t32, -1).mean(0)                       # the ensemble's soft target
    log_q = torch.log_softmax(s32, -1)
    soft_ce = -(p * log_q).sum(-1).mean()                    # MEAL V2's L_kd (SPEC step 5)
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1).mean()      # KL(p ‖ q), for logging
    t_bar = t32.mean(0).to(t.dtype)                          # the discriminator's "real" input
    d soft_ce / d s = (softmax(s32, -1) - p) / B

One Triton program per row reads each logit once (twice for rows wider than ``max_fused_block``,
through an online softmax), writes ``t_bar`` and the gradient ``(q - p) / B`` during the forward,
so the backward is one multiplication by ``grad_output``. Only ``soft_ce`` is differentiable, and
only with respect to ``s`` (teachers are frozen); ``kl`` and ``t_bar`` are returned detached.

The plain-PyTorch reference lives in ``fastmeal.losses``. The gradient is stored in the student's
dtype: for an fp16 student most entries of ``(q - p) / B`` are fp16 subnormals, so
``fastmeal.losses.meal_v2_loss`` hands the op fp32 student logits.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

#: Rows up to this many classes (rounded up to a power of two) are processed as a single block. Wider fused
#: blocks spilled registers (4,096 from 7 teachers on, 8,192 from 4, in a first run of benchmarks/kernel_resources.py).
MAX_FUSED_BLOCK = 2048
#: Block width of the two-pass online-softmax path used for wider rows (e.g. ImageNet-21k's 21,843); 2,048 at
#: 8 warps spilled a few bytes on sm_100 with 2 teachers, 1,024 only with 7 (8 bytes, sm_80).
LOOP_BLOCK = 1024
#: Narrowest block: a row narrower than the 128 threads of 4 warps leaves threads idle whatever the block, and
#: fewer distinct blocks are fewer variants to compile (tests/test_kernel_compile.py compiles every one).
MIN_BLOCK = 128
#: Teachers per call: the teacher loop is unrolled at compile time.
MAX_TEACHERS = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _row_log_softmax(row_ptr, cols, mask):
    """``log_softmax`` of one row that fits a block, in fp32 (the fused kernels' student read)."""
    # Padding lanes load -inf so that they add exp(-inf) = 0 to every softmax sum.
    s = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    s_shift = s - tl.max(s, axis=0)
    return s_shift - tl.log(tl.sum(tl.exp(s_shift), axis=0))


@triton.jit
def _ensemble_kd_fused_kernel(
    t_ptr, s_ptr, t_bar_ptr, grad_ptr, ce_ptr, kl_ptr,
    stride_tk, stride_tb, stride_sb, stride_t_bar_b, stride_grad_b,
    num_classes, inv_batch,
    K: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row whose C classes fit one block: every logit is read once."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_classes

    log_q = _row_log_softmax(s_ptr + row * stride_sb, cols, mask)

    p = tl.zeros([BLOCK], dtype=tl.float32)
    t_sum = tl.zeros([BLOCK], dtype=tl.float32)
    t_row = t_ptr + row * stride_tb
    for _k in tl.static_range(K):
        t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        e = tl.exp(t - tl.max(t, axis=0))
        p += e * (1.0 / tl.sum(e, axis=0))
        t_sum += tl.where(mask, t, 0.0)
        t_row += stride_tk
    p = p / K

    tl.store(t_bar_ptr + row * stride_t_bar_b + cols, (t_sum / K).to(t_bar_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_ptr + row * stride_grad_b + cols, ((tl.exp(log_q) - p) * inv_batch).to(grad_ptr.dtype.element_ty),
             mask=mask)
    # where(p == 0, 0, ...) gives 0 · log 0 = 0 for padding and ruled-out classes, yet keeps a NaN p.
    ce = -tl.sum(tl.where(mask, p * log_q, 0.0), axis=0)
    kl = tl.sum(tl.where(p == 0.0, 0.0, p * (tl.log(p) - log_q)), axis=0)
    tl.store(ce_ptr + row, ce)
    tl.store(kl_ptr + row, kl)


@triton.jit
def _row_logsumexp(row_ptr, num_classes, BLOCK: tl.constexpr):
    """``log Σ exp(x)`` of one row of ``num_classes`` logits, by an online max/sum over blocks."""
    cols0 = tl.arange(0, BLOCK)
    m = float("-inf")
    d = 0.0
    # The loops over blocks are `while`, not `for start in range(0, num_classes, BLOCK)`: triton 3.6's interpreter
    # (with numpy >= 2.5) cannot take a runtime bound in range(). The cubins match: the same registers and spills
    # on sm_80/90/100, instruction counts within 8 in 1 of 24 variants (results/kernel_loop_while_vs_for.txt).
    start = 0
    while start < num_classes:
        cols = start + cols0
        start += BLOCK
        x = tl.load(row_ptr + cols, mask=cols < num_classes, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # While every logit so far is -inf, shift by 0 rather than by -inf (-inf - -inf = NaN).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    return m + tl.log(d)


@triton.jit
def _ensemble_kd_looped_kernel(
    t_ptr, s_ptr, t_bar_ptr, grad_ptr, ce_ptr, kl_ptr,
    stride_tk, stride_tb, stride_sb, stride_t_bar_b, stride_grad_b,
    num_classes, inv_batch,
    K: tl.constexpr, K_POW2: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row wider than a block: pass 1 finds each log-sum-exp, pass 2 computes p, the losses and the grad."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    t_row = t_ptr + row * stride_tb

    s_lse = _row_logsumexp(s_row, num_classes, BLOCK)
    # The K teachers' log-sum-exps, kept in a small vector (Triton has no arrays of scalars).
    teacher_ids = tl.arange(0, K_POW2)
    t_lse = tl.zeros([K_POW2], dtype=tl.float32)
    for k in tl.static_range(K):
        t_lse = tl.where(teacher_ids == k, _row_logsumexp(t_row + k * stride_tk, num_classes, BLOCK), t_lse)

    cols0 = tl.arange(0, BLOCK)
    ce_acc = tl.zeros([BLOCK], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < num_classes:
        cols = start + cols0
        start += BLOCK
        mask = cols < num_classes
        log_q = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32) - s_lse
        p = tl.zeros([BLOCK], dtype=tl.float32)
        t_sum = tl.zeros([BLOCK], dtype=tl.float32)
        t_ptrs = t_row + cols
        for k in tl.static_range(K):
            t = tl.load(t_ptrs, mask=mask, other=float("-inf")).to(tl.float32)
            p += tl.exp(t - tl.sum(tl.where(teacher_ids == k, t_lse, 0.0), axis=0))
            t_sum += tl.where(mask, t, 0.0)
            t_ptrs += stride_tk
        p = p / K
        tl.store(t_bar_ptr + row * stride_t_bar_b + cols, (t_sum / K).to(t_bar_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_ptr + row * stride_grad_b + cols,
                 ((tl.exp(log_q) - p) * inv_batch).to(grad_ptr.dtype.element_ty), mask=mask)
        ce_acc += tl.where(mask, p * log_q, 0.0)
        kl_acc += tl.where(p == 0.0, 0.0, p * (tl.log(p) - log_q))
    tl.store(ce_ptr + row, -tl.sum(ce_acc, axis=0))
    tl.store(kl_ptr + row, tl.sum(kl_acc, axis=0))


def _num_warps(block: int) -> int:
    """Warps per row program, from ptxas's register counts of every variant (benchmarks/kernel_resources.py).

    4 warps spilled a few bytes on sm_90 for a 1,024 block with 3-4 teachers (triton 3.8) and for a 512 block
    with 4 fp16/bf16 teachers (triton 3.6); with 8 warps each thread holds at most 8 fp32 values per row
    vector (p, t_sum, log_q, ...) and neither spills.
    """
    return 4 if block <= 256 else 8


def launch_config(num_classes: int, num_teachers: int, max_fused_block: int = MAX_FUSED_BLOCK,
                  loop_block: int = LOOP_BLOCK) -> tuple[triton.JITFunction, dict[str, int], int]:
    """The kernel, its compile-time constants and ``num_warps`` that rows of ``num_classes`` classes get.

    The one place the launcher's choices are made: ``benchmarks/kernel_resources.py`` and
    ``tests/test_kernel_compile.py`` compile exactly what it returns, for real GPUs.
    """
    block = max(MIN_BLOCK, triton.next_power_of_2(num_classes))
    if block <= max_fused_block:
        return _ensemble_kd_fused_kernel, {"K": num_teachers, "BLOCK": block}, _num_warps(block)
    block = min(loop_block, block)
    return (_ensemble_kd_looped_kernel, {"K": num_teachers, "K_POW2": max(2, triton.next_power_of_2(num_teachers)),
                                         "BLOCK": block}, _num_warps(block))


def _outputs(device: torch.device, specs: tuple[tuple[str, Tensor | None, tuple[int, ...], torch.dtype], ...]
             ) -> list[Tensor]:
    """The kernels' output buffers: each ``(name, given, shape, dtype)`` allocated when ``given`` is None, else checked.

    A given buffer must have exactly that shape and dtype, contiguous rows and the inputs' device (the kernels
    write rows with unit stride; CUDA-graph callers pass static buffers).
    """
    outs = []
    for name, out, shape, dtype in specs:
        if out is None:
            out = torch.empty(shape, device=device, dtype=dtype)
        elif out.shape != shape or out.dtype != dtype or out.stride(-1) != 1 or out.device != device:
            raise ValueError(f"{name} must be a {dtype} tensor of shape {shape} on {device} with contiguous "
                             f"rows, got {out.dtype} {tuple(out.shape)} strides {out.stride()} on {out.device}")
        outs.append(out)
    return outs


def _check_inputs(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    if student_logits.dim() != 2 or teacher_logits.dim() != 3 or teacher_logits.shape[1:] != student_logits.shape:
        raise ValueError(f"expected student logits [B, C] and teacher logits [K, B, C], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not 1 <= teacher_logits.shape[0] <= MAX_TEACHERS:
        raise ValueError(f"the kernel takes 1 to {MAX_TEACHERS} teachers, got K={teacher_logits.shape[0]}")
    if student_logits.shape[0] == 0 or student_logits.shape[1] == 0:
        raise ValueError(f"empty logits: {tuple(student_logits.shape)}")
    for name, x in (("student", student_logits), ("teacher", teacher_logits)):
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name} logits must be one of {_DTYPES}, got {x.dtype}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student logits on {student_logits.device}, teacher logits on {teacher_logits.device}")
    # Rows may be strided (e.g. a slice of a larger batch); each row itself must be contiguous.
    if student_logits.stride(-1) != 1:
        student_logits = student_logits.contiguous()
    if teacher_logits.stride(-1) != 1:
        teacher_logits = teacher_logits.contiguous()
    return student_logits, teacher_logits


def ensemble_kd_forward(student_logits: Tensor, teacher_logits: Tensor, *,
                        ce_rows: Tensor | None = None, kl_rows: Tensor | None = None,
                        t_bar: Tensor | None = None, grad: Tensor | None = None,
                        max_fused_block: int = MAX_FUSED_BLOCK,
                        loop_block: int = LOOP_BLOCK) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the kernel: per-row losses, mean teacher logits and the student gradient.

    Outputs may be preallocated (tests fill them with NaN to prove that every element is written);
    the others are allocated here.

    Args:
        student_logits: ``[B, C]`` student logits ``s`` (fp32/fp16/bf16).
        teacher_logits: ``[K, B, C]`` teacher logits (fp32/fp16/bf16), ``1 <= K <= 8``; any strides
            along K and B, rows made contiguous if they are not.
        ce_rows: ``[B]`` fp32 output, ``-Σ_c p log q`` per row.
        kl_rows: ``[B]`` fp32 output, ``Σ_c p (log p - log q)`` per row.
        t_bar: ``[B, C]`` output in the teachers' dtype (any row stride), ``mean_k t_k``.
        grad: ``[B, C]`` output in the student's dtype (any row stride), ``(q - p) / B``.
        max_fused_block: widest power-of-two block processed in one pass; wider rows take the
            two-pass online-softmax path.
        loop_block: block width of the two-pass path (a power of two).

    Returns:
        ``(ce_rows, kl_rows, t_bar, grad)``.
    """
    student_logits, teacher_logits = _check_inputs(student_logits, teacher_logits)
    num_teachers, batch, num_classes = teacher_logits.shape
    device = student_logits.device
    ce_rows, kl_rows, t_bar, grad = _outputs(device, (
        ("ce_rows", ce_rows, (batch,), torch.float32),
        ("kl_rows", kl_rows, (batch,), torch.float32),
        ("t_bar", t_bar, (batch, num_classes), teacher_logits.dtype),
        ("grad", grad, (batch, num_classes), student_logits.dtype)))

    args = (teacher_logits, student_logits, t_bar, grad, ce_rows, kl_rows,
            teacher_logits.stride(0), teacher_logits.stride(1), student_logits.stride(0), t_bar.stride(0),
            grad.stride(0), num_classes, 1.0 / batch)
    kernel, constexprs, num_warps = launch_config(num_classes, num_teachers, max_fused_block, loop_block)
    kernel[(batch,)](*args, **constexprs, num_warps=num_warps)
    return ce_rows, kl_rows, t_bar, grad


@torch.library.custom_op("fastmeal::ensemble_kd", mutates_args=())
def _ensemble_kd_op(student_logits: Tensor, teacher_logits: Tensor, max_fused_block: int,
                    loop_block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ce_rows, kl_rows, t_bar, grad = ensemble_kd_forward(student_logits, teacher_logits,
                                                        max_fused_block=max_fused_block, loop_block=loop_block)
    return ce_rows.mean(), kl_rows.mean(), t_bar, grad


@_ensemble_kd_op.register_fake
def _ensemble_kd_fake(student_logits: Tensor, teacher_logits: Tensor, max_fused_block: int,
                      loop_block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, num_classes = student_logits.shape
    return (student_logits.new_empty((), dtype=torch.float32),
            student_logits.new_empty((), dtype=torch.float32),
            teacher_logits.new_empty((batch, num_classes)),
            student_logits.new_empty((batch, num_classes)))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[3])


def _backward(ctx, grad_ce: Tensor, grad_kl: Tensor, grad_t_bar: Tensor, grad_grad: Tensor):
    # The gradient (q - p) / B was written by the forward; only grad_output remains to apply.
    (grad,) = ctx.saved_tensors
    return (None if grad_ce is None else grad * grad_ce), None, None, None


_ensemble_kd_op.register_autograd(_backward, setup_context=_setup_context)


def ensemble_kd(student_logits: Tensor, teacher_logits: Tensor, *, max_fused_block: int = MAX_FUSED_BLOCK,
                loop_block: int = LOOP_BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """Soft cross-entropy to the teachers' mean softmax, its KL, and the mean teacher logits.

    Computes the PyTorch formula in the module docstring in one fused kernel (``torch.compile``
    traces it as the custom op ``fastmeal::ensemble_kd``). On CPU tensors it runs only under
    ``TRITON_INTERPRET=1``.

    Args:
        student_logits: ``[B, C]`` student logits (fp32/fp16/bf16); receives the gradient of ``soft_ce``.
        teacher_logits: ``[K, B, C]`` frozen teachers' logits (fp32/fp16/bf16), ``1 <= K <= 8``.
        max_fused_block: see :func:`ensemble_kd_forward`.
        loop_block: see :func:`ensemble_kd_forward`.

    Returns:
        ``soft_ce`` (fp32 scalar, differentiable w.r.t. the student), ``kl`` (fp32 scalar, detached)
        and ``t_bar`` (``[B, C]`` in the teachers' dtype, detached).
    """
    soft_ce, kl, t_bar, _ = _ensemble_kd_op(student_logits, teacher_logits, max_fused_block, loop_block)
    return soft_ce, kl.detach(), t_bar.detach()
