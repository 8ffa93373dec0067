"""Gene-interaction feature smoothing before the KRATOS classifier (the gene-GCN report's GCN smoothing)."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Query genes per attention chunk on the CPU: bounds the cells x chunk x genes scores held at once.
ATTENTION_CHUNK = 256


def normalized_prior(graph, diagonal: str = "zero") -> sp.coo_matrix:
    """Prior global graph as the gene-GCN report builds it: interaction scores divided by their maximum.

    Parameters
    ----------
    graph
        Genes x genes matrix of finite, non-negative interaction scores (dense or sparse); its diagonal is
        ignored.
    diagonal
        ``"zero"`` makes genes attend to other genes only (the report's better variant); ``"one"`` adds
        each gene's own feature at full weight.

    Returns
    -------
    The normalised graph as a float32 COO matrix.
    """
    if diagonal not in ("zero", "one"):
        raise ValueError(f"prior_diagonal={diagonal!r} is unknown; choose 'zero' or 'one'.")
    graph = sp.csr_matrix(graph, dtype=np.float32)
    if graph.shape[0] != graph.shape[1]:
        raise ValueError(f"A prior gene graph must be square (genes x genes); got {graph.shape}.")
    if graph.nnz and (not np.isfinite(graph.data).all() or graph.data.min() < 0):
        raise ValueError("A prior gene graph needs finite, non-negative interaction scores.")
    graph = graph.tolil()
    graph.setdiag(0)
    graph = graph.tocsr()
    graph.eliminate_zeros()
    peak = graph.data.max() if graph.nnz else 1.0
    graph = graph / peak
    if diagonal == "one":
        graph = graph + sp.identity(graph.shape[0], dtype=np.float32, format="csr")
    return sp.coo_matrix(graph)


class GeneGraphSmoothing(nn.Module):
    """Per-cell gene graph by embedded dot product, optional prior graph, one GCN layer, residual sum.

    Each gene of a cell is a node with feature ``x_i = z_i * u_i + b_i``: its standardised expression
    ``z_i`` times a learned gene embedding ``u_i``, plus a learned offset. The individual graph is
    ``G_ij = softmax_j(theta(x_i)^T phi(x_j) / sqrt(d_k))``; the prior graph P is added to it, the GCN layer
    ``ReLU((G + P) X W)`` is summed with X, and a linear read-out returns one value per gene. The
    :doc:`gene-GCN page </methods/gene_gcn>` gives the equations and the memory this takes.

    Parameters
    ----------
    n_genes
        Number of genes (nodes).
    gene_dim
        d, the width of a gene's node feature.
    key_dim
        d_k, the width of theta and phi.
    prior
        Prior graph from `normalized_prior`, or None.
    """

    def __init__(
        self,
        n_genes: int,
        gene_dim: int = 8,
        key_dim: int = 8,
        prior: sp.coo_matrix | None = None,
    ):
        super().__init__()
        self.gene_embedding = nn.Parameter(torch.randn(n_genes, gene_dim) / math.sqrt(gene_dim))
        self.gene_offset = nn.Parameter(torch.zeros(n_genes, gene_dim))
        self.theta = nn.Linear(gene_dim, key_dim)
        self.phi = nn.Linear(gene_dim, key_dim)
        self.weight = nn.Linear(gene_dim, gene_dim, bias=False)
        self.readout = nn.Linear(gene_dim, 1)
        if prior is not None:
            indices = torch.as_tensor(np.vstack([prior.row, prior.col]), dtype=torch.long)
            values = torch.as_tensor(prior.data, dtype=torch.float32)
            # not in the state dict: the model stores the COO arrays itself (see Kratos.to_dict)
            self.register_buffer(
                "prior",
                torch.sparse_coo_tensor(
                    indices, values, (n_genes, n_genes), check_invariants=True
                ).coalesce(),
                persistent=False,
            )
        else:
            self.prior = None

    def gene_features(self, z: torch.Tensor) -> torch.Tensor:
        return z.unsqueeze(-1) * self.gene_embedding + self.gene_offset

    def learned_graph(self, z: torch.Tensor) -> torch.Tensor:
        """The individual graph G of each cell, cells x genes x genes (for inspection on few genes)."""
        x = self.gene_features(z)
        scores = self.theta(x) @ self.phi(x).transpose(-1, -2) / math.sqrt(self.theta.out_features)
        return torch.softmax(scores, dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.gene_features(z)
        query, key, value = self.theta(x), self.phi(x), self.weight(x)
        smoothed = _attention(query, key, value)
        if self.prior is not None:
            cells, genes, dim = value.shape
            # P (X W) for every cell at once: genes x (cells * dim)
            flat = value.permute(1, 0, 2).reshape(genes, cells * dim)
            smoothed = smoothed + torch.sparse.mm(self.prior, flat).reshape(genes, cells, dim).permute(
                1, 0, 2
            )
        return self.readout(x + F.relu(smoothed)).squeeze(-1)


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V per cell without holding a cells x genes x genes tensor."""
    if query.is_cuda:
        return F.scaled_dot_product_attention(query, key, value)
    blocks = query.split(ATTENTION_CHUNK, dim=1)
    if torch.is_grad_enabled():
        # recompute each block's scores in the backward pass instead of keeping them
        outputs = [
            checkpoint(F.scaled_dot_product_attention, q, key, value, use_reentrant=False) for q in blocks
        ]
    else:
        outputs = [F.scaled_dot_product_attention(q, key, value) for q in blocks]
    return torch.cat(outputs, dim=1)
