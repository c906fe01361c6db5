"""Frozen feature extractors for the transfer probe: a timm model whose output is its pooled penultimate features.

The probe (:mod:`fastmeal.probe`) needs, for any tag fastmeal builds, the features a linear classifier
is fitted on: timm's ``forward_head(forward_features(x), pre_logits=True)`` (global pooling, no
classifier; 2048 values for a ResNet-50). Weights come from a file (any class count: the head is
resized to the file's before the checked load, then unused), from the tag's pretrained weights, or
from a seeded random init (the baseline a trained backbone must beat).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from fastmeal.checkpoint import state_digest
from fastmeal.data.common import IMAGENET_MEAN, IMAGENET_STD
from fastmeal.models.factory import (
    WeightsError,
    create_model,
    create_pretrained,
    load_state_dict_checked,
    read_weights_file,
)


class PooledFeatures(nn.Module):
    """``[B, 3, S, S]`` images → ``[B, d]`` pooled penultimate features of a timm model (its head unused)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


@dataclass(frozen=True)
class Backbone:
    """A frozen feature extractor and what identifies it.

    Attributes:
        module: :class:`PooledFeatures` in eval mode, no gradients, on the CPU.
        tag: the timm tag; ``weights``: the file, ``(pretrained)`` or ``(random init, seed N)``.
        digest: SHA-256 of the weights' content (every tensor of the state dict): the feature cache's key.
        num_features: ``d``; ``mean``, ``std``: the normalisation its inputs get.
    """

    module: PooledFeatures
    tag: str
    weights: str
    digest: str
    num_features: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def build_backbone(tag: str, *, weights: str | os.PathLike | None = None, random_init: bool = False,
                   seed: int = 0) -> Backbone:
    """The frozen backbone of ``tag``, with weights from ``weights``, the tag's pretrained ones, or a seeded init.

    Normalisation: ImageNet's for a weights file (fastmeal trains every student and teacher with it, and
    the released MEAL V2 weights were trained with it) and for random weights; the model's own
    ``pretrained_cfg`` mean/std for the tag's pretrained weights (some timm weights expect other values).

    Raises:
        WeightsError: an unknown tag, an unreadable file or one of another architecture, pretrained
            weights that cannot be had offline (the message says to pass ``--weights FILE``).
    """
    if weights and random_init:
        raise WeightsError("--weights and --random-init exclude each other")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if weights:
        state = read_weights_file(weights, what="--weights")
        model = create_model(tag, what="--model")
        # A file's classifier may predict any class count (a demo student: 10): size the head like it so
        # that every other tensor is checked key by key; the head itself is never used.
        head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        head_weight = state.get(f"{head}.weight") if isinstance(head, str) else None
        if head_weight is not None and head_weight.ndim == 2 and head_weight.shape[0] != model.num_classes:
            model.reset_classifier(head_weight.shape[0])
        load_state_dict_checked(model, state, source=f"--weights ({weights})")
        description = str(weights)
    elif random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_model(tag, what="--model")
        description = f"(random init, seed {seed})"
    else:
        try:
            model = create_pretrained(tag, what="--model", override_key="--weights FILE")
        except WeightsError as err:  # its advice names a config override; the probe takes a flag
            raise WeightsError(str(err).replace("--set --weights FILE", "--weights FILE")) from err
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))
        description = "(pretrained)"
    model.eval().requires_grad_(False)
    return Backbone(module=PooledFeatures(model).eval(), tag=tag, weights=description,
                    digest=state_digest(model.state_dict()), num_features=int(model.num_features),
                    mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
