"""The MEAL V2 discriminator: a 3-layer MLP on class-logit vectors.

The reference (MEAL V2, Shen & Savvides 2020) writes it as three 1x1 convolutions on a
``[N, C, 1, 1]`` tensor; a 1x1 convolution on a 1x1 map is exactly a ``Linear`` layer on ``[N, C]``,
so we use ``Linear`` layers (same parameter count, same default initialisation, no reshapes).

Loss floor. The reference keeps a ReLU after the last layer and feeds the result to
``BCEWithLogitsLoss``. With outputs ``z >= 0``:

* an entry with target 0 costs ``softplus(z) >= softplus(0) = ln 2``;
* an entry with target 1 costs ``softplus(-z) > 0``, tending to 0 only as ``z -> inf``.

Every row has one entry of each kind (targets ``[1, 0]`` or ``[0, 1]``), so the mean over all
``2B x 2`` entries satisfies ``L_d > (ln 2 + 0) / 2 = ln(2) / 2 ≈ 0.34657``: an infimum that a
perfect discriminator approaches but never reaches (and never undercuts). Without the final ReLU
the loss can go to 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: The infimum of the discriminator's BCE loss when its outputs pass through a final ReLU (see above).
BCE_FLOOR_WITH_FINAL_RELU = math.log(2.0) / 2.0


class Discriminator(nn.Module):
    """``Linear(C, 125) → ReLU → Linear(125, 15) → ReLU → Linear(15, 2) → [ReLU]``.

    Args:
        num_classes: C, the length of the logit vectors it judges.
        hidden: widths of the two hidden layers (the reference uses 125 and 15).
        final_relu: keep the ReLU after the last layer, as the reference does (default). It bounds
            the BCE loss below by ``ln(2) / 2`` (see the module docstring).
    """

    def __init__(self, num_classes: int, hidden: tuple[int, ...] = (125, 15), final_relu: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        widths = (num_classes, *hidden, 2)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(fan_in, fan_out))  # bias on, default PyTorch init, as the reference's convs
            if i < len(widths) - 2 or final_relu:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.final_relu = final_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of logit vectors.

        Args:
            x: ``[N, C]`` logit vectors (student rows, then teacher rows in MEAL V2).

        Returns:
            ``[N, 2]`` scores, fed to ``BCEWithLogitsLoss`` (non-negative when ``final_relu``).
        """
        return self.net(x)
