"""Tools: train a model on an AnnData and write its results into the AnnData's slots."""

from ._kratos import kratos, kratos_predict
from ._rank_genes import rank_genes_perturbation

__all__ = ["kratos", "kratos_predict", "rank_genes_perturbation"]
