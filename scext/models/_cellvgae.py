"""CellVGAE (Buterez et al., Bioinformatics 2022): a variational graph autoencoder with graph
attention over a cell graph. `CellVGAENet` is the torch module (no AnnData inside); `CellVGAE` holds it with
its genes, scaler and reference cells, trains it and places new cells into its graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from anndata import AnnData
from torch import nn

from .._utils import ScaledColumns, column_min_max, resolve_device
from ..train import adam, dense_rows, train_loop
from ..train._loop import epochs_for_steps
from ._base import Model
from ._edges import edge_logits, sample_pairs
from ._reference import MAX_REFERENCE_CELLS, ReferenceCells, nearest_rows, vote

CONVOLUTIONS = ("gat", "gatv2", "gcn")
REGULARIZERS = ("kl", "mmd")
#: how new cells find their reference neighbours: the metric of the "knn" and "pknn" graphs
PLACEMENT_METRICS = ("euclidean", "correlation")
#: nearest reference cells (in mu) whose clusters vote for a new cell's cluster
VOTE_NEIGHBORS = 15
CPU = torch.device("cpu")
# optimizer steps of the default schedule: 50 full-graph epochs up to `batch_size` cells, as many steps in
# whole epochs of minibatches above (benchmarks/tables/cellvgae_minibatch.md)
DEFAULT_STEPS = 50
# as in torch-geometric's VGAE: exp(log sigma) stays finite in float32
MAX_LOG_STD = 10.0


def _convolution(kind: str, in_size: int, out_size: int, heads: int, concat: bool) -> nn.Module:
    from torch_geometric.nn import GATConv, GATv2Conv, GCNConv

    if kind == "gat":
        return GATConv(in_size, out_size, heads=heads, concat=concat)
    if kind == "gatv2":
        return GATv2Conv(in_size, out_size, heads=heads, concat=concat)
    return GCNConv(in_size, out_size)


class CellVGAENet(nn.Module):
    """CellVGAE's encoder (Buterez et al., Bioinformatics 2022, eq. 6-7) and optional feature decoder.

    Hidden graph layers concatenate their heads, with ReLU between layers; the mu and log-sigma layers are
    of the same type and average their heads. The edge decoder is the parameter-free inner product
    ``sigmoid(z_i . z_j)`` (eq. 2), so it lives in `edge_logits`.

    Parameters
    ----------
    n_features
        Node features (genes) per cell.
    conv
        ``"gat"``, ``"gatv2"`` or ``"gcn"`` (GCN has no heads; `n_heads` is ignored).
    hidden_sizes
        Encoder widths up to and including the embedding: the output size per head of each hidden layer (the
        layer's width is ``n_heads * size``), then the latent size (of mu and log-sigma).
    n_heads
        Attention heads of each hidden layer and then of the mu / log-sigma layers: one int for all, or one
        per entry of `hidden_sizes`.
    feature_decoder
        Add a dense decoder (hidden sizes reversed, ReLU) that reconstructs the features from z.
    """

    def __init__(
        self,
        n_features: int,
        *,
        conv: str = "gat",
        hidden_sizes: Sequence[int] = (128, 128, 50),
        n_heads: int | Sequence[int] = 3,
        feature_decoder: bool = False,
    ):
        super().__init__()
        if conv not in CONVOLUTIONS:
            raise ValueError(f"conv={conv!r} is unknown; choose one of {CONVOLUTIONS}.")
        sizes = [int(size) for size in hidden_sizes]
        if not sizes or min(sizes) < 1:
            raise ValueError(
                f"hidden_sizes={tuple(hidden_sizes)} must hold positive widths, the last one the latent size."
            )
        *hidden_sizes, latent_size = sizes
        n_layers = len(sizes)
        heads = (
            [int(n_heads)] * n_layers if isinstance(n_heads, (int, np.integer)) else [int(h) for h in n_heads]
        )
        if len(heads) != n_layers or min(heads) < 1:
            raise ValueError(
                f"n_heads={n_heads!r}: give one positive int, or one per entry of hidden_sizes ({n_layers}: the "
                "hidden layers, then the mu / log-sigma layers)."
            )
        if conv == "gcn":
            heads = [1] * len(heads)
        self.conv = conv
        self.n_heads = heads
        self.hidden = nn.ModuleList()
        size = n_features
        for width, layer_heads in zip(hidden_sizes, heads, strict=False):
            self.hidden.append(_convolution(conv, size, width, layer_heads, concat=True))
            size = width * layer_heads
        self.mu = _convolution(conv, size, latent_size, heads[-1], concat=False)
        self.log_std = _convolution(conv, size, latent_size, heads[-1], concat=False)
        self.decoder = None
        if feature_decoder:
            widths = [latent_size, *reversed(hidden_sizes)]
            layers: list[nn.Module] = []
            for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
                layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
            layers.append(nn.Linear(widths[-1], n_features))
            self.decoder = nn.Sequential(*layers)

    @property
    def graph_layers(self) -> list[nn.Module]:
        """Hidden layers then the mu layer: the layers whose attention `attention` can return (1-based)."""
        return [*self.hidden, self.mu]

    def encode(self, x: torch.Tensor, edge_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log standard deviation of q(z | X, A) for every node."""
        hidden = x
        for index, layer in enumerate(self.hidden):
            hidden = layer(hidden if index == 0 else F.relu(hidden), edge_index)
        hidden = F.relu(hidden)
        return self.mu(hidden, edge_index), self.log_std(hidden, edge_index).clamp(max=MAX_LOG_STD)

    @torch.no_grad()
    def infer(
        self,
        features: Callable[[np.ndarray], torch.Tensor],
        graph: sp.csr_matrix,
        chunks: Iterable[np.ndarray],
        *,
        attention_layer: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """mu of every cell and, optionally, a layer's attention, computed layer by layer over target chunks.

        Each graph layer runs for all cells before the next, one chunk of target cells at a time, on the
        chunk's one-hop neighbourhood (`halo_edges`): exact, as one full-graph pass, while only a chunk's
        edges x width messages exist at once. `features` returns the input rows of the given cells on the
        device; `graph` is the symmetric cells x cells adjacency; `chunks` cover every cell once.

        The attention of graph layer `attention_layer` (1-based over the hidden layers then mu) comes back
        as its edge index (row 0 = source j, row 1 = target i, with the self-loops GAT adds) and ``alpha``
        (edges x heads): the weight of j's message to i, summing to 1 over each target's edges (eq. 4).
        """
        from torch_geometric.nn import GCNConv

        from ..train._graph_batches import halo_edges

        layers = self.graph_layers
        if attention_layer is not None:
            if self.conv == "gcn":
                raise ValueError("GCN layers have no attention; train with conv='gat' or 'gatv2'.")
            if not 1 <= attention_layer <= len(layers):
                raise ValueError(
                    f"attention layer {attention_layer} does not exist; the encoder has {len(layers)} graph "
                    "layers."
                )
        chunks = [np.asarray(chunk, dtype=np.int64) for chunk in chunks]
        n_cells = graph.shape[0]
        halos = [halo_edges(graph, chunk) for chunk in chunks]
        # GCN normalises by whole-graph degrees (self-loop included), read once for every chunk and layer
        degrees = torch.from_numpy(np.diff(graph.indptr) + 1.0) if self.conv == "gcn" else None
        attention = None
        hidden = None
        for number, layer in enumerate(layers, start=1):
            output = None
            kept_edges, kept_alpha = [], []
            for chunk, (nodes, edges) in zip(chunks, halos, strict=True):
                source = (
                    features(nodes)
                    if hidden is None
                    else F.relu(hidden[torch.from_numpy(nodes).to(hidden.device)])
                )
                target = source[: len(chunk)]
                edges = edges.to(source.device)
                if isinstance(layer, GCNConv):
                    values = _gcn_bipartite(layer, source, edges, degrees[nodes], len(chunk))
                elif number == attention_layer:
                    values, (layer_edges, alpha) = layer(
                        (source, target), edges, return_attention_weights=True
                    )
                    global_nodes = torch.from_numpy(nodes).to(layer_edges.device)
                    kept_edges.append(global_nodes[layer_edges])
                    kept_alpha.append(alpha)
                else:
                    values = layer((source, target), edges)
                if output is None:
                    output = torch.empty((n_cells, values.shape[1]), dtype=values.dtype, device=values.device)
                output[torch.from_numpy(chunk).to(values.device)] = values
            if kept_edges:
                attention = (torch.cat(kept_edges, dim=1), torch.cat(kept_alpha))
            hidden = output
        return hidden, attention

    def gene_loadings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P_mu and P_sigma of eq. 12: genes x latent products of the layers' linear maps.

        The message weight of each layer is used (GAT's shared ``lin``, GATv2's source ``lin_l``, GCN's
        ``lin``); the output layers average their heads, so their per-head maps are averaged too.
        """
        product = None
        for layer in self.hidden:
            weight = _message_weight(layer)  # (heads * out, in)
            product = weight.T if product is None else product @ weight.T
        loadings = []
        for layer, n_heads in ((self.mu, self.n_heads[-1]), (self.log_std, self.n_heads[-1])):
            weight = _message_weight(layer)
            weight = weight.view(n_heads, -1, weight.shape[1]).mean(dim=0)  # (latent, in)
            loadings.append(weight.T if product is None else product @ weight.T)
        return loadings[0], loadings[1]


def _gcn_bipartite(
    layer: nn.Module, source: torch.Tensor, edges: torch.Tensor, degrees: torch.Tensor, n_targets: int
) -> torch.Tensor:
    """GCNConv (``D^-1/2 (A + I) D^-1/2 X W + b`` with degrees of the whole graph) for a chunk of targets.

    `degrees` are the whole graph's (self-loop included) for the chunk's nodes, in the order of `source`.
    torch-geometric's GCNConv takes no bipartite input and would normalise by the chunk's own degrees.
    """
    inverse_root = degrees.to(source.device, source.dtype).rsqrt()
    weights = inverse_root[edges[0]] * inverse_root[edges[1]]
    loops = torch.arange(n_targets, device=source.device)
    edges = torch.cat([edges, loops.expand(2, -1)], dim=1)
    weights = torch.cat([weights, inverse_root[:n_targets].pow(2)])
    projected = layer.lin(source)
    output = torch.zeros((n_targets, projected.shape[1]), dtype=projected.dtype, device=projected.device)
    output.index_add_(0, edges[1], projected[edges[0]] * weights[:, None])
    return output + layer.bias


def _message_weight(layer: nn.Module) -> torch.Tensor:
    linear = layer.lin_l if hasattr(layer, "lin_l") else layer.lin
    return linear.weight


def edge_reconstruction_loss(z: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Eq. 10: binary cross-entropy of real edges against as many randomly drawn pairs."""
    return -(F.logsigmoid(edge_logits(z, positive)).mean() + F.logsigmoid(-edge_logits(z, negative)).mean())


def kl_divergence(mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """KL(q(z|X,A) || N(0, I)) per node, averaged over nodes; `log_std` is log sigma, not log variance."""
    return -0.5 * torch.mean(torch.sum(1 + 2 * log_std - mu.pow(2) - torch.exp(2 * log_std), dim=1))


def mmd(z: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Maximum mean discrepancy between samples `z` and `prior` with a Gaussian kernel of width dim."""

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / a.shape[1])

    return kernel(z, z).mean() + kernel(prior, prior).mean() - 2 * kernel(z, prior).mean()


def regularizer_loss(
    kind: str, mu: torch.Tensor, log_std: torch.Tensor, z: torch.Tensor, max_samples: int = 2048
) -> torch.Tensor:
    """Eq. 9: KL (`"kl"`) or MMD (`"mmd"`, on at most `max_samples` random nodes, since it is quadratic)."""
    if kind == "kl":
        return kl_divergence(mu, log_std)
    if z.shape[0] > max_samples:
        z = z[torch.randperm(z.shape[0], device=z.device)[:max_samples]]
    return mmd(z, torch.randn_like(z))


def default_regularizer_weight(kind: str, n_cells: int) -> float:
    """The VGAE recipe's 1/N for the node-averaged KL; MMD is already of order one."""
    return 1.0 / n_cells if kind == "kl" else 1.0


def reparameterize(mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    return mu + torch.randn_like(mu) * torch.exp(log_std)


def loss_terms(
    net: CellVGAENet,
    x: torch.Tensor,
    edges: torch.Tensor,
    *,
    regularizer: str,
    regularizer_weight: float,
) -> dict[str, torch.Tensor]:
    """One full-graph evaluation of eq. 8 (plus eq. 11 with a feature decoder), term by term."""
    mu, log_std = net.encode(x, edges)
    z = reparameterize(mu, log_std)
    negative = sample_pairs(x.shape[0], edges.shape[1], x.device)
    terms = {
        "reconstruction": edge_reconstruction_loss(z, edges, negative),
        regularizer: regularizer_loss(regularizer, mu, log_std, z),
    }
    loss = terms["reconstruction"] + regularizer_weight * terms[regularizer]
    if net.decoder is not None:
        terms["feature_mse"] = F.mse_loss(net.decoder(z), x)
        loss = loss + terms["feature_mse"]
    return {"loss": loss, **terms}


def _dense_float32(block) -> np.ndarray:
    return np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float32)


class CellVGAETraining(NamedTuple):
    """What `CellVGAE.fit` returns besides the trained model."""

    history: dict[str, list[float]]
    #: mu of every training cell (exact whole-graph inference), cells x latent
    embedding: np.ndarray
    #: (edge index: row 0 source, row 1 target; alpha: edges x heads) of the chosen layer, or None
    attention: tuple[np.ndarray, np.ndarray] | None
    #: "full" or "minibatch"
    mode: str
    #: graph parts of Cluster-GCN training (1 for full-graph training)
    n_parts: int
    #: epochs trained
    n_epochs: int


class CellVGAE(Model):
    """A trained (or to-be-trained) CellVGAE with its genes, scaler, graph settings and reference cells.

    Usually built by `scext.tl.cellvgae`, which stores it in ``adata.uns[key]["model"]``; get it back with
    `CellVGAE.from_adata`, or `save` / `load` it to a folder (`scext.models.Model`). `transform` gives new
    cells' mu, `predict` their clusters (`scext.tl.cellvgae_predict` writes both into an AnnData).

    Placing new cells. A cell's mu depends on its graph neighbours, and a new cell has none in the training
    graph. The model therefore keeps reference cells (`scext.models._reference.ReferenceCells`): every
    training cell up to `max_reference_cells` (default 5,000), else a seeded sample of that many, with their
    model input (the min-max scaled feature genes) and the training graph's edges among them. A new cell is
    attached to its `n_neighbors` nearest reference cells (Euclidean, or Pearson correlation when the
    training graph was ``"pknn"``) in the feature genes as read, before scaling: the space in which the
    default graph joins training cells (the scaler is undone on the stored reference input). It is then
    scaled with the training scaler (values outside the training range are not clipped) and encoded as a
    receiver only: messages flow from reference cells to the new cell, never back. The reference cells' mu
    is thus the same whichever new cells are placed, and each new cell's mu is the same in any batch (to
    float rounding). Neighbours are searched in the feature genes whatever the training graph was built on,
    so with `graph_n_top_genes`, `graph_use_rep`, `neighbors_key` or a custom adjacency placement only
    approximates the training graph. When all training cells are kept, the reference graph is the training
    graph and the reference cells' mu equals the training embedding (to float rounding). `predict` gives
    each new cell the majority cluster of its 15 nearest reference cells in mu.

    On disk (and in ``adata.uns``) the reference costs ``cells x feature genes x 4`` bytes, plus 16 bytes
    per directed edge and 16 per cell (its row and cluster code): 40.8 MB at 5,000 cells x 2,000 genes on a
    5-NN graph, next to 4.1 MB of weights (the default architecture on 2,000 genes, 1.03 million float32
    parameters), 45 MB in all; the 192-cell x 60-gene test model takes 0.1 MB. Lower `max_reference_cells`
    (`scext.tl.cellvgae`) for smaller files, at the cost of a coarser placement.

    Parameters
    ----------
    var_names
        Feature genes the model reads, in order.
    layer, use_raw
        Where the model reads expression in an AnnData (as in `scext.tl.cellvgae`).
    conv, hidden_sizes, n_heads, feature_decoder
        The architecture (`CellVGAENet`): hidden_sizes are the encoder widths up to and including the
        latent size.
    n_neighbors
        Reference cells each new cell is attached to (the k of the training graph).
    metric
        ``"euclidean"`` or ``"correlation"`` (Pearson): how new cells find their reference neighbours.
    """

    name = "cellvgae"
    tool = "scext.tl.cellvgae"
    method = "CellVGAE"
    imports_before_meta = ("torch_geometric.nn",)

    def __init__(
        self,
        var_names: Sequence[str],
        *,
        layer: str | None = None,
        use_raw: bool = False,
        conv: str = "gat",
        hidden_sizes: Sequence[int] = (128, 128, 50),
        n_heads: int | Sequence[int] = 3,
        feature_decoder: bool = False,
        n_neighbors: int = 5,
        metric: str = "euclidean",
    ):
        if metric not in PLACEMENT_METRICS:
            raise ValueError(f"metric={metric!r} is unknown; choose one of {PLACEMENT_METRICS}.")
        if int(n_neighbors) < 1:
            raise ValueError(f"n_neighbors={n_neighbors} must be at least 1.")
        self.var_names = pd.Index([str(g) for g in var_names])
        self.layer = layer
        self.use_raw = bool(use_raw)
        self.conv = conv
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.feature_decoder = bool(feature_decoder)
        self.n_neighbors = int(n_neighbors)
        self.metric = metric
        self.net = CellVGAENet(
            len(self.var_names),
            conv=conv,
            hidden_sizes=self.hidden_sizes,
            n_heads=n_heads,
            feature_decoder=self.feature_decoder,
        )
        self.n_heads = tuple(self.net.n_heads)  # resolved: one per layer (1 for GCN)
        # set by fit (or load): the min-max scaler of the feature genes and the reference cells
        self.low: np.ndarray | None = None
        self.range: np.ndarray | None = None
        self.reference: ReferenceCells | None = None
        # set by set_clusters (or load) when the training cells were clustered
        self.categories: list[str] | None = None
        self.reference_codes: np.ndarray | None = None

    # ------------------------------------------------------------------ training
    def fit_scaler(self, matrix) -> None:
        """Min-max scaling of each feature gene over the training cells (as the paper), streamed in row blocks."""
        low, high = column_min_max(matrix)
        self.low, self.range = low, high - low

    def fit(
        self,
        matrix,
        graph: sp.csr_matrix,
        *,
        regularizer: str = "kl",
        regularizer_weight: float | None = None,
        n_epochs: int | None = None,
        lr: float = 1e-3,
        training: str = "auto",
        batch_size: int = 1024,
        attention_layer: int | None = None,
        max_reference_cells: int = MAX_REFERENCE_CELLS,
        device: torch.device = CPU,
        random_state: int = 0,
        generator: torch.Generator | None = None,
        rng: np.random.Generator | None = None,
        progress_bar: bool | None = None,
    ) -> CellVGAETraining:
        """Fit the scaler, train with Adam on eq. 8 (plus eq. 11 with a feature decoder), embed the training
        cells and keep the reference cells.

        `matrix` is the training cells x `var_names` (dense, CSR, or backed; scaled a minibatch at a time),
        `graph` the symmetric cells x cells adjacency. Training is full-graph or on Cluster-GCN minibatches
        (`scext.tl.cellvgae`, `training` and `batch_size`); ``n_epochs=None`` trains whole epochs of at least
        `DEFAULT_STEPS` optimizer steps. The weights and random pairs draw from torch's
        global generator (seed it, e.g. with `scext._utils.seed_everything`, before building the model), the
        minibatch order from `generator` and the reference sample from `rng` (both default to generators
        seeded with `random_state`, which also seeds the graph partition).
        """
        from .._utils._graph import edge_index
        from ..train._graph_batches import (
            batches_per_epoch,
            graph_partition,
            graph_training_mode,
            induced_edges,
            partition_batches,
            partition_plan,
        )

        n_cells = matrix.shape[0]
        if matrix.shape[1] != len(self.var_names):
            raise ValueError(
                f"matrix has {matrix.shape[1]} columns; the model reads {len(self.var_names)} genes."
            )
        if graph.shape != (n_cells, n_cells):
            raise ValueError(f"graph is {graph.shape[0]} x {graph.shape[1]}; matrix has {n_cells} cells.")
        if regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer={regularizer!r} is unknown; choose one of {REGULARIZERS}.")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1.")
        mode = graph_training_mode(training, n_cells, batch_size)
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(random_state))
        rng = np.random.default_rng(int(random_state)) if rng is None else rng

        # min-max scaling (as the paper) is applied a minibatch of rows at a time: a sparse input stays sparse
        self.fit_scaler(matrix)
        node_features = ScaledColumns(matrix, self.low, self.range)
        parts = parts_per_batch = None
        steps_per_epoch = 1
        if mode == "minibatch":
            n_parts, parts_per_batch = partition_plan(n_cells, batch_size)
            steps_per_epoch = batches_per_epoch(n_parts, parts_per_batch)
            parts = graph_partition(node_features, n_parts, random_state=random_state)
            x = None
        else:
            x = dense_rows(node_features, np.arange(n_cells), device)
            edges = edge_index(graph, device)
        net = self.net.to(device)
        weight = (
            default_regularizer_weight(regularizer, n_cells)
            if regularizer_weight is None
            else regularizer_weight
        )
        optimizer = adam(net.parameters(), lr, device)
        if n_epochs is None:
            n_epochs = epochs_for_steps(DEFAULT_STEPS, steps_per_epoch)

        def batches():
            if mode == "full":
                yield x, edges
                return
            for cells in partition_batches(parts, parts_per_batch, generator=generator):
                yield (
                    dense_rows(node_features, cells, device),
                    induced_edges(graph, cells).to(device),
                )

        history = train_loop(
            net,
            optimizer,
            step=lambda batch: loss_terms(
                net, batch[0], batch[1], regularizer=regularizer, regularizer_weight=weight
            ),
            batches=batches,
            n_epochs=n_epochs,
            progress_bar=progress_bar,
            description="CellVGAE",
        )
        net.eval()
        # inference is exact on the whole graph, layer by layer over chunks of cells (the training parts when
        # minibatched), so memory follows a chunk's edges, not the graph's
        chunks = (
            [np.arange(n_cells)]
            if mode == "full"
            else list(partition_batches(parts, parts_per_batch, shuffle=False))
        )
        mu, attention = net.infer(
            (lambda rows: x[torch.from_numpy(rows).to(device)])
            if mode == "full"
            else (lambda rows: dense_rows(node_features, rows, device)),
            graph,
            chunks,
            attention_layer=None if self.conv == "gcn" else attention_layer,
        )
        if attention is not None:
            attention = (attention[0].cpu().numpy(), attention[1].cpu().numpy())
        self.reference = ReferenceCells.sample(node_features, graph, max_reference_cells, rng)
        self.categories = self.reference_codes = None
        n_parts = int(len(np.unique(parts))) if parts is not None else 1
        return CellVGAETraining(history, mu.cpu().numpy(), attention, mode, n_parts, n_epochs)

    def set_clusters(self, labels) -> None:
        """Keep the clusters of the training cells (one label per training cell) for `predict`."""
        self._check_trained()
        labels = pd.Categorical(labels)
        codes = np.asarray(labels.codes)
        if codes.shape[0] <= int(self.reference.rows.max(initial=-1)):
            raise ValueError(f"labels has {codes.shape[0]} entries; give one per training cell.")
        codes = codes[self.reference.rows].astype(np.int64)
        if (codes < 0).any():
            raise ValueError("labels has missing values among the reference cells.")
        self.categories = [str(c) for c in labels.categories]
        self.reference_codes = codes

    # ------------------------------------------------------------------ inference
    def _check_trained(self) -> None:
        if self.low is None or self.reference is None:
            raise ValueError("This CellVGAE is not trained; call fit (or scext.tl.cellvgae) first.")

    def embed_reference_and_new(
        self, adata: AnnData, *, device: str | torch.device = CPU, chunk_size: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """mu of the reference cells and of the cells of `adata`, placed as the class docstring describes.

        Every check (genes, finite values, at least one cell) runs before any computation.
        """

        self._check_trained()
        if adata.n_obs == 0:
            raise ValueError("The AnnData has no cells; there is nothing for the CellVGAE model to embed.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be at least 1.")
        matrix = self.aligned_matrix(adata)  # raises on missing / duplicated genes, NaN or inf (get_matrix)
        device = resolve_device(device)
        reader = ScaledColumns(matrix, self.low, self.range)
        reference = self.reference
        n_reference, n_new = reference.n_cells, adata.n_obs
        # neighbours are searched in the feature genes as read, before min-max scaling: the space the default
        # "knn" / "pknn" graph is built on (scaling would weigh every gene alike, noise genes included)
        unscaled_reference = reference.features * reader.scale + reader.center
        neighbours = np.vstack(
            [
                nearest_rows(
                    unscaled_reference,
                    _dense_float32(matrix[start : start + chunk_size]),
                    self.n_neighbors,
                    self.metric,
                )
                for start in range(0, n_new, chunk_size)
            ]
        )
        graph = reference.placement_graph(neighbours)
        reference_features = torch.from_numpy(reference.features).to(device)
        width = len(self.var_names)

        def features(rows: np.ndarray) -> torch.Tensor:
            # rows of [reference cells; new cells]: the stored input, or the new cells scaled (read sorted)
            block = torch.empty((len(rows), width), dtype=torch.float32, device=device)
            is_new = rows >= n_reference
            old = np.flatnonzero(~is_new)
            if len(old):
                block[torch.from_numpy(old).to(device)] = reference_features[
                    torch.from_numpy(rows[old]).to(device)
                ]
            new = np.flatnonzero(is_new)
            if len(new):
                order = np.argsort(rows[new], kind="stable")
                values = dense_rows(reader, rows[new][order] - n_reference, device)
                block[torch.from_numpy(new[order]).to(device)] = values
            return block

        chunks = [
            *(
                np.arange(start, min(start + chunk_size, n_reference))
                for start in range(0, n_reference, chunk_size)
            ),
            *(
                np.arange(start, min(start + chunk_size, n_reference + n_new))
                for start in range(n_reference, n_reference + n_new, chunk_size)
            ),
        ]
        net = self.net.to(device).eval()
        mu, _ = net.infer(features, graph, chunks)
        mu = mu.cpu().numpy()
        return mu[:n_reference], mu[n_reference:]

    def transform(
        self, adata: AnnData, *, device: str | torch.device = CPU, chunk_size: int = 4096
    ) -> np.ndarray:
        """mu of every cell of `adata` (genes matched by name), placed among the reference cells.

        `chunk_size` new cells are searched and embedded at once; results do not depend on it beyond float
        rounding.
        """
        return self.embed_reference_and_new(adata, device=device, chunk_size=chunk_size)[1]

    def embed_and_predict(
        self,
        adata: AnnData,
        *,
        device: str | torch.device = CPU,
        chunk_size: int = 4096,
        vote_neighbors: int = VOTE_NEIGHBORS,
    ) -> tuple[np.ndarray, pd.Categorical, np.ndarray]:
        """mu, clusters and vote fractions of every cell of `adata` (see `transform` and `predict`)."""
        self._check_clustered()
        reference_mu, mu = self.embed_reference_and_new(adata, device=device, chunk_size=chunk_size)
        codes, fractions = vote(reference_mu, self.reference_codes, mu, vote_neighbors)
        proba = np.zeros((len(mu), len(self.categories)))
        proba[:, : fractions.shape[1]] = fractions
        return mu, pd.Categorical.from_codes(codes, categories=self.categories), proba

    def _check_clustered(self) -> None:
        self._check_trained()
        if self.categories is None:
            raise ValueError(
                "This CellVGAE model has no clusters (it was trained with cluster_method=None), so it cannot "
                "predict them; use model.transform for the embedding, or retrain with cluster_method='hdbscan' "
                "or 'leiden'."
            )

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict:
        return {
            "var_names": list(self.var_names),
            "layer": self.layer,
            "use_raw": self.use_raw,
            "conv": self.conv,
            "hidden_sizes": list(self.hidden_sizes),
            "n_heads": list(self.n_heads),
            "feature_decoder": self.feature_decoder,
            "n_neighbors": self.n_neighbors,
            "metric": self.metric,
            "categories": None if self.categories is None else list(self.categories),
        }

    def _arrays(self) -> dict[str, dict[str, np.ndarray]]:
        self._check_trained()
        arrays = {
            "state_dict": self._state_arrays(),
            "scaler": {"low": np.asarray(self.low), "range": np.asarray(self.range)},
            "reference": self.reference.to_arrays(),
        }
        if self.categories is not None:
            arrays["clusters"] = {"codes": np.asarray(self.reference_codes, dtype=np.int64)}
        return arrays

    @classmethod
    def _build_net(cls, config: dict, arrays: dict) -> nn.Module:
        return cls._build(config, arrays, weights=False).net

    @classmethod
    def _build(cls, config: dict, arrays: dict, weights: bool = True) -> CellVGAE:
        config = dict(config)
        categories = config.pop("categories", None)
        model = cls(**config)
        if not weights:
            return model
        n_features = len(model.var_names)
        for group in ("scaler", "reference"):
            if group not in arrays:
                raise ValueError(f"The stored CellVGAE model has no {group!r}; it cannot place new cells.")
        low = np.asarray(arrays["scaler"]["low"], dtype=np.float64)
        span = np.asarray(arrays["scaler"]["range"], dtype=np.float64)
        if low.shape != (n_features,) or span.shape != (n_features,):
            raise ValueError(f"The stored CellVGAE scaler does not hold one value per gene ({n_features}).")
        reference = ReferenceCells.from_arrays(arrays["reference"])
        if reference.features.shape[1] != n_features or len(reference.rows) != reference.n_cells:
            raise ValueError("The stored CellVGAE reference cells do not match the model's genes.")
        model.low, model.range, model.reference = low, span, reference
        if categories is not None:
            codes = np.asarray(arrays.get("clusters", {}).get("codes", []), dtype=np.int64)
            if (
                codes.shape != (reference.n_cells,)
                or codes.min(initial=0) < 0
                or codes.max(initial=0) >= len(categories)
            ):
                raise ValueError("The stored CellVGAE cluster codes do not match its reference cells.")
            model.categories, model.reference_codes = [str(c) for c in categories], codes
        model._load_weights(arrays["state_dict"])
        return model
