"""Models: students and teachers from timm tags (``factory``), the frozen ensemble (``teachers``), the discriminator."""

from fastmeal.models.discriminator import Discriminator
from fastmeal.models.factory import (
    WeightsError,
    build_discriminator,
    build_student,
    build_teacher_models,
    build_teachers,
    load_weights,
    read_weights_file,
)

__all__ = [
    "Discriminator",
    "WeightsError",
    "build_discriminator",
    "build_student",
    "build_teacher_models",
    "build_teachers",
    "load_weights",
    "read_weights_file",
]
