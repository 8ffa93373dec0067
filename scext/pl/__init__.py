"""Plots that read scext's slots (never recompute a model), with Scanpy's show/save semantics."""

from ._history import training_history

__all__ = ["training_history"]
