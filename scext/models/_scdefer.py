"""scDEFER (Cheng et al., AAAI 2024): fusion cell-topology encoder, TAGConv graph encoder, ZINB decoder, DEC-style clustering."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from anndata import AnnData
from torch import nn

from .._utils import (
    ScaledColumns,
    SelectedColumns,
    column_mean_var,
    matrix_source,
    resolve_device,
)
from .._utils._arguments import renamed_arguments
from .._utils._genes import check_counts
from .._utils._graph import edge_index, leiden_codes
from ..train import adam, train_loop
from ..train._graph_batches import CellGraph, batches_per_epoch, graph_partition, partition_plan
from ..train._loop import epochs_for_steps
from ._base import Model
from ._edges import edge_logits, sample_pairs
from ._kmeans import kmeans, student_t
from ._reference import MAX_REFERENCE_CELLS, ReferenceCells

# keep exp() of the ZINB heads finite in float32 (the DCA / scTAG clipping; `bounded_exp`)
MEAN_RANGE = (1e-5, 1e6)
DISPERSION_RANGE = (1e-4, 1e4)
EPS = 1e-10
#: scDEFER's two encoders: the fully connected "fusion cell topology" one and the TAGConv graph one
ENCODERS = ("dense", "graph")


def check_encoders(encoders: Sequence[str]) -> tuple[str, ...]:
    """`encoders` as a tuple in `ENCODERS` order; a clear error for an empty or unknown choice."""
    chosen = (encoders,) if isinstance(encoders, str) else tuple(encoders)
    if not chosen or not set(chosen) <= set(ENCODERS) or len(set(chosen)) != len(chosen):
        raise ValueError(f"encoders must name one or both of {ENCODERS}; got {encoders!r}.")
    return tuple(name for name in ENCODERS if name in chosen)


def bounded_exp(logits: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``exp(logits)`` clamped to [`low`, `high`], with the gradient of ``exp`` at the clamped value.

    The value is exactly the DCA / scTAG clipping ``exp(logits).clamp(low, high)`` (the logarithm is
    clamped first, so ``exp`` cannot overflow). A plain clamp passes no gradient where it binds, so a head
    whose output left the range could never be pulled back by the loss; this clamp is straight-through:
    the gradient with respect to `logits` is the output itself (``d exp(u) / du``), everywhere.
    """
    value = torch.exp(logits.detach().clamp(float(np.log(low)), float(np.log(high)))).clamp(low, high)
    return value + value * (logits - logits.detach())


