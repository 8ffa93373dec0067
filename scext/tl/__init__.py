"""Tools: train a model on an AnnData and write its results into the AnnData's slots."""

from ._cellvgae import cellvgae, cellvgae_marker_genes, cellvgae_predict
from ._cicl import cicl, cicl_predict
from ._kratos import kratos, kratos_predict
from ._rank_genes import rank_genes_perturbation
from ._scdefer import scdefer, scdefer_predict

__all__ = [
    "cellvgae",
    "cellvgae_marker_genes",
    "cellvgae_predict",
    "cicl",
    "cicl_predict",
    "kratos",
    "kratos_predict",
    "rank_genes_perturbation",
    "scdefer",
    "scdefer_predict",
]
