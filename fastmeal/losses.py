"""The MEAL V2 loss in plain PyTorch: the reference the Triton kernel is tested against.

One training step (SPEC "The algorithm, exactly", steps 2-8), for student logits ``s`` ``[B, C]``
and the frozen teachers' logits ``t_k`` ``[K, B, C]``:

* soft target ``p = mean_k softmax(t_k)`` (temperature 1);
* ``kd = -(1/B) Σ_b Σ_c p[b, c] · log_softmax(s)[b, c]`` — the soft cross-entropy the reference
  optimises and logs (same gradient as ``KL(p ‖ softmax(s))``, larger by the entropy ``H(p)``);
* ``d = BCEWithLogits(D(cat[s, t̄]), targets)`` with ``t̄ = mean_k t_k`` (raw logits), targets
  ``[1, 0]`` for the B student rows and ``[0, 1]`` for the B teacher rows, mean over ``2B × 2``;
* ``loss = kd + d``. The discriminator's gradient reaches the student (no detach): the authors
  mean it as a regulariser.

:func:`meal_v2_loss` is what the trainer calls (fp32 math, cached targets, optional fused kernel);
:func:`reference_meal_v2_loss` is the reference's literal op chain, for the benchmarks'
"reference mode".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPLS = ("auto", "torch", "triton")


def soft_cross_entropy(student_logits: Tensor, target_probs: Tensor) -> Tensor:
    """Batch mean of ``-Σ_c target · log_softmax(student)``, computed in fp32.

    Args:
        student_logits: ``[B, C]`` logits (any float dtype).
        target_probs: ``[B, C]`` probabilities (rows sum to 1); no gradient flows into them.

    Returns:
        A scalar fp32 tensor.
    """
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    return -(target_probs.detach().float() * log_q).sum(-1).mean()


@functools.lru_cache(maxsize=16)
def discriminator_targets(batch_size: int, device: torch.device) -> Tensor:
    """The ``[2B, 2]`` fp32 BCE targets: ``[1, 0]`` for B student rows, then ``[0, 1]`` for B teacher rows.

    Built once per (batch size, device) directly on the device and cached, instead of the
    reference's host-built tensor copied every step. Call it once before CUDA-graph capture (the
    usual warm-up step does): built inside a capture it would only be filled on replay.

    Args:
        batch_size: B, the number of student rows.
        device: where the targets live.

    Returns:
        A ``[2B, 2]`` fp32 tensor; treat it as read-only, it is shared between calls.
    """
    # A normal tensor even when first asked for under inference_mode (an evaluation pass): an
    # inference tensor could not be saved for backward in later training steps.
    with torch.inference_mode(False), torch.no_grad():
        return _build_targets(batch_size, device)


def _build_targets(batch_size: int, device: torch.device) -> Tensor:
    teacher_row = torch.arange(2 * batch_size, device=device) >= batch_size  # device ops only: no host tensor
    return torch.stack([~teacher_row, teacher_row], dim=1).float()


def discriminator_loss(discriminator: nn.Module, student_rows: Tensor, teacher_rows: Tensor) -> Tensor:
    """``BCEWithLogits(D(cat[student_rows, teacher_rows]), targets)``, mean over all ``2B × 2`` entries.

    Args:
        discriminator: maps ``[2B, C]`` to ``[2B, 2]`` scores.
        student_rows: ``[B, C]``; the gradient flows back into them (SPEC step 9).
        teacher_rows: ``[B, C]`` (raw mean teacher logits online; probabilities in the FKD mode).

    Returns:
        A scalar fp32 tensor.
    """
    rows = torch.cat([student_rows.float(), teacher_rows.detach().float()])
    scores = discriminator(rows).float()
    if torch.compiler.is_compiling():  # built inside the compiled graph: Dynamo does not trace through the cache
        targets = _build_targets(student_rows.shape[0], scores.device)
    else:
        targets = discriminator_targets(student_rows.shape[0], scores.device)
    return F.binary_cross_entropy_with_logits(scores, targets)


def _ensemble_kd_torch(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Plain-PyTorch twin of ``fastmeal.kernels.ensemble_kd.ensemble_kd``: ``(kd, kl, t̄)``, all fp32."""
    teachers = teacher_logits.detach().float()
    p = F.softmax(teachers, dim=-1).mean(0)
    kd = soft_cross_entropy(student_logits, p)
    with torch.no_grad():
        # KL(p ‖ q) = CE(p, q) - H(p); xlogy gives 0·log 0 = 0 for classes a teacher rules out.
        kl = kd + torch.xlogy(p, p).sum(-1).mean()
    return kd, kl, teachers.mean(0)


