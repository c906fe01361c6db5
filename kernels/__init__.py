"""Triton kernels of fastmeal, installed as ``fastmeal.kernels`` (see pyproject.toml)."""
