"""Plots that read scext's slots (never recompute a model), with Scanpy's show/save semantics."""

from ._history import training_history
from ._panels import discriminative_power, redundancy

__all__ = ["discriminative_power", "redundancy", "training_history"]