class ScdeferNet(nn.Module):
    """scDEFER's two fused encoders (eq. 1-6), heterogeneous fusion, ZINB decoder (eq. 7, 10-12), centres.

    Layer l of both encoders reads the same fused input ``Z^l = a H_D^(l-1) + (1 - a) H_G^(l-1)``, with
    ``a`` = `fusion_weight` (the paper's alpha; eq. 1, 4; ``Z^1`` is the expression itself): the fusion
    encoder applies a fully connected layer (eq. 2), the graph encoder a TAGConv layer over
    ``D^-1/2 A D^-1/2`` with `hops` powers (eq. 3, 5-6).
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
        Widths of the three encoder layers; the last is the latent size (scext's 256, 64, 24; the
        paper's 1024, 128, 24).
    decoder_sizes
        Hidden widths of the decoder from Z; the ZINB heads read the last (the mirror of the encoder).
    fusion_weight
        Weight of the fully connected branch in the layer-wise fusion (eq. 4; the paper's alpha, 0.1).
        The old name ``alpha`` still works for one release, with a `FutureWarning`.
    hops
        M, the largest power of the normalised adjacency in each TAGConv layer (eq. 3).
    n_clusters
        Number of learnable cluster centres (set them with `set_centers` before joint training).
    zinb
        Build the ZINB decoder; ``False`` is the paper's "without ZINB" ablation.
    encoders
        The encoders built: ``("dense", "graph")``, or one of them alone, the paper's ablations "without the
        transcriptomics-based graph encoder" (``("dense",)``) and "without the fusion cell topology
        encoder" (``("graph",)``). With one encoder there is nothing to fuse: each layer reads the previous
        one, ``Z_D`` and ``Z_G`` are the same and only one cross-entropy term (eq. 19 or 20) is trained.
    """

    @renamed_arguments(alpha="fusion_weight")
    def __init__(
        self,
        n_genes: int,
        *,
        hidden_sizes: Sequence[int] = (256, 64, 24),
        decoder_sizes: Sequence[int] = (64, 256),
        fusion_weight: float = 0.1,
        hops: int = 3,
        n_clusters: int = 2,
        zinb: bool = True,
        encoders: Sequence[str] = ENCODERS,
    ):
        super().__init__()
        from torch_geometric.nn import TAGConv

        self.encoders = check_encoders(encoders)

        hidden_sizes = [int(size) for size in hidden_sizes]
        if len(hidden_sizes) < 1:
            raise ValueError("hidden_sizes needs at least one layer (the latent one).")
        self.fusion_weight = float(fusion_weight)
        sizes = [n_genes, *hidden_sizes]
        layers = list(zip(sizes[:-1], sizes[1:], strict=True))
        self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in layers) if "dense" in self.encoders else None
        self.graph = (
            nn.ModuleList(TAGConv(a, b, K=int(hops), normalize=False) for a, b in layers)
            if "graph" in self.encoders
            else None
        )
        self.beta = nn.Parameter(torch.zeros(()))
        # the length of the rows of Z that are clustered (`directions`); set to Z's mean norm after pretraining
        self.register_buffer("radius", torch.ones(()))
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
        self,
        x: torch.Tensor,
        propagation: torch.Tensor,
        adjacency: torch.Tensor,
        n_keys: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused Z, fully connected Z_D and graph Z_G of every cell of `x`.

        `propagation` is the sparse ``D^-1/2 A D^-1/2`` of the TAGConv layers and `adjacency` the sparse
        ``D^-1/2 (A + I) D^-1/2`` of the fusion step (both from `normalized_adjacency`), over the cells of
        `x`: the whole graph or a minibatch's subgraph, within which the global attention then runs.

        `n_keys`: only the first `n_keys` cells act as keys and values of the global attention (every cell
        still queries them). With reference cells first and new cells after them, the reference cells' Z
        then does not depend on the new cells, nor a new cell's Z on the other new cells. ``None`` (all
        cells, as in training) is the same computation as before this argument existed.
        """
        fused = x
        last = len(self.dense if self.dense is not None else self.graph) - 1
        for index in range(last + 1):
            h_d = self.dense[index](fused) if self.dense is not None else None
            h_g = self.graph[index](fused, propagation) if self.graph is not None else None
            if h_d is None:  # one encoder built: its output stands in for the other's
                h_d = h_g
            if h_g is None:
                h_g = h_d
            if index < last:
                h_d, h_g = F.relu(h_d), F.relu(h_g)
                fused = self.fusion_weight * h_d + (1 - self.fusion_weight) * h_g
        z_local = torch.sparse.mm(adjacency, (h_d + h_g) / 2)
        query = z_local.unsqueeze(0)
        keys = query if n_keys is None else query[:, : int(n_keys)]
        z_global = F.scaled_dot_product_attention(query, keys, keys, scale=1.0).squeeze(0)
        return z_local + self.beta * z_global, h_d, h_g

    def decode(self, z: torch.Tensor, size_factors: torch.Tensor):
        """ZINB parameters (eq. 10-12): dropout pi, mean mu (times each cell's size factor), dispersion.

        mu and theta are bounded to `MEAN_RANGE` and `DISPERSION_RANGE` by `bounded_exp`, which keeps
        their gradient where the bound binds.
        """
        hidden = self.decoder(z)
        pi = torch.sigmoid(self.pi(hidden))
        mean = bounded_exp(self.mean(hidden), *MEAN_RANGE) * size_factors[:, None]
        theta = bounded_exp(self.dispersion(hidden), *DISPERSION_RANGE)
        return pi, mean, theta

    def denoise(self, z: torch.Tensor, size_factors: torch.Tensor) -> torch.Tensor:
        """The ZINB mean ``(1 - pi) mu`` (with each cell's size factor): the expected count of each gene."""
        pi, mean, _ = self.decode(z, size_factors)
        return (1 - pi) * mean

    @torch.no_grad()
    def set_centers(self, centers: torch.Tensor) -> None:
        self.centers.copy_(centers)


def normalized_adjacency(edge_index: torch.Tensor, n_cells: int, *, self_loops: bool) -> torch.Tensor:
    """Sparse CSR ``D^-1/2 A D^-1/2`` (``A + I`` with `self_loops`), on the device of `edge_index`.

    Built once per fit: TAGConv then propagates by one sparse-dense product per hop instead of gathering
    an edges x features message tensor (about 10x faster on the CPU at 2,000 input genes).

    `edge_index` holds (receiving cell, sending cell) pairs: the COO of an adjacency A whose row i lists
    the cells that send to i, which is how both TAGConv and the fusion's ``torch.sparse.mm`` read the
    matrix (output row i sums over row i). D is the in-degree (row sums of A), counted where the messages
    arrive (gcn_norm's ``flow="target_to_source"`` on this layout), and the weight of j -> i is
    ``D_ii^-1/2 D_jj^-1/2``. For the symmetric training graphs this is exactly the symmetric
    normalisation. For new cells attached as receivers to reference cells (`Scdefer.transform`) no edge
    arrives at a reference cell from a new cell, so every reference cell keeps its training in-degree and
    every edge among reference cells its training weight.
    """
    from torch_geometric.nn.conv.gcn_conv import gcn_norm

    edges, weights = gcn_norm(
        edge_index, num_nodes=n_cells, add_self_loops=self_loops, flow="target_to_source"
    )
    matrix = torch.sparse_coo_tensor(edges, weights, (n_cells, n_cells), check_invariants=False)
    with warnings.catch_warnings():  # CSR is what torch-geometric's spmm expects; its "beta" notice is noise
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.coalesce().to_sparse_csr()


class _ZinbNll(torch.autograd.Function):
    """Eq. 13-15 with its gradient written out: a handful of passes over the cells x genes entries instead of
    the few dozen that autograd records, and ``lgamma`` / ``digamma`` only at the non-zero counts (about a
    tenth of the entries of scRNA-seq data), where the NB term needs them."""

    @staticmethod
    def forward(ctx, counts, pi, mean, theta):
        inverse_total = 1 / (theta + mean + EPS)
        log_ratio = torch.log(theta + EPS) + torch.log(inverse_total)  # log(theta / (theta + mu))
        zero_nb = torch.exp(theta * log_ratio)  # NB(0 | mu, theta)
        zero_likelihood = pi + (1 - pi) * zero_nb + EPS
        is_nonzero = counts >= 0.5
        nonzero = torch.nonzero(is_nonzero.reshape(-1)).squeeze(1)
        x, p, m, t = (values.reshape(-1)[nonzero] for values in (counts, pi, mean, theta))
        log_nb = (
            torch.lgamma(x + t)
            - torch.lgamma(t)
            - torch.lgamma(x + 1)
            + t * log_ratio.reshape(-1)[nonzero]
            + x * (torch.log(m + EPS) + torch.log(inverse_total.reshape(-1)[nonzero]))
        )
        log_zero = torch.log(zero_likelihood).masked_fill_(is_nonzero, 0)
        total = log_zero.sum() + (torch.log(1 - p + EPS) + log_nb).sum()
        ctx.save_for_backward(
            counts, pi, mean, theta, inverse_total, log_ratio, zero_nb, zero_likelihood, nonzero
        )
        return -total / counts.numel()

    @staticmethod
    def backward(ctx, grad_output):
        counts, pi, mean, theta, inverse_total, log_ratio, zero_nb, zero_likelihood, nonzero = (
            ctx.saved_tensors
        )
        scale = -grad_output / counts.numel()
        # zero counts: d log(pi + (1 - pi) z) with z = (theta / (theta + mu))^theta
        weight = (1 - pi) * zero_nb / zero_likelihood
        # d(theta * log_ratio) / d theta - log_ratio
        d_theta_log = theta / (theta + EPS) - theta * inverse_total
        grad_pi = (1 - zero_nb) / zero_likelihood
        grad_theta = weight * (log_ratio + d_theta_log)
        grad_mean = weight * (-theta * inverse_total)
        # non-zero counts: log(1 - pi) + log NB(x | mu, theta)
        x, p, m, t = (values.reshape(-1)[nonzero] for values in (counts, pi, mean, theta))
        r = inverse_total.reshape(-1)[nonzero]
        grad_pi.reshape(-1)[nonzero] = -1 / (1 - p + EPS)
        grad_theta.reshape(-1)[nonzero] = (
            torch.digamma(x + t)
            - torch.digamma(t)
            + log_ratio.reshape(-1)[nonzero]
            + t / (t + EPS)
            - t * r
            - x * r
        )
        grad_mean.reshape(-1)[nonzero] = -t * r + x * (1 / (m + EPS) - r)
        return None, grad_pi * scale, grad_mean * scale, grad_theta * scale


def zinb_nll(counts: torch.Tensor, pi: torch.Tensor, mean: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Eq. 13-15: negative log-likelihood of the counts under ZINB(pi, mu, theta), mean over entries.

    ``log NB(x | mu, theta) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    + theta log(theta / (theta + mu)) + x log(mu / (theta + mu))``; a zero count has likelihood
    ``pi + (1 - pi) NB(0 | mu, theta)``, a non-zero one ``(1 - pi) NB(x | mu, theta)``. The gradient
    with respect to `pi`, `mean` and `theta` is computed in closed form (`_ZinbNll`); `counts` gets none.
    """
    pi, mean, theta = (value.contiguous() for value in (pi, mean, theta))
    return _ZinbNll.apply(counts.contiguous(), pi, mean, theta)


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


def directions(z: torch.Tensor, radius: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Each row of `z` scaled to length `radius`: the space scDEFER clusters in.

    The graph decoder scores an edge by ``sigmoid(z_i . z_j)``, so training spreads Z along rays: a cell's
    norm grows with how confidently its edges are predicted, and cells of one type share a direction more
    than a location. Euclidean K-means and Student's t on Z itself then split long rays and merge short
    ones. `radius` is the mean norm of the pretrained Z (`ScdeferNet.radius`), which keeps the distances,
    and so the sharpness of Student's t, on the scale of Z.
    """
    return radius * F.normalize(z, dim=1)


def soft_assignments(net: ScdeferNet, z: torch.Tensor, z_d: torch.Tensor, z_g: torch.Tensor):
    """Eq. 16 for the directions of Z, Z_D and Z_G (`directions`) against the shared centres (Student's t,
    one degree of freedom)."""
    return tuple(student_t(directions(latent, net.radius), net.centers) for latent in (z, z_d, z_g))


def soft_bce(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Eq. 19-20: binary cross-entropy of Q against the target P, mean over cells and clusters.

    Written out rather than `F.binary_cross_entropy`, which raises on NaN input: a diverged run should
    reach the caller's clear error about the learning rate.
    """
    return -(p * torch.log(q + EPS) + (1 - p) * torch.log(1 - q + EPS)).mean()


def kl_target(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Eq. 18: KL(P || Q), summed over clusters, mean over cells."""
    return F.kl_div(torch.log(q + EPS), p, reduction="batchmean")


# ---------------------------------------------------------------------------------------------------------
# the model class: genes, preprocessing, network, reference cells; training and placement of new cells

CPU = torch.device("cpu")
#: the z-scored input is clipped to +-this (`sc.pp.scale`'s max_value)
MAX_SCALED = 10.0
CENTER_INITS = ("kmeans", "spectral")
# optimizer steps of the default schedule (pretraining, joint training at most): on minibatches the
# epochs are as many as these steps need, so a large data set is not trained longer for being large
# (benchmarks/tables/scdefer_schedule.md)
PRETRAIN_STEPS = 30
JOINT_STEPS = 100


def graph_operators(edges: torch.Tensor, n_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The TAGConv propagation ``D^-1/2 A D^-1/2`` and the fusion's ``D^-1/2 (A + I) D^-1/2`` of `edges`.

    `edges` are (receiver, sender) pairs (`normalized_adjacency`); this is the `graph_inputs` of the
    `scext.train._graph_batches.CellGraph` that scDEFER trains on.
    """
    return (
        normalized_adjacency(edges, n_cells, self_loops=False),
        normalized_adjacency(edges, n_cells, self_loops=True),
    )


class ScdeferTraining(NamedTuple):
    """What `Scdefer.fit` returns besides the trained model: history and the training cells' outputs."""

    history: dict[str, list[float]]
    embedding: np.ndarray
    proba: np.ndarray
    labels: pd.Categorical
    means: np.ndarray | None
    center_init: str
    n_parts: int
    n_pretrain_epochs: int
    n_epochs: int  # the most joint epochs (training may stop earlier)


class Scdefer(Model):
    """A trained (or to-be-trained) scDEFER model: genes, preprocessing, network with centres, reference cells.

    Usually built by `scext.tl.scdefer`, which stores it in ``adata.uns[key]["model"]``; get it back with
    `Scdefer.from_adata`, or `save` / `load` it to a folder (`scext.models.Model`). `transform` gives new
    cells' Z, `predict` their clusters (`scext.tl.scdefer_predict` writes both into an AnnData).

    New cells are preprocessed exactly as the training cells were: each cell's counts are scaled to the
    training normalisation target (`normalization_target`, the median total count of the training cells,
    which ``sc.pp.normalize_total`` used) by its own total over **all genes of the AnnData** (as in
    training, where the totals were taken before selecting the modelled genes), log1p-transformed,
    restricted to the modelled genes, z-scored with the training cells' per-gene mean and standard
    deviation and clipped at +-10. Extra genes of a new AnnData therefore enter each cell's total; give it
    the genes the training data had for totals on the same footing.

    Placing new cells. A cell's Z depends on its graph neighbours through the TAGConv layers and the local
    fusion, and on all cells of its graph through the global attention of the fusion. The model keeps
    reference cells (`scext.models._reference.ReferenceCells`): every training cell up to
    `max_reference_cells` (default 5,000), else a seeded sample of that many, with their model input (the
    scaled modelled genes) and the training graph's edges among them. A new cell is attached to its
    `n_neighbors` nearest reference cells (Euclidean, in that scaled input space; the training graph was
    built on its principal components, or on the log-normalised genes, or taken from ``neighbors_key``,
    so placement approximates it) as a receiver only: messages flow from reference cells to the new cell,
    never back, and in the global attention only the reference cells serve as keys and values. The reference cells' Z is thus the
    same whichever new cells are placed, and a new cell's Z does not depend on the other new cells. When
    every training cell is kept and training was full-graph, the reference cells' Z equals the training
    embedding (up to float rounding; after minibatch training the training Z came from batches of parts).
    `predict` assigns each new cell to its most probable centre (Q, eq. 16) among the clusters
    that training cells occupied.

    On disk (and in ``adata.uns``): the weights are 4 bytes per parameter. At the defaults (2,000 genes,
    encoder 256-64-24, decoder 64-256, 3 hops) that is about 4.2 million parameters, 17 MB, most of them
    in the first TAGConv layer (4 linear maps of genes x 256) and the three ZINB heads (256 x genes each).
    The reference adds ``cells x genes x 4`` bytes plus 16 bytes per directed edge and 8 per cell: about
    41 MB at 5,000 cells x 2,000 genes and k = 10, so about 58 MB in all. Lower `max_reference_cells`
    (`scext.tl.scdefer`) for smaller files, at the cost of a coarser placement.

    Parameters
    ----------
    var_names
        Modelled genes, in order.
    layer, use_raw
        Where the model reads counts in an AnnData (as in `scext.tl.scdefer`).
    hidden_sizes, decoder_sizes, fusion_weight, hops, n_clusters, zinb, encoders
        The architecture (`ScdeferNet`).
    n_neighbors
        Reference cells each new cell is attached to (the k of the training graph).
    normalization_target
        The total count every cell is scaled to before log1p (set by `scext.tl.scdefer`).
    categories
        The clusters the training cells occupy (``"0"`` ... ``"K-1"`` less the empty ones); set by `fit`.
    """

    name = "scdefer"
    tool = "scext.tl.scdefer"
    method = "scDEFER"
    imports_before_meta = ("torch_geometric.nn",)

    def __init__(
        self,
        var_names: Sequence[str],
        *,
        layer: str | None = None,
        use_raw: bool = False,
        hidden_sizes: Sequence[int] = (256, 64, 24),
        decoder_sizes: Sequence[int] = (64, 256),
        fusion_weight: float = 0.1,
        hops: int = 3,
        n_clusters: int = 2,
        zinb: bool = True,
        encoders: Sequence[str] = ENCODERS,
        n_neighbors: int = 10,
        normalization_target: float | None = None,
        categories: Sequence[str] | None = None,
    ):
        if int(n_neighbors) < 1:
            raise ValueError(f"n_neighbors={n_neighbors} must be at least 1.")
        self.var_names = pd.Index([str(g) for g in var_names])
        self.layer = layer
        self.use_raw = bool(use_raw)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.decoder_sizes = tuple(int(h) for h in decoder_sizes)
        self.fusion_weight = float(fusion_weight)
        self.hops = int(hops)
        self.n_clusters = int(n_clusters)
        self.zinb = bool(zinb)
        self.encoders = check_encoders(encoders)
        self.n_neighbors = int(n_neighbors)
        self.normalization_target = None if normalization_target is None else float(normalization_target)
        self.categories = None if categories is None else [str(c) for c in categories]
        self.net = ScdeferNet(
            len(self.var_names),
            hidden_sizes=self.hidden_sizes,
            decoder_sizes=self.decoder_sizes,
            fusion_weight=self.fusion_weight,
            hops=self.hops,
            n_clusters=self.n_clusters,
            zinb=self.zinb,
            encoders=self.encoders,
        )
        # set by fit_scaler / fit (or load): the per-gene z-score and the reference cells
        self.center: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.reference: ReferenceCells | None = None

    # ------------------------------------------------------------------ preprocessing
    def fit_scaler(self, log_expression) -> None:
        """Per-gene mean and standard deviation (ddof 1, as ``sc.pp.scale``) of the training cells'
        log-normalised modelled genes, streamed in row blocks; a constant gene gets scale 1."""
        mean, var = column_mean_var(log_expression, ddof=1)
        self.center = np.asarray(mean, dtype=np.float32)
        std = np.sqrt(var)
        self.scale = np.where(std > 0, std, 1.0).astype(np.float32)

    def scaled(self, log_expression) -> ScaledColumns:
        """The model input of log-normalised modelled genes, z-scored and clipped a block of rows at a time."""
        if self.center is None:
            raise ValueError("The scaler is not fitted; call fit_scaler (or scext.tl.scdefer) first.")
        return ScaledColumns(log_expression, self.center, self.scale, max_value=MAX_SCALED)

    def read_counts(self, adata: AnnData, *, allow_noninteger: bool = False):
        """The AnnData's counts over all its genes, and the positions of the model's genes among them.

        Every check on the input runs here, before any computation: the model's genes must all be present
        (`aligned_matrix`), values finite, non-negative and (unless `allow_noninteger`) whole, every cell
        must have counts, and there must be at least one cell.
        """
        self._check_trained()
        if adata.n_obs == 0:
            raise ValueError(
                f"The AnnData has no cells; there is nothing for the {self.method} model to embed."
            )
        aligned = self.aligned_matrix(adata)  # missing or duplicated genes, NaN or inf (get_matrix)
        if isinstance(aligned, SelectedColumns):
            matrix, columns = aligned.matrix, np.asarray(aligned.columns)
        else:
            matrix, columns = aligned, np.arange(aligned.shape[1])
        check_counts(
            matrix, matrix_source(self.layer, self.use_raw), "scdefer", allow_noninteger=allow_noninteger
        )
        return matrix, columns

    def input_rows(self, matrix, columns: np.ndarray, start: int, stop: int) -> np.ndarray:
        """The model input (float32, cells x modelled genes) of rows ``start:stop`` of a counts matrix.

        Normalised by each cell's total over all columns of `matrix` to `normalization_target`, log1p,
        restricted to `columns` (the modelled genes), z-scored and clipped as the training input was. Row
        by row the same operations as in training (``sc.pp.normalize_total`` and ``sc.pp.log1p`` on a
        float32 CSR copy), so a training cell's input is reproduced exactly.
        """
        import scanpy as sc

        block = matrix[start:stop]
        work = AnnData(sp.csr_matrix(block, dtype=np.float32, copy=True))
        sc.pp.normalize_total(work, target_sum=self.normalization_target)
        sc.pp.log1p(work)
        log_expression = work.X[:, columns]
        return self.scaled(log_expression)[np.arange(stop - start)]

    # ------------------------------------------------------------------ training
    def fit(
        self,
        log_expression,
        counts,
        size_factors: np.ndarray,
        graph: sp.csr_matrix,
        *,
        gammas: Sequence[float] = (0.3, 0.1, 0.5, 0.1),
        n_pretrain_epochs: int | None = None,
        n_epochs: int | None = None,
        pretrain_lr: float = 1e-3,
        lr: float = 1e-4,
        update_interval: int = 5,
        tol: float = 1e-3,
        center_init: str = "kmeans",
        denoised: bool = True,
        training: str = "full",
        batch_size: int = 1024,
        max_reference_cells: int = MAX_REFERENCE_CELLS,
        device: str | torch.device = CPU,
        generator: torch.Generator | None = None,
        random_state: int = 0,
        progress_bar: bool | None = None,
    ) -> ScdeferTraining:
        """Pretrain, start the centres, train jointly with target refreshes; keep the reference cells.

        Parameters
        ----------
        log_expression
            Training cells x modelled genes, log-normalised (CSR or dense); the scaler is fitted on it
            unless `fit_scaler` was called.
        counts
            Training cells x modelled genes of raw counts for the ZINB likelihood (None without ZINB).
        size_factors
            Each training cell's total count over the median total (float32).
        graph
            The symmetric training cell graph (CSR, no self-loops).
        center_init
            ``"kmeans"`` or ``"spectral"`` on the pretrained Z with ``n_clusters`` centres, or
            ``"leiden"``: K and centres from Leiden clusters of the pretrained Z.
        denoised
            Also return the ZINB means ``(1 - pi) mu`` of the training cells (with ZINB only).
        n_pretrain_epochs, n_epochs
            ``None``: whole epochs of at least `PRETRAIN_STEPS` and `JOINT_STEPS` optimizer steps.
        update_interval
            Optimizer steps between refreshes of the targets P (on minibatches at the first epoch start
            after that many steps, since P needs Q of every cell).
        training, batch_size
            ``"full"`` graph, or Cluster-GCN ``"minibatch"`` of about `batch_size` cells.
        generator
            Orders the minibatches (seeded by `scext.tl.scdefer` apart from the global stream, which draws
            the weights and the random pairs of the graph loss).

        The other arguments are those of `scext.tl.scdefer`. Returns the history and the training cells'
        Z, Q, clusters and (optionally) ZINB means ``(1 - pi) mu``; the model keeps the centres, the
        clusters the training cells occupy (`categories`) and the reference cells.
        """
        device = resolve_device(device)
        if center_init not in (*CENTER_INITS, "leiden"):
            raise ValueError(f"center_init={center_init!r} is unknown; choose 'kmeans' or 'spectral'.")
        g_graph, g_zinb, g_kl, g_bce = (float(g) for g in gammas)
        zinb = self.zinb
        n_cells = graph.shape[0]
        if self.center is None:
            self.fit_scaler(log_expression)
        features = self.scaled(log_expression)
        n_parts, parts_per_batch, parts = 1, 1, None
        if training == "minibatch":
            n_parts, parts_per_batch = partition_plan(n_cells, batch_size)
            parts = graph_partition(log_expression, n_parts, random_state=random_state)
        steps_per_epoch = batches_per_epoch(n_parts, parts_per_batch)
        if n_pretrain_epochs is None:
            n_pretrain_epochs = epochs_for_steps(PRETRAIN_STEPS, steps_per_epoch)
        if n_epochs is None:
            n_epochs = epochs_for_steps(JOINT_STEPS, steps_per_epoch)
        # whole: dense on the device; minibatches: a batch at a time (counts densified there too)
        cells = CellGraph(
            features,
            counts if zinb else None,
            size_factors,
            graph,
            device,
            parts=parts,
            parts_per_batch=parts_per_batch,
            generator=generator,
            graph_inputs=graph_operators,
        )
        del counts  # whole-graph training holds them dense on the device now
        net = self.net.to(device)

        def reconstruction(z: torch.Tensor, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            _, y, sf, (edges, _, _), _ = batch
            terms = {"graph": graph_reconstruction_loss(z, edges)}
            loss = g_graph * terms["graph"]
            if zinb:
                terms["zinb"] = zinb_nll(y, *net.decode(z, sf))
                loss = loss + g_zinb * terms["zinb"]
            return loss, terms

        def encode(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x, _, _, (_, propagation, adjacency), _ = batch
            return net.encode(x, propagation, adjacency)

        def pretrain_step(batch):
            loss, terms = reconstruction(encode(batch)[0], batch)
            return {"loss": loss, **terms}

        history = {}
        if n_pretrain_epochs:
            pretrained = train_loop(
                net,
                adam(net.parameters(), pretrain_lr, device),
                step=pretrain_step,
                batches=cells.training_batches,
                n_epochs=n_pretrain_epochs,
                progress_bar=progress_bar,
                description="scDEFER pretraining",
            )
            history.update({f"pretrain_{name}": values for name, values in pretrained.items()})
            _check_finite_history(pretrained, "pretraining", "pretrain_lr", pretrain_lr)

        (z,) = cells.map(lambda batch: encode(batch)[:1], device)
        net.radius.fill_(float(z.norm(dim=1).mean()))
        z = directions(z, net.radius)
        if center_init == "leiden":
            centers = _cluster_means(z, leiden_codes(z.cpu().numpy(), random_state=random_state))
            if centers.shape[0] < 2:
                raise ValueError(
                    "Leiden found a single cluster in the pretrained embedding; pass n_clusters."
                )
            net.centers = torch.nn.Parameter(centers.detach().clone())
        elif center_init == "spectral":
            centers = _cluster_means(z, _spectral_codes(z, self.n_clusters, random_state))
            net.set_centers(centers)
        else:
            kmeans_generator = torch.Generator(device=device)
            kmeans_generator.manual_seed(int(random_state))
            centers, _ = kmeans(z, self.n_clusters, n_init=10, generator=kmeans_generator)
            net.set_centers(centers)
        del z
        self.n_clusters = int(net.centers.shape[0])

        # "step": joint steps taken; "refreshed": the step of the last refresh of P
        targets: dict[str, object] = {"step": 0, "refreshed": None, "labels": None, "converged": False}
        history["assignment_change"] = []

        def refresh(q: torch.Tensor, q_d: torch.Tensor, q_g: torch.Tensor) -> None:
            """New targets P from Q of every cell; DEC's stopping rule compares the clusters with the last."""
            targets["p"] = tuple(target_distribution(t) for t in (q, q_d, q_g))
            labels = q.argmax(dim=1)
            if targets["labels"] is not None:
                change = float((labels != targets["labels"]).float().mean())
                history["assignment_change"].append(change)
                targets["converged"] = change < tol
            targets["labels"] = labels
            targets["refreshed"] = targets["step"]

        def joint_step(batch):
            z, z_d, z_g = encode(batch)
            q, q_d, q_g = soft_assignments(net, z, z_d, z_g)
            index = batch[-1]
            if index is None:  # the whole graph: this step's Q is every cell's, no extra pass needed
                if refresh_due():
                    refresh(q.detach(), q_d.detach(), q_g.detach())
                p, p_d, p_g = targets["p"]
            else:
                p, p_d, p_g = (t[index] for t in targets["p"])
            targets["step"] += 1
            loss, terms = reconstruction(z, batch)
            terms["kl"] = kl_target(q, p)
            # eq. 19-20, one cross-entropy per encoder built (with one, Q_D and Q_G are the same)
            if "dense" in self.encoders:
                terms["bce_d"] = soft_bce(q_d, p_d)
            if "graph" in self.encoders:
                terms["bce_g"] = soft_bce(q_g, p_g)
            cross_entropy = sum(terms[name] for name in ("bce_d", "bce_g") if name in terms)
            loss = loss + g_kl * terms["kl"] + g_bce * cross_entropy
            return {"loss": loss, **terms}

        def refresh_due() -> bool:
            return targets["refreshed"] is None or targets["step"] - targets["refreshed"] >= update_interval

        def joint_batches():
            # P divides by the soft cluster frequencies, which only Q of all cells gives: on minibatches
            # the refresh is an extra pass over all cells, at the start of an epoch
            if training == "minibatch" and refresh_due():
                refresh(*cells.map(lambda batch: soft_assignments(net, *encode(batch)), device))
            return cells.training_batches()

        if n_epochs:
            joint = train_loop(
                net,
                adam(net.parameters(), lr, device),
                step=joint_step,
                batches=joint_batches,
                n_epochs=n_epochs,
                converged=lambda: targets["converged"],
                progress_bar=progress_bar,
                description="scDEFER",
            )
            history.update(joint)
            _check_finite_history(joint, "joint training", "lr", lr)

        def outputs(batch):
            z, z_d, z_g = encode(batch)
            q = soft_assignments(net, z, z_d, z_g)[0]
            return (z, q, net.denoise(z, batch[2])) if zinb and denoised else (z, q)

        results = [value.numpy() for value in cells.map(outputs, CPU)]
        embedding, proba = results[:2]
        means = results[2] if len(results) > 2 else None
        labels = pd.Categorical.from_codes(
            proba.argmax(axis=1), categories=[str(k) for k in range(self.n_clusters)]
        ).remove_unused_categories()
        self.categories = [str(c) for c in labels.categories]
        self.reference = ReferenceCells.sample(
            features, graph, max_reference_cells, np.random.default_rng(random_state)
        )
        return ScdeferTraining(
            history, embedding, proba, labels, means, center_init, n_parts, n_pretrain_epochs, n_epochs
        )

    # ------------------------------------------------------------------ new cells
    def _check_trained(self) -> None:
        if (
            self.center is None
            or self.reference is None
            or self.normalization_target is None
            or self.categories is None
        ):
            raise ValueError("This Scdefer model is not trained; call scext.tl.scdefer (or fit) first.")

    def embed_counts(
        self, matrix, columns: np.ndarray, *, device: str | torch.device = CPU, chunk_size: int = 4096
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Z of the reference cells, and Z and Q of every row of a counts matrix (from `read_counts`).

        `chunk_size` new cells are placed among the reference cells and encoded at once (the reference
        cells are encoded with every chunk); results do not depend on it beyond float rounding.
        """
        self._check_trained()
        if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} must be a positive int.")
        device = resolve_device(device)
        net = self.net.to(device).eval()
        reference = self.reference
        n_reference, n_new = reference.n_cells, matrix.shape[0]
        reference_x = torch.from_numpy(reference.features).to(device)
        z_reference, z_new, q_new = None, [], []
        with torch.no_grad():
            for start in range(0, n_new, chunk_size):
                new = self.input_rows(matrix, columns, start, min(start + chunk_size, n_new))
                placement = reference.placement_graph(reference.neighbours(new, self.n_neighbors))
                x = torch.cat([reference_x, torch.from_numpy(new).to(device)])
                operators = graph_operators(edge_index(placement, device), x.shape[0])
                z = net.encode(x, *operators, n_keys=n_reference)[0]
                q = student_t(z[n_reference:], net.centers)
                if z_reference is None:
                    z_reference = z[:n_reference].cpu().numpy()
                z_new.append(z[n_reference:].cpu())
                q_new.append(q.cpu())
        return z_reference, torch.cat(z_new).numpy(), torch.cat(q_new).numpy()

    def embed_reference_and_new(
        self,
        adata: AnnData,
        *,
        device: str | torch.device = CPU,
        chunk_size: int = 4096,
        allow_noninteger: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Z of the reference cells and of the cells of `adata`, placed as the class docstring describes."""
        matrix, columns = self.read_counts(adata, allow_noninteger=allow_noninteger)
        z_reference, z, _ = self.embed_counts(matrix, columns, device=device, chunk_size=chunk_size)
        return z_reference, z

    def transform(
        self,
        adata: AnnData,
        *,
        device: str | torch.device = CPU,
        chunk_size: int = 4096,
        allow_noninteger: bool = False,
    ) -> np.ndarray:
        """Z of every cell of `adata` (raw counts; genes matched by name), placed among the reference cells.

        Each cell is normalised by its total count over all genes of `adata`, as in training (the class
        docstring). `allow_noninteger` accepts non-integer counts, as in `scext.tl.scdefer`.
        """
        return self.embed_reference_and_new(
            adata, device=device, chunk_size=chunk_size, allow_noninteger=allow_noninteger
        )[1]

    def labels(self, proba: np.ndarray) -> pd.Categorical:
        """Clusters from Q: the most probable centre among those training cells occupy (`categories`)."""
        self._check_trained()
        occupied = np.asarray([int(c) for c in self.categories])
        codes = np.asarray(proba)[:, occupied].argmax(axis=1)
        return pd.Categorical.from_codes(codes, categories=self.categories)

    def embed_and_predict(
        self,
        adata: AnnData,
        *,
        device: str | torch.device = CPU,
        chunk_size: int = 4096,
        allow_noninteger: bool = False,
    ) -> tuple[np.ndarray, pd.Categorical, np.ndarray]:
        """Z, clusters and Q of every cell of `adata` (see `transform` and `predict`)."""
        matrix, columns = self.read_counts(adata, allow_noninteger=allow_noninteger)
        _, z, proba = self.embed_counts(matrix, columns, device=device, chunk_size=chunk_size)
        return z, self.labels(proba), proba

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict:
        return {
            "var_names": list(self.var_names),
            "layer": self.layer,
            "use_raw": self.use_raw,
            "hidden_sizes": list(self.hidden_sizes),
            "decoder_sizes": list(self.decoder_sizes),
            "fusion_weight": self.fusion_weight,
            "hops": self.hops,
            "n_clusters": self.n_clusters,
            "zinb": self.zinb,
            "encoders": list(self.encoders),
            "n_neighbors": self.n_neighbors,
            "normalization_target": self.normalization_target,
            "categories": None if self.categories is None else list(self.categories),
        }

    def _arrays(self) -> dict[str, dict[str, np.ndarray]]:
        self._check_trained()
        return {
            "state_dict": self._state_arrays(),
            "scaler": {"center": np.asarray(self.center), "scale": np.asarray(self.scale)},
            "reference": self.reference.to_arrays(),
        }

    @classmethod
    def _build_net(cls, config: dict, arrays: dict) -> nn.Module:
        if "radius" not in arrays.get("state_dict", {}):
            raise ValueError(
                "the model predates clustering on the directions of Z (it has no 'radius'); train it again "
                "with this version of scext"
            )
        return ScdeferNet(
            len(config["var_names"]),
            hidden_sizes=config["hidden_sizes"],
            decoder_sizes=config["decoder_sizes"],
            fusion_weight=config["fusion_weight"],
            hops=config["hops"],
            n_clusters=config["n_clusters"],
            zinb=config["zinb"],
            encoders=config.get("encoders", ENCODERS),
        )

    @classmethod
    def _build(cls, config: dict, arrays: dict) -> Scdefer:
        for group in ("scaler", "reference"):
            if group not in arrays:
                raise ValueError(f"The stored Scdefer model has no {group!r}; it cannot place new cells.")
        # the weights are loaded next: build the module without memory, then give it storage uninitialised
        with torch.device("meta"):
            model = cls(**config)
        model.net = model.net.to_empty(device=CPU)
        n_genes = len(model.var_names)
        center = np.asarray(arrays["scaler"]["center"], dtype=np.float32)
        scale = np.asarray(arrays["scaler"]["scale"], dtype=np.float32)
        if center.shape != (n_genes,) or scale.shape != (n_genes,) or not (scale > 0).all():
            raise ValueError(
                f"The stored Scdefer scaler does not hold a positive scale per gene ({n_genes})."
            )
        reference = ReferenceCells.from_arrays(arrays["reference"])
        if reference.features.shape[1] != n_genes or len(reference.rows) != reference.n_cells:
            raise ValueError("The stored Scdefer reference cells do not match the model's genes.")
        target = model.normalization_target
        if target is None or not np.isfinite(target) or target <= 0:
            raise ValueError(f"The stored Scdefer normalization_target {target!r} is not a positive number.")
        categories = model.categories or []
        if not categories or any(not c.isdigit() or int(c) >= model.n_clusters for c in categories):
            raise ValueError(
                f"The stored Scdefer categories {categories} do not name its {model.n_clusters} centres."
            )
        model.center, model.scale, model.reference = center, scale, reference
        model._load_weights(arrays["state_dict"])
        return model


def _check_finite_history(history: dict, stage: str, argument: str, rate: float) -> None:
    if not np.isfinite(history["loss"]).all():
        raise FloatingPointError(
            f"scDEFER's {stage} diverged (non-finite loss at {argument}={rate:g}); lower {argument}. "
            "adata was not modified."
        )


def _spectral_codes(z: torch.Tensor, n_clusters: int, random_state: int) -> np.ndarray:
    """Spectral clustering of Z on its symmetrised 10-NN affinity (scikit-learn)."""
    from sklearn.cluster import SpectralClustering

    n_cells = z.shape[0]
    spectral = SpectralClustering(
        n_clusters,
        affinity="nearest_neighbors",
        n_neighbors=min(10, n_cells - 1),
        assign_labels="cluster_qr",
        random_state=random_state,
    )
    return spectral.fit_predict(z.cpu().numpy())


def _cluster_means(z: torch.Tensor, codes: np.ndarray) -> torch.Tensor:
    """Mean of Z over each cluster (codes 0 .. K-1; a cluster without cells keeps a zero centre)."""
    codes = torch.from_numpy(np.asarray(codes, dtype=np.int64)).to(z.device)
    n_clusters = int(codes.max()) + 1
    sums = torch.zeros(n_clusters, z.shape[1], device=z.device, dtype=z.dtype).index_add_(0, codes, z)
    sizes = torch.bincount(codes, minlength=n_clusters).clamp_min(1).to(z.dtype)
    return sums / sizes[:, None]
