"""Gene-interaction feature smoothing before the classifier (paper 001, "Feature smoothing with GCN")."""

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
    """Prior global graph as the paper builds it: interaction scores divided by their maximum.

    ``diagonal="zero"`` makes genes attend to other genes only (the paper's better variant); ``"one"`` adds
    each gene's own feature at full weight.
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

    Each gene of a cell is a node with feature ``x_i = z_i * u_i + b_i`` in R^d: its standardised
    expression ``z_i`` times a learned gene embedding ``u_i``, plus a learned offset, so that genes have an
    identity the graph can learn. The individual graph is ``G_ij = softmax_j(theta(x_i)^T phi(x_j) / sqrt(d_k))``
    (rows sum to 1); the prior graph P (interaction scores / max) is added to it, as both are scaled to
    [0, 1]. The GCN layer is ``ReLU((G + P) X W)``, summed with X (residual), and a linear read-out returns
    one value per gene, so the classifier after it still sees genes.

    Memory: G is genes x genes per cell. On CUDA the attention runs in PyTorch's fused kernels, which never
    hold G; on the CPU query genes are processed in chunks of 256 under activation checkpointing, so a
    minibatch holds ``batch x 256 x genes`` scores (64 cells x 2,000 genes: 131 MB) at a time.
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
