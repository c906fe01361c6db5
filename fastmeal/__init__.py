"""fastmeal: a fast, faithful MEAL V2 knowledge-distillation trainer."""

__version__ = "0.1.0"
