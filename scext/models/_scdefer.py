"""scDEFER (paper 004): fusion cell-topology encoder, TAGConv graph encoder, ZINB decoder, DEC-style clustering."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._edges import edge_logits, sample_pairs
from ._kmeans import student_t

# keep exp() of the ZINB heads finite in float32 (the DCA / scTAG clipping)
MEAN_RANGE = (1e-5, 1e6)
DISPERSION_RANGE = (1e-4, 1e4)
EPS = 1e-10


class ScdeferNet(nn.Module):
    """scDEFER's two fused encoders (eq. 1-6), heterogeneous fusion, ZINB decoder (eq. 7, 10-12), centres.

    Layer l of both encoders reads the same fused input ``Z^l = alpha H_D^(l-1) + (1 - alpha) H_G^(l-1)``
    (eq. 1, 4; ``Z^1`` is the expression itself): the fusion encoder applies a fully connected layer
    (eq. 2), the graph encoder a TAGConv layer over ``D^-1/2 A D^-1/2`` with `hops` powers (eq. 3, 5-6).
    Hidden layers use ReLU; the last (latent) layer of each encoder is linear, so no latent dimension can
    die at zero. The fusion of ``Z_D`` and ``Z_G`` follows DFCN's cross-modality fusion, which the paper
    cites: ``Z_I = (Z_D + Z_G) / 2``, local ``Z_L = Â Z_I`` with ``Â = D^-1/2 (A + I) D^-1/2``, global
    ``S Z_L`` with ``S = softmax(Z_L Z_L^T)`` row-wise (computed by scaled dot-product attention, which
    never holds the N x N matrix on kernels that support it), and ``Z = Z_L + beta S Z_L`` with a learnable
    ``beta`` starting at 0.

    Parameters
    ----------
    n_genes
        Genes modelled (input features and ZINB outputs).
    hidden_sizes
        Widths of the three encoder layers; the last is the latent size (the paper's 1024, 128, 24).
    decoder_sizes
        Hidden widths of the decoder from Z; the ZINB heads read the last (the mirror of the encoder).
    alpha
        Weight of the fully connected branch in the layer-wise fusion (eq. 4; the paper's 0.1).
    hops
        M, the largest power of the normalised adjacency in each TAGConv layer (eq. 3).
    n_clusters
        Number of learnable cluster centres (set them with `set_centers` before joint training).
    zinb
        Build the ZINB decoder; ``False`` is the paper's "without ZINB" ablation.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        hidden_sizes: Sequence[int] = (1024, 128, 24),
        decoder_sizes: Sequence[int] = (128, 1024),
        alpha: float = 0.1,
        hops: int = 3,
        n_clusters: int = 2,
        zinb: bool = True,
    ):
        super().__init__()
        from torch_geometric.nn import TAGConv

        hidden_sizes = [int(size) for size in hidden_sizes]
        if len(hidden_sizes) < 1:
            raise ValueError("hidden_sizes needs at least one layer (the latent one).")
        self.alpha = float(alpha)
        sizes = [n_genes, *hidden_sizes]
        self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.graph = nn.ModuleList(
            TAGConv(a, b, K=int(hops), normalize=False) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.beta = nn.Parameter(torch.zeros(()))
        self.centers = nn.Parameter(torch.zeros(int(n_clusters), hidden_sizes[-1]))
        self.decoder = None
        if zinb:
            widths = [hidden_sizes[-1], *[int(size) for size in decoder_sizes]]
            layers: list[nn.Module] = []
            for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
                layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
            self.decoder = nn.Sequential(*layers)
            self.pi = nn.Linear(widths[-1], n_genes)
            self.mean = nn.Linear(widths[-1], n_genes)
            self.dispersion = nn.Linear(widths[-1], n_genes)

    def encode(
        self, x: torch.Tensor, propagation: torch.Tensor, adjacency: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused Z, fully connected Z_D and graph Z_G of every cell of `x`.

        `propagation` is the sparse ``D^-1/2 A D^-1/2`` of the TAGConv layers and `adjacency` the sparse
        ``D^-1/2 (A + I) D^-1/2`` of the fusion step (both from `normalized_adjacency`), over the cells of
        `x`: the whole graph or a minibatch's subgraph, within which the global attention then runs.
        """
        fused = x
        last = len(self.dense) - 1
        for index, (dense, graph) in enumerate(zip(self.dense, self.graph, strict=True)):
            h_d, h_g = dense(fused), graph(fused, propagation)
            if index < last:
                h_d, h_g = F.relu(h_d), F.relu(h_g)
                fused = self.alpha * h_d + (1 - self.alpha) * h_g
        z_local = torch.sparse.mm(adjacency, (h_d + h_g) / 2)
        query = z_local.unsqueeze(0)
        z_global = F.scaled_dot_product_attention(query, query, query, scale=1.0).squeeze(0)
        return z_local + self.beta * z_global, h_d, h_g

    def decode(self, z: torch.Tensor, size_factors: torch.Tensor):
        """ZINB parameters (eq. 10-12): dropout pi, mean mu (times each cell's size factor), dispersion."""
        hidden = self.decoder(z)
        pi = torch.sigmoid(self.pi(hidden))
        mean = torch.exp(self.mean(hidden)).clamp(*MEAN_RANGE) * size_factors[:, None]
        theta = torch.exp(self.dispersion(hidden)).clamp(*DISPERSION_RANGE)
        return pi, mean, theta

    @torch.no_grad()
    def set_centers(self, centers: torch.Tensor) -> None:
        self.centers.copy_(centers)


def normalized_adjacency(edge_index: torch.Tensor, n_cells: int, *, self_loops: bool) -> torch.Tensor:
    """Sparse CSR ``D^-1/2 A D^-1/2`` (``A + I`` with `self_loops`), on the device of `edge_index`.

    Built once per fit: TAGConv then propagates by one sparse-dense product per hop instead of gathering
    an edges x features message tensor (about 10x faster on the CPU at 2,000 input genes).
    """
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    edges, weights = gcn_norm(edge_index, num_nodes=n_cells, add_self_loops=self_loops)
    matrix = torch.sparse_coo_tensor(edges, weights, (n_cells, n_cells), check_invariants=False)
    with warnings.catch_warnings():  # CSR is what torch-geometric's spmm expects; its "beta" notice is noise
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.coalesce().to_sparse_csr()


def zinb_nll(counts: torch.Tensor, pi: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Eq. 13-15: negative log-likelihood of the counts under ZINB(pi, mu, theta), mean over entries."""
    log_theta_mean = torch.log(theta + mean + EPS)
    # log NB(x | mu, theta)
    log_nb = (
        torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1)
        + theta * (torch.log(theta + EPS) - log_theta_mean)
        + counts * (torch.log(mean + EPS) - log_theta_mean)
    )
    zero_nb = torch.exp(theta * (torch.log(theta + EPS) - log_theta_mean))
    log_zero = torch.log(pi + (1 - pi) * zero_nb + EPS)
    log_nonzero = torch.log(1 - pi + EPS) + log_nb
    return -torch.where(counts < 0.5, log_zero, log_nonzero).mean()


def graph_reconstruction_loss(z: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Eq. 8-9: squared error of ``sigmoid(z_i . z_j)`` against A, on the edges and as many random pairs.

    The full ``||A - sigmoid(Z Z^T)||^2`` would need an N x N matrix and, with about k / N of its entries
    being edges, is dominated by non-edges; the edges and an equal number of uniformly drawn pairs (almost
    all non-edges) weigh both kinds equally and cost O(E).
    """
    negative = sample_pairs(z.shape[0], edges.shape[1], z.device)
    positive = torch.sigmoid(edge_logits(z, edges))
    random_pairs = torch.sigmoid(edge_logits(z, negative))
    return 0.5 * ((1 - positive).pow(2).mean() + random_pairs.pow(2).mean())


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """Eq. 17: P sharpens Q (squared, divided by soft cluster frequency, renormalised per cell)."""
    weight = q.pow(2) / q.sum(dim=0)
    return weight / weight.sum(dim=1, keepdim=True)


def soft_assignments(net: ScdeferNet, z: torch.Tensor, z_d: torch.Tensor, z_g: torch.Tensor):
    """Eq. 16 for Z, Z_D and Z_G against the shared centres (Student's t with one degree of freedom)."""
    return tuple(student_t(latent, net.centers) for latent in (z, z_d, z_g))


def soft_bce(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Eq. 19-20: binary cross-entropy of Q against the target P, mean over cells and clusters.

    Written out rather than `F.binary_cross_entropy`, which raises on NaN input: a diverged run should
    reach the caller's clear error about the learning rate.
    """
    return -(p * torch.log(q + EPS) + (1 - p) * torch.log(1 - q + EPS)).mean()


def kl_target(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Eq. 18: KL(P || Q), summed over clusters, mean over cells."""
    return F.kl_div(torch.log(q + EPS), p, reduction="batchmean")
