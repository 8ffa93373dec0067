from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from ._edges import edge_logits, sample_pairs

CONVOLUTIONS = ("gat", "gatv2", "gcn")
REGULARIZERS = ("kl", "mmd")
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
    """CellVGAE's encoder (paper 003, eq. 6-7) and optional feature decoder (eq. 11).

    Hidden graph layers concatenate their heads, with ReLU between layers; the mu and log-sigma layers are
    of the same type and average their heads. The edge decoder is the parameter-free inner product
    ``sigmoid(z_i . z_j)`` (eq. 2), so it lives in `edge_logits`.

    Parameters
    ----------
    n_features
        Node features (genes) per cell.
    conv
        ``"gat"``, ``"gatv2"`` or ``"gcn"`` (GCN has no heads; `heads` is ignored).
    hidden_sizes
        Output size per head of each hidden layer; the layer's width is ``heads * size``.
    heads
        Attention heads of each hidden layer and then of the mu / log-sigma layers: one int for all, or one
        per hidden layer plus one for the output layers.
    feature_decoder
        Add a dense decoder (hidden sizes reversed, ReLU) that reconstructs the features from z.
    """

    def __init__(
        self,
        n_features: int,
        *,
        conv: str = "gat",
        hidden_sizes: Sequence[int] = (128, 128),
        heads: int | Sequence[int] = 3,
        latent_size: int = 50,
        feature_decoder: bool = False,
    ):
        super().__init__()
        if conv not in CONVOLUTIONS:
            raise ValueError(f"conv={conv!r} is unknown; choose one of {CONVOLUTIONS}.")
        hidden_sizes = [int(size) for size in hidden_sizes]
        heads = [int(heads)] * (len(hidden_sizes) + 1) if isinstance(heads, int) else [int(h) for h in heads]
        if len(heads) != len(hidden_sizes) + 1:
            raise ValueError(
                f"heads has {len(heads)} entries; give one int, or one per hidden layer plus one for the "
                f"mu / log-sigma layers ({len(hidden_sizes) + 1})."
            )
        if conv == "gcn":
            heads = [1] * len(heads)
        self.conv = conv
        self.heads = heads
        self.hidden = nn.ModuleList()
        size = n_features
        for width, n_heads in zip(hidden_sizes, heads, strict=False):
            self.hidden.append(_convolution(conv, size, width, n_heads, concat=True))
            size = width * n_heads
        self.mu = _convolution(conv, size, latent_size, heads[-1], concat=False)
        self.log_std = _convolution(conv, size, latent_size, heads[-1], concat=False)
        self.decoder = None
        if feature_decoder:
            sizes = [latent_size, *reversed(hidden_sizes)]
            layers: list[nn.Module] = []
            for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
                layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
            layers.append(nn.Linear(sizes[-1], n_features))
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
        for layer, n_heads in ((self.mu, self.heads[-1]), (self.log_std, self.heads[-1])):
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
