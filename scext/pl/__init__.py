"""Plots that read scext's slots (never recompute a model), with Scanpy's show/save semantics."""

from ._cellvgae import attention_embedding, attention_graph, learned_expression
from ._history import training_history
from ._panels import discriminative_power, redundancy

__all__ = [
    "attention_embedding",
    "attention_graph",
    "discriminative_power",
    "learned_expression",
    "redundancy",
    "training_history",
]
