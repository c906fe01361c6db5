"""The registries that the config's validation, the CLI and the factories all read (no torch import).

* :data:`OBJECTIVES`: ``loss.mode`` → the training objective's class (:mod:`fastmeal.objectives`).
* :data:`BACKENDS`: ``data.backend`` → the loader class, in the order ``auto`` tries them.

An entry is a class or ``"module:attribute"`` (imported on first use, so that reading the names costs
nothing). A new mode or backend is one class and one line here, or a call of :func:`register` from
the user's own code before the config is built.
"""

from __future__ import annotations

import importlib
from typing import Any

OBJECTIVES: dict[str, Any] = {
    "meal_v2": "fastmeal.objectives:MealV2",
    "ce": "fastmeal.objectives:HardLabels",
}

BACKENDS: dict[str, Any] = {
    "dali": "fastmeal.data.dali:DaliLoader",
    "torchvision": "fastmeal.data.torchvision:TorchvisionLoader",
}


def register(registry: dict[str, Any], name: str, target: Any) -> None:
    """Add ``target`` (a class, or ``"module:attribute"``) to ``registry`` under ``name``."""
    registry[name] = target


def resolve(registry: dict[str, Any], name: str) -> Any:
    """The entry ``name`` of ``registry``, imported if it was given as ``"module:attribute"``."""
    target = registry[name]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
    return target
