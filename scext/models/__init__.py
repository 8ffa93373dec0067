"""Model classes: plain torch modules plus the genes, classes and scaler they need. No AnnData inside a module."""

from ._attribution import cw_hinge, cw_perturbation, integrated_gradients, smoothgrad
from ._base import Model
from ._cellvgae import CellVGAE, CellVGAENet
from ._cicl import Cicl, CiclNet
from ._gene_gcn import GeneGraphSmoothing, normalized_prior
from ._kmeans import kmeans
from ._kratos import Kratos, KratosNet
from ._scdefer import Scdefer, ScdeferNet

__all__ = [
    "CellVGAE",
    "CellVGAENet",
    "Cicl",
    "CiclNet",
    "GeneGraphSmoothing",
    "Kratos",
    "KratosNet",
    "Model",
    "Scdefer",
    "ScdeferNet",
    "cw_hinge",
    "cw_perturbation",
    "integrated_gradients",
    "kmeans",
    "normalized_prior",
    "smoothgrad",
]