def _use_triton(impl: str, student_logits: Tensor) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "triton":
        return True
    if student_logits.device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def meal_v2_loss(student_logits: Tensor, teacher_logits: Tensor | Sequence[Tensor],
                 discriminator: nn.Module | None, *, impl: str = "torch") -> dict[str, Tensor]:
    """The MEAL V2 loss and its parts, math in fp32 whatever the input dtype.

    Args:
        student_logits: ``[B, C]`` student logits ``s`` (fp32/fp16/bf16); gradients flow into it
            from both ``kd`` and ``d``.
        teacher_logits: ``[K, B, C]`` logits of the K frozen teachers (or a sequence of K ``[B, C]``
            tensors, stacked here); no gradient flows into them.
        discriminator: ``D`` mapping ``[2B, C] → [2B, 2]``, or None for distillation without it.
        impl: ``"torch"`` (plain ops), ``"triton"`` (the fused kernel for ``kd``/``kl``/``t̄``; on CPU
            tensors it needs ``TRITON_INTERPRET=1``), or ``"auto"`` (triton on CUDA when it imports).

    Returns:
        Scalar fp32 tensors: ``loss`` (``kd + d``, or ``kd`` without a discriminator), ``kd`` (soft
        cross-entropy), ``d`` (discriminator BCE; absent without a discriminator) and ``kl``
        (``KL(p ‖ softmax(s))``, detached, for logging).
    """
    if not isinstance(teacher_logits, Tensor):
        teacher_logits = torch.stack(list(teacher_logits))
    if teacher_logits.dim() != 3 or teacher_logits.shape[1:] != student_logits.shape:
        raise ValueError(f"teacher logits must be [K, B, C] with [B, C] = {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    # One fp32 copy of the student feeds both terms, so a half-precision student's two gradient
    # contributions are summed in fp32 and rounded once, as in eager autocast code (two casts would
    # round each and sum in half; the kernel would also store (q - p)/B in fp16, subnormal for most
    # classes). A no-op for fp32 students; for half ones a [B, C] copy, negligible next to the step.
    student_rows = student_logits.float()
    if _use_triton(impl, student_logits):
        from fastmeal.kernels.ensemble_kd import ensemble_kd

        kd, kl, t_bar = ensemble_kd(student_rows, teacher_logits)
    else:
        kd, kl, t_bar = _ensemble_kd_torch(student_rows, teacher_logits)
    out = {"loss": kd, "kd": kd, "kl": kl.detach()}
    if discriminator is not None:
        d = discriminator_loss(discriminator, student_rows, t_bar)
        out["loss"] = kd + d
        out["d"] = d
    return out


def decode_topk(probs: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """The full target of a soft-label bank record: top-K probabilities, the rest spread evenly.

    ``p[c] = probs[k]`` where ``c = indices[k]``; every other class gets ``max(1 - Σ probs, 0) / (C - K)``
    (0 when K = C). The plain-PyTorch twin of ``fastmeal.kernels.topk_soft_ce``'s decoding.

    Args:
        probs: ``[B, K]`` top-K probabilities (fp16 as stored, or any float dtype).
        indices: ``[B, K]`` their class indices (int16 as stored, or any integer dtype), distinct in a row.
        num_classes: C.

    Returns:
        ``[B, C]`` fp32 probabilities.
    """
    probs = probs.float()
    top_k = probs.shape[-1]
    rest = (1.0 - probs.sum(-1, keepdim=True)).clamp(min=0.0)
    share = rest / (num_classes - top_k) if num_classes > top_k else torch.zeros_like(rest)
    target = share.expand(probs.shape[0], num_classes).clone()
    return target.scatter_(1, indices.long(), probs)


def _topk_kd_torch(student_logits: Tensor, probs: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Plain-PyTorch twin of ``fastmeal.kernels.topk_soft_ce.topk_soft_ce``: ``(kd, kl, target)``, fp32."""
    target = decode_topk(probs, indices, student_logits.shape[-1])
    kd = soft_cross_entropy(student_logits, target)
    with torch.no_grad():
        kl = kd + torch.xlogy(target, target).sum(-1).mean()
    return kd, kl, target


def bank_meal_v2_loss(student_logits: Tensor, probs: Tensor, indices: Tensor, discriminator: nn.Module | None, *,
                      impl: str = "torch") -> dict[str, Tensor]:
    """MEAL V2 from a soft-label bank record instead of live teachers, math in fp32.

    ``kd`` is the soft cross-entropy to the decoded target (:func:`decode_topk`). The bank has no
    teacher logits, so the discriminator compares ``softmax(s)`` with the decoded target:
    ``d = BCEWithLogits(D(cat[softmax(s), target]), targets)`` (the one rule that differs from the
    online loss besides top-K; the gradient of ``d`` still reaches the student, through the softmax).

    Args:
        student_logits: ``[B, C]``; gradients flow into it from ``kd`` and ``d``.
        probs, indices: ``[B, K]`` the records' top-K probabilities and class indices.
        discriminator: ``D`` or None.
        impl: ``torch``, ``triton`` (the fused sparse-target kernel) or ``auto`` (triton on CUDA).

    Returns:
        Scalar fp32 tensors ``loss``, ``kd``, ``kl`` (detached) and, with a discriminator, ``d``.
    """
    if probs.dim() != 2 or probs.shape != indices.shape or probs.shape[0] != student_logits.shape[0]:
        raise ValueError(f"bank records must be [B, K] probabilities and indices with B = {student_logits.shape[0]}, "
                         f"got {tuple(probs.shape)} and {tuple(indices.shape)}")
    student_rows = student_logits.float()  # one fp32 copy feeds both terms (see meal_v2_loss)
    if _use_triton(impl, student_logits):
        from fastmeal.kernels.topk_soft_ce import topk_soft_ce

        kd, kl, target = topk_soft_ce(student_rows, probs, indices)
    else:
        kd, kl, target = _topk_kd_torch(student_rows, probs, indices)
    out = {"loss": kd, "kd": kd, "kl": kl.detach()}
    if discriminator is not None:
        d = discriminator_loss(discriminator, F.softmax(student_rows, dim=-1), target)
        out["loss"] = kd + d
        out["d"] = d
    return out


def reference_meal_v2_loss(student_logits: Tensor, teacher_logits: Tensor | Sequence[Tensor],
                           discriminator: nn.Module | None) -> dict[str, Tensor]:
    """The reference implementation's op chain, kept literal for the benchmarks' "reference mode".

    Each teacher's logits as ``[B, C, 1]`` columns, a softmax over the classes of each, concatenated to
    ``[B, C, K]`` and averaged over the last dimension; log_softmax, a batched ``bmm`` product, mean; the
    discriminator's target tensor built on the host and copied to the device every step. Like the
    reference it computes in the inputs' dtype (fp32 in reference mode). The same value as
    :func:`meal_v2_loss` up to fp32 rounding (a few ulp: the column softmax and the three-dimensional
    mean reduce in another order).

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[K, B, C]`` or a sequence of K ``[B, C]`` tensors.
        discriminator: ``D`` or None.

    Returns:
        ``loss``, ``kd`` and (with a discriminator) ``d``; no ``kl``, which the reference never computes.
    """
    teachers = list(teacher_logits)
    p = torch.cat([F.softmax(t.detach().unsqueeze(2), dim=1) for t in teachers], dim=2).mean(dim=2)
    log_q = F.log_softmax(student_logits, dim=1)
    kd = -torch.bmm(p.unsqueeze(1), log_q.unsqueeze(2)).mean()
    out = {"loss": kd, "kd": kd}
    if discriminator is not None:
        t_bar = torch.stack([t.detach() for t in teachers]).mean(0)
        rows = torch.cat((student_logits, t_bar), 0)
        batch = rows.size(0)
        target = torch.FloatTensor([[1, 0] for _ in range(batch // 2)] + [[0, 1] for _ in range(batch // 2)])
        target = target.to(rows.device)
        d = F.binary_cross_entropy_with_logits(discriminator(rows), target)
        out["loss"] = kd + d
        out["d"] = d
    return out
