"""The optimiser of a run: one SGD over the student's and the objective's parameters (SPEC step 9)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastmeal.config import Config


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """One SGD over ``model.student``'s and ``model.objective``'s parameters (groups ``student``, ``discriminator``).

    ``optim.impl``: ``auto`` = torch's fused SGD on CUDA, foreach on the CPU; ``torch`` = torch's
    default implementation (the reference's); ``apex`` = apex's FusedSGD (fails with the install
    command when apex is absent).
    """
    groups = [{"params": [p for p in model.student.parameters() if p.requires_grad], "name": "student"},
              *model.objective.param_groups()]
    o = cfg.optim
    kwargs: dict[str, Any] = {"lr": cfg.lr_at(0), "momentum": o.momentum, "nesterov": o.nesterov,
                              "weight_decay": o.weight_decay}
    if o.impl == "apex":
        if device.type != "cuda":
            raise RuntimeError("optim.impl=apex needs CUDA; use optim.impl=auto on the CPU")
        try:
            from apex.optimizers import FusedSGD
        except ImportError as err:
            raise RuntimeError("optim.impl=apex needs NVIDIA apex built with --cuda_ext: "
                               "pip install -v --no-build-isolation --config-settings '--build-option=--cpp_ext' "
                               "--config-settings '--build-option=--cuda_ext' git+https://github.com/NVIDIA/apex; "
                               "or use optim.impl=auto (torch's fused SGD)") from err
        return FusedSGD(groups, **kwargs)
    if o.impl == "auto":
        kwargs["fused" if device.type == "cuda" else "foreach"] = True
    optimizer = torch.optim.SGD(groups, **kwargs)
    init_momentum_buffers(optimizer)
    return optimizer


@torch.no_grad()
def init_momentum_buffers(optimizer: torch.optim.SGD) -> None:
    """Give every parameter a zero momentum buffer before the first step (SGD with momentum, no dampening).

    torch's fused SGD allocates the buffers of its first step with ``empty_like`` and lets the kernel fill
    them; when a GradScaler skips that step (fp16's first steps usually overflow) the kernel returns early,
    ``SGD.step`` stores the unwritten buffers anyway, and the next step reads uninitialised memory. With
    zeros there is no "first step": ``buf = momentum · 0 + grad`` is exactly the first-step rule.
    """
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        if group.get("dampening", 0) != 0:
            raise ValueError("zero-initialised momentum needs dampening 0 (the first step would differ)")
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
