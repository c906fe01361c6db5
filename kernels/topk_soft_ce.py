"""Soft cross-entropy against a sparse (top-K) target: the soft-label bank's loss, in one pass per row.

A bank record holds the teacher ensemble's top-K probabilities ``P`` ``[B, K]`` and their class
indices ``I`` ``[B, K]`` (distinct within a row). Decoding spreads the remaining mass evenly over the
other ``C - K`` classes::

    rest = clamp(1 - P.float().sum(-1), min=0)               # fp16 rounding may push ΣP just above 1
    u = rest / (C - K)                                       # 0 when K == C
    p = u[:, None].expand(B, C).clone(); p.scatter_(1, I.long(), P.float())   # the decoded target

and the op computes, in fp32 whatever the input dtypes, exactly what this PyTorch code computes::

    log_q = torch.log_softmax(s.float(), -1)
    soft_ce = -(p * log_q).sum(-1).mean()
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1).mean()      # KL(p ‖ q), for logging
    target = p                                               # the discriminator's "real" rows (bank mode)
    d soft_ce / d s = (softmax(s.float(), -1) - p) / B

One Triton program per row reads the student row once (twice for rows wider than
``max_fused_block``, through an online softmax) and the row's K probabilities and indices; it writes
the decoded target and the gradient ``(q - p) / B`` during the forward, so the backward is one
multiplication by ``grad_output``. Only ``soft_ce`` is differentiable, and only with respect to
``s``; ``kl`` and ``target`` are returned detached.

The plain-PyTorch reference is ``fastmeal.losses.decode_topk`` + ``soft_cross_entropy``.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

# The online-softmax row reduction and the warp count are the ensemble-KD kernel's (same row shapes).
from fastmeal.kernels import ensemble_kd
from fastmeal.kernels.ensemble_kd import MIN_BLOCK, _num_warps, _outputs, _row_log_softmax, _row_logsumexp

#: Rows up to this many classes (rounded up to a power of two) are processed as a single block (the ensemble
#: kernel's limits: the same row shapes, one block and warp rule to verify).
MAX_FUSED_BLOCK = ensemble_kd.MAX_FUSED_BLOCK
#: Block width of the two-pass path used for wider rows.
LOOP_BLOCK = ensemble_kd.LOOP_BLOCK
#: Entries per record: the K loop is unrolled at compile time.
MAX_TOP_K = 64
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PROB_DTYPES = (torch.float16, torch.float32, torch.bfloat16)
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


@triton.jit
def _decoded_row(cols, mask, p_row, i_row, num_classes, K: tl.constexpr):
    """The decoded target over one block of columns, and its uniform share ``u`` of the rest.

    The K loops are not unrolled (``range``, not ``tl.static_range``): unrolled, ptxas kept all 2K loaded
    values live and spilled registers from K=32 on (sm_100: K=64 at ImageNet-1k's block); looped, only K=64
    at the 2,048 block spills 8 bytes (benchmarks/results/kernel_resources.json). Each pass re-reads the row's
    K values (cached).
    """
    p_sum = 0.0
    for k in range(K):
        p_sum += tl.load(p_row + k).to(tl.float32)
    rest = 1.0 - p_sum
    rest = tl.where(rest < 0.0, 0.0, rest)  # not tl.maximum: a NaN record must stay NaN (loud)
    num_rest = num_classes - K
    u = tl.where(num_rest > 0, rest / tl.maximum(num_rest, 1).to(tl.float32), 0.0)
    p = tl.where(mask, u, 0.0)
    for k in range(K):
        idx = tl.load(i_row + k).to(tl.int32)
        p = tl.where(cols == idx, tl.load(p_row + k).to(tl.float32), p)
    return p, u


@triton.jit
def _topk_soft_ce_fused_kernel(
    s_ptr, p_ptr, i_ptr, target_ptr, grad_ptr, ce_ptr, kl_ptr,
    stride_sb, stride_pb, stride_ib, stride_target_b, stride_grad_b,
    num_classes, inv_batch,
    K: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row whose C classes fit one block: the student row is read once."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_classes
    log_q = _row_log_softmax(s_ptr + row * stride_sb, cols, mask)
    p, _u = _decoded_row(cols, mask, p_ptr + row * stride_pb, i_ptr + row * stride_ib, num_classes, K)
    tl.store(target_ptr + row * stride_target_b + cols, p, mask=mask)
    tl.store(grad_ptr + row * stride_grad_b + cols, ((tl.exp(log_q) - p) * inv_batch).to(grad_ptr.dtype.element_ty),
             mask=mask)
    # where(p == 0, 0, ...) gives 0 · log 0 = 0 (padding, a class with no mass), yet keeps a NaN p or s.
    ce = -tl.sum(tl.where(p == 0.0, 0.0, p * log_q), axis=0)
    kl = tl.sum(tl.where(p == 0.0, 0.0, p * (tl.log(p) - log_q)), axis=0)
    tl.store(ce_ptr + row, ce)
    tl.store(kl_ptr + row, kl)


@triton.jit
def _topk_soft_ce_looped_kernel(
    s_ptr, p_ptr, i_ptr, target_ptr, grad_ptr, ce_ptr, kl_ptr,
    stride_sb, stride_pb, stride_ib, stride_target_b, stride_grad_b,
    num_classes, inv_batch,
    K: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row wider than a block: pass 1 finds the log-sum-exp, pass 2 the target, losses and gradient."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_sb
    lse = _row_logsumexp(s_row, num_classes, BLOCK)
    cols0 = tl.arange(0, BLOCK)
    ce_acc = tl.zeros([BLOCK], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = 0
    while start < num_classes:
        cols = start + cols0
        start += BLOCK
        mask = cols < num_classes
        log_q = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32) - lse
        p, _u = _decoded_row(cols, mask, p_ptr + row * stride_pb, i_ptr + row * stride_ib, num_classes, K)
        tl.store(target_ptr + row * stride_target_b + cols, p, mask=mask)
        tl.store(grad_ptr + row * stride_grad_b + cols,
                 ((tl.exp(log_q) - p) * inv_batch).to(grad_ptr.dtype.element_ty), mask=mask)
        ce_acc += tl.where(p == 0.0, 0.0, p * log_q)
        kl_acc += tl.where(p == 0.0, 0.0, p * (tl.log(p) - log_q))
    tl.store(ce_ptr + row, -tl.sum(ce_acc, axis=0))
    tl.store(kl_ptr + row, tl.sum(kl_acc, axis=0))


def launch_config(num_classes: int, top_k: int, max_fused_block: int = MAX_FUSED_BLOCK,
                  loop_block: int = LOOP_BLOCK) -> tuple[triton.JITFunction, dict[str, int], int]:
    """The kernel, its compile-time constants and ``num_warps`` that rows of ``num_classes`` classes get.

    The one place the launcher's choices are made (see :func:`fastmeal.kernels.ensemble_kd.launch_config`).
    """
    block = max(MIN_BLOCK, triton.next_power_of_2(num_classes))
    if block <= max_fused_block:
        return _topk_soft_ce_fused_kernel, {"K": top_k, "BLOCK": block}, _num_warps(block)
    block = min(loop_block, block)
    return _topk_soft_ce_looped_kernel, {"K": top_k, "BLOCK": block}, _num_warps(block)


def _check_inputs(student_logits: Tensor, probs: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if student_logits.dim() != 2 or probs.dim() != 2 or indices.shape != probs.shape \
            or probs.shape[0] != student_logits.shape[0]:
        raise ValueError(f"expected student logits [B, C], top-K probabilities [B, K] and indices [B, K], got "
                         f"{tuple(student_logits.shape)}, {tuple(probs.shape)} and {tuple(indices.shape)}")
    batch, num_classes = student_logits.shape
    top_k = probs.shape[1]
    if batch == 0 or num_classes == 0:
        raise ValueError(f"empty logits: {tuple(student_logits.shape)}")
    if not 1 <= top_k <= min(MAX_TOP_K, num_classes):
        raise ValueError(f"K={top_k} must be in [1, min({MAX_TOP_K}, C={num_classes})]")
    if student_logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"student logits must be one of {_LOGIT_DTYPES}, got {student_logits.dtype}")
    if probs.dtype not in _PROB_DTYPES:
        raise TypeError(f"top-K probabilities must be one of {_PROB_DTYPES}, got {probs.dtype}")
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"top-K indices must be one of {_INDEX_DTYPES}, got {indices.dtype}")
    if not student_logits.device == probs.device == indices.device:
        raise ValueError(f"student logits on {student_logits.device}, probabilities on {probs.device}, "
                         f"indices on {indices.device}")
    return (student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous(),
            probs if probs.stride(-1) == 1 else probs.contiguous(),
            indices if indices.stride(-1) == 1 else indices.contiguous())


def topk_soft_ce_forward(student_logits: Tensor, probs: Tensor, indices: Tensor, *,
                         ce_rows: Tensor | None = None, kl_rows: Tensor | None = None,
                         target: Tensor | None = None, grad: Tensor | None = None,
                         max_fused_block: int = MAX_FUSED_BLOCK,
                         loop_block: int = LOOP_BLOCK) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the kernel: per-row losses, the decoded target and the student gradient.

    Outputs may be preallocated (tests fill them with NaN to prove that every element is written).

    Args:
        student_logits: ``[B, C]`` (fp32/fp16/bf16), rows may be strided.
        probs: ``[B, K]`` top-K probabilities (fp16/fp32/bf16), ``1 <= K <= min(64, C)``.
        indices: ``[B, K]`` their class indices (int16/int32/int64), distinct within a row, in ``[0, C)``.
        ce_rows: ``[B]`` fp32 output, ``-Σ_c p log q`` per row.
        kl_rows: ``[B]`` fp32 output, ``Σ_c p (log p - log q)`` per row.
        target: ``[B, C]`` fp32 output (any row stride), the decoded target ``p``.
        grad: ``[B, C]`` output in the student's dtype (any row stride), ``(q - p) / B``.
        max_fused_block: widest power-of-two block processed in one pass.
        loop_block: block width of the two-pass path (a power of two).

    Returns:
        ``(ce_rows, kl_rows, target, grad)``.
    """
    student_logits, probs, indices = _check_inputs(student_logits, probs, indices)
    batch, num_classes = student_logits.shape
    device = student_logits.device
    ce_rows, kl_rows, target, grad = _outputs(device, (
        ("ce_rows", ce_rows, (batch,), torch.float32),
        ("kl_rows", kl_rows, (batch,), torch.float32),
        ("target", target, (batch, num_classes), torch.float32),
        ("grad", grad, (batch, num_classes), student_logits.dtype)))
    args = (student_logits, probs, indices, target, grad, ce_rows, kl_rows,
            student_logits.stride(0), probs.stride(0), indices.stride(0), target.stride(0), grad.stride(0),
            num_classes, 1.0 / batch)
    kernel, constexprs, num_warps = launch_config(num_classes, probs.shape[1], max_fused_block, loop_block)
    kernel[(batch,)](*args, **constexprs, num_warps=num_warps)
    return ce_rows, kl_rows, target, grad


@torch.library.custom_op("fastmeal::topk_soft_ce", mutates_args=())
def _topk_soft_ce_op(student_logits: Tensor, probs: Tensor, indices: Tensor, max_fused_block: int,
                     loop_block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ce_rows, kl_rows, target, grad = topk_soft_ce_forward(student_logits, probs, indices,
                                                          max_fused_block=max_fused_block, loop_block=loop_block)
    return ce_rows.mean(), kl_rows.mean(), target, grad


@_topk_soft_ce_op.register_fake
def _topk_soft_ce_fake(student_logits: Tensor, probs: Tensor, indices: Tensor, max_fused_block: int,
                       loop_block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, num_classes = student_logits.shape
    return (student_logits.new_empty((), dtype=torch.float32),
            student_logits.new_empty((), dtype=torch.float32),
            student_logits.new_empty((batch, num_classes), dtype=torch.float32),
            student_logits.new_empty((batch, num_classes)))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[3])


def _backward(ctx, grad_ce: Tensor, grad_kl: Tensor, grad_target: Tensor, grad_grad: Tensor):
    # The gradient (q - p) / B was written by the forward; only grad_output remains to apply.
    (grad,) = ctx.saved_tensors
    return (None if grad_ce is None else grad * grad_ce), None, None, None, None


_topk_soft_ce_op.register_autograd(_backward, setup_context=_setup_context)


def topk_soft_ce(student_logits: Tensor, probs: Tensor, indices: Tensor, *, max_fused_block: int = MAX_FUSED_BLOCK,
                 loop_block: int = LOOP_BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """Soft cross-entropy to a decoded top-K target, its KL, and the decoded target.

    Computes the PyTorch formula in the module docstring in one fused kernel (``torch.compile``
    traces it as the custom op ``fastmeal::topk_soft_ce``). On CPU tensors it runs only under
    ``TRITON_INTERPRET=1``.

    Args:
        student_logits: ``[B, C]`` (fp32/fp16/bf16); receives the gradient of ``soft_ce``.
        probs: ``[B, K]`` top-K probabilities; indices: ``[B, K]`` their classes (see
            :func:`topk_soft_ce_forward`).
        max_fused_block, loop_block: see :func:`topk_soft_ce_forward`.

    Returns:
        ``soft_ce`` (fp32 scalar, differentiable w.r.t. the student), ``kl`` (fp32 scalar, detached)
        and ``target`` (``[B, C]`` fp32, detached).
    """
    soft_ce, kl, target, _ = _topk_soft_ce_op(student_logits, probs, indices, max_fused_block, loop_block)
    return soft_ce, kl.detach(), target.detach()
