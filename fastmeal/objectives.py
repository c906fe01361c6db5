"""One class per training mode: what a step optimises, and what it needs to compute it.

The trainer knows none of the modes. It asks the run's objective (``loss.mode``, looked up in
:data:`fastmeal.registry.OBJECTIVES`) three things:

* :meth:`Objective.prepare` (eager, no gradient): add what the loss needs to the batch's ``targets``
  (the online mode runs its frozen teachers here);
* :meth:`Objective.forward` (compiled with the student's forward): the loss parts from the student's
  logits, a dict whose ``loss`` is back-propagated (timm's distillation task returns the same);
* its trainable parameters (the discriminator), optimised and saved with the student.

A new mode is a subclass and one registry line (:func:`fastmeal.registry.register`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmeal.batch import Batch
from fastmeal.config import Config
from fastmeal.errors import SetupError
from fastmeal.evaluate import autocast_context
from fastmeal.losses import bank_meal_v2_loss, meal_v2_loss
from fastmeal.profiling import phase
from fastmeal.registry import OBJECTIVES, resolve


class Objective(nn.Module):
    """A training mode. Subclasses set :attr:`part_names` and implement :meth:`forward`.

    Attributes:
        part_names: the loss parts that are logged, ``loss`` first (the trainer averages them on the device).
        discriminator: the trainable module optimised with the student and saved in the checkpoint's
            ``discriminator`` slot, or None.
    """

    part_names: tuple[str, ...] = ("loss",)

    def __init__(self, discriminator: nn.Module | None = None) -> None:
        super().__init__()
        self.discriminator = discriminator

    @classmethod
    def build(cls, cfg: Config, *, device: torch.device, batch_size: int, **parts: Any) -> Objective:
        """The objective of ``cfg`` on ``device`` for a per-rank ``batch_size``; ``parts`` replace what it would
        build (tests and benchmarks pass tiny teachers or random-weight ones), and a mode ignores parts it does
        not use."""
        return cls()

    @classmethod
    def uses_teachers(cls, cfg: Config) -> bool:
        """Whether a run of ``cfg`` builds (and loads the weights of) the teachers ``model.teachers`` names."""
        return False

    def train_loader(self, loader: Any) -> Any:
        """The loader the trainer reads, given the run's (a mode whose targets come with the data wraps it)."""
        return loader

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups besides the student's."""
        if self.discriminator is None:
            return []
        return [{"params": list(self.discriminator.parameters()), "name": "discriminator"}]

    def prepare(self, batch: Batch) -> None:
        """Add to ``batch.targets`` what :meth:`forward` reads (eager, outside the compiled step)."""

    def forward(self, logits: Tensor, labels: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss parts (fp32 scalars) of the student's ``logits`` ``[B, C]``."""
        raise NotImplementedError


class HardLabels(Objective):
    """``loss.mode=ce``: cross-entropy to the labels (the demo's teachers and baseline); no teachers, no D.

    With CutMix the labels are mixed as CutMix does: ``λ·CE(y) + (1−λ)·CE(y[perm])``.
    """

    def forward(self, logits: Tensor, labels: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = logits.float()
        loss = F.cross_entropy(logits, labels)
        if "mix_lam" in targets:
            lam = targets["mix_lam"]
            loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits, labels[targets["mix_perm"]])
        return {"loss": loss}


def check_loss_impl(impl: str, device: torch.device) -> None:
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SetupError(f"loss.impl=triton runs its kernel on a CUDA GPU, and this run is on {device}; use "
                         "loss.impl=auto (Triton on CUDA, PyTorch elsewhere) or loss.impl=torch")


class MealV2(Objective):
    """``loss.mode=meal_v2`` online: the frozen teachers see the step's batch (SPEC, "The algorithm, exactly").

    ``loss = kd + d``: soft CE to the teachers' mean softmax plus the discriminator's BCE
    (:func:`fastmeal.losses.meal_v2_loss`); no hard-label term. With ``bank.path`` the same mode reads
    the teachers' soft labels from the bank instead (:class:`MealV2FromBank`).

    Args:
        teachers: frozen ``[B, 3, S, S] → [K, B, C]`` (a ``TeacherEnsemble``); not a module: never saved,
            optimised or wrapped in DDP.
        discriminator: ``D`` or None (``loss.discriminator=false``).
        impl: ``loss.impl``.
    """

    def __init__(self, *, teachers: Any, discriminator: nn.Module | None, impl: str = "auto") -> None:
        super().__init__(discriminator)
        if teachers is None:
            raise SetupError("loss.mode=meal_v2 needs teachers (build_teachers); use loss.mode=ce for hard labels")
        self.teachers = teachers
        self.impl = impl
        self.part_names = ("loss", "kd", "d", "kl") if discriminator is not None else ("loss", "kd", "kl")

    @classmethod
    def uses_teachers(cls, cfg: Config) -> bool:
        return not cfg.bank.path  # from a bank: their soft labels, not the teachers

    @classmethod
    def build(cls, cfg: Config, *, device: torch.device, batch_size: int, **parts: Any) -> Objective:
        from fastmeal.models.factory import build_discriminator, build_teachers

        check_loss_impl(cfg.loss.impl, device)
        if "discriminator" not in parts:
            parts["discriminator"] = build_discriminator(cfg)
        if parts["discriminator"] is not None:
            parts["discriminator"] = parts["discriminator"].to(device)
        if cfg.bank.path:
            return MealV2FromBank(cfg, device=device, discriminator=parts["discriminator"])
        if "teachers" not in parts:  # the per-rank batch's CUDA graphs are captured now, before any loader starts
            parts["teachers"] = build_teachers(cfg, device, batch_sizes=[batch_size])
        return cls(impl=cfg.loss.impl, **parts)

    def prepare(self, batch: Batch) -> None:
        with phase("teachers"), torch.no_grad():
            batch.targets["teacher_logits"] = self.teachers(batch.images)

    def forward(self, logits: Tensor, labels: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        return meal_v2_loss(logits, targets["teacher_logits"], self.discriminator, impl=self.impl)


class MealV2FromBank(Objective):
    """MEAL V2 from the soft-label bank ``bank.path``: each crop's stored top-K instead of the teachers.

    The bank's loader adds ``probs``/``classes`` ``[B, K]`` to every batch; the loss is
    :func:`fastmeal.losses.bank_meal_v2_loss` (the discriminator compares ``softmax(s)`` with the decoded
    target: the bank has no teacher logits).
    """

    def __init__(self, cfg: Config, *, device: torch.device, discriminator: nn.Module | None) -> None:
        super().__init__(discriminator)
        self.cfg, self.device = cfg, device
        self.part_names = ("loss", "kd", "d", "kl") if discriminator is not None else ("loss", "kd", "kl")

    def train_loader(self, loader: Any) -> Any:
        from fastmeal.bank.replay import BankLoader, open_bank

        return BankLoader(loader, open_bank(self.cfg, loader), self.device)

    def forward(self, logits: Tensor, labels: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        return bank_meal_v2_loss(logits, targets["probs"], targets["classes"], self.discriminator,
                                 impl=self.cfg.loss.impl)


def _phase(name: str) -> contextlib.AbstractContextManager:
    """:func:`phase` in eager code; nothing while torch.compile traces (the NVTX calls would break the graph)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else phase(name)


class TrainedModel(nn.Module):
    """The trained parts in one module: the student and the objective (its discriminator); one DDP wrapper, one state.

    ``forward`` returns the objective's loss parts (``loss`` is back-propagated) plus ``logits``, the
    student's ``[B, C]`` output; the student runs under autocast to ``autocast_dtype`` (None: fp32).
    """

    def __init__(self, student: nn.Module, objective: Objective, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.autocast_dtype = autocast_dtype

    def forward(self, images: Tensor, labels: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
        with _phase("student_fwd"), autocast_context(images.device, self.autocast_dtype):
            logits = self.student(images)
        with _phase("loss"):
            out = dict(self.objective(logits, labels, targets))
        out["logits"] = logits
        return out


def build_objective(cfg: Config, *, device: torch.device | None = None, batch_size: int | None = None,
                    **parts: Any) -> Objective:
    """The objective ``loss.mode`` names (:data:`fastmeal.registry.OBJECTIVES`), built for ``cfg``.

    Args:
        device: where it runs (default: the CPU).
        batch_size: the per-rank training batch (default ``data.batch_size``): teachers capture graphs for it.
        parts: given parts instead of built ones (``teachers=``, ``discriminator=``).
    """
    cls = resolve(OBJECTIVES, cfg.loss.mode)
    return cls.build(cfg, device=device or torch.device("cpu"), batch_size=batch_size or cfg.data.batch_size,
                     **parts)


def needs_teachers(cfg: Config) -> bool:
    """Whether a run of ``cfg`` builds the teachers (its objective's answer)."""
    return resolve(OBJECTIVES, cfg.loss.mode).uses_teachers(cfg)
