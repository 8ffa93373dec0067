"""CICL (cluster-aware iterative contrastive learning, sec. 2.2-2.3): a transformer over the cells of a
minibatch, K-means pseudo-labels recomputed at every step, instance-wise and cluster-aware contrastive losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from anndata import AnnData
from torch import nn

from .._utils import check_finite, get_matrix, row_blocks, stored_values
from ..train import adam, iter_minibatches, train_loop
from ._base import Model
from ._kmeans import kmeans, student_t
from ._reference import MAX_REFERENCE_CELLS

CPU = torch.device("cpu")
# the homogeneous coordinate appended to the principal components: this many times their RMS norm
HOMOGENEOUS_SCALE = 3.0
# output matrices of the attention and feed-forward branches start at this fraction of PyTorch's default
BRANCH_INIT_SCALE = 0.1
# inference attends every cell to all cells; query chunks keep the score matrix near this many elements (16 MB:
# small enough to stay in cache, which made inference on 4,271 cells 5x faster than blocks of 2**25)
_ATTENTION_ELEMENTS = 2**22


class CellSelfAttention(nn.Module):
    """Multi-head self-attention whose tokens are cells (eq. 3-4): the attention matrix is cells x cells.

    There is no positional encoding, so the output is equivariant to the order of the cells. Following the
    equations, the projections have no bias.
    """

    def __init__(self, n_genes: int, n_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.query = nn.Linear(n_genes, n_heads * head_dim, bias=False)
        self.key = nn.Linear(n_genes, n_heads * head_dim, bias=False)
        self.value = nn.Linear(n_genes, n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, n_genes, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # [views x] cells x (h d) -> [views x] h x cells x d: one "sequence" whose elements are the cells
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(-3, -2)

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) V per head, concatenated and mapped back to the width by W^O.

        A leading dimension (several views of one minibatch) is a batch of independent sequences: the
        cells of one view attend to the cells of the same view only.
        """
        queries, keys, values = self._heads(queries), self._heads(keys), self._heads(values)
        if torch.is_grad_enabled() or queries.device.type != "cpu":
            attended = F.scaled_dot_product_attention(queries, keys, values)
        else:
            # the same product written out: without autograd on the CPU it is faster than
            # scaled_dot_product_attention's kernel for heads this narrow (about 13 wide): 1.6x on a
            # 256-cell minibatch, 5x on inference blocks of 256 queries against 4,271 cells
            scores = (queries * self.head_dim**-0.5) @ keys.transpose(-2, -1)
            attended = scores.softmax(dim=-1) @ values
        return self.out(attended.transpose(-3, -2).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.query(x), self.key(x), self.value(x))


class CiclEncoderLayer(nn.Module):
    """One post-LN transformer layer: eq. 5 ``LN(X + MHA(X))``, eq. 6 ``ReLU(H W1) W2``, eq. 7 ``LN(H_fc + H_res)``."""

    def __init__(self, n_genes: int, n_heads: int, head_dim: int, feedforward_dim: int):
        super().__init__()
        self.attention = CellSelfAttention(n_genes, n_heads, head_dim)
        self.norm_attention = nn.LayerNorm(n_genes)
        self.feedforward = nn.Sequential(
            nn.Linear(n_genes, feedforward_dim, bias=False),
            nn.ReLU(),
            nn.Linear(feedforward_dim, n_genes, bias=False),
        )
        self.norm_feedforward = nn.LayerNorm(n_genes)

    def _after_attention(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        residual = self.norm_attention(x + attended)
        return self.norm_feedforward(self.feedforward(residual) + residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._after_attention(x, self.attention(x))

    def forward_against(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The layer for cells `x` attending to other cells, given as their projected keys and values."""
        return self._after_attention(x, self.attention.attend(self.attention.query(x), keys, values))

    def forward_in_chunks(self, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """The same layer with every cell of `x` attending to all of `x`, queries taken `chunk_size` at a time.

        Equal to ``forward(x)`` up to float rounding, with the score matrix never larger than chunk x cells.
        """
        keys, values = self.attention.key(x), self.attention.value(x)
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], chunk_size):
            out[start : start + chunk_size] = self.forward_against(
                x[start : start + chunk_size], keys, values
            )
        return out


class CiclNet(nn.Module):
    """Transformer encoder (input -> representation H of the same width) plus the projection head (eq. 10).

    The input is the z-scored genes (the paper), or, with `n_pcs`, their projection onto `n_pcs` fixed
    principal axes (`components`, genes x n_pcs, set from the training data and never trained) followed by
    one constant coordinate (`homogeneous`); the transformer and H are then ``n_pcs + 1`` wide. The constant
    keeps LayerNorm (eq. 5, 7), which centres and scales every cell over its own features, from discarding
    the cell's distance to the data centre: with the constant much larger than the scores, each cell's mean
    and spread over its features are nearly those of the constant, and LayerNorm acts almost linearly on
    the principal components.

    The output matrices of the attention (W^O) and feed-forward (W_2) branches start at `BRANCH_INIT_SCALE`
    of PyTorch's default scale, so that the untrained encoder stays close to its input (small-init residual
    branches); the equations are unchanged.

    Parameters
    ----------
    n_genes
        Genes of the input.
    n_layers, n_heads, head_dim, feedforward_dim
        Transformer layers, attention heads, their width (default width // heads) and the feed-forward
        width.
    projection_sizes
        Widths of the projection head (eq. 10).
    n_pcs
        Principal components of the input (then the width is ``n_pcs + 1``), or None (the genes).
    """

    def __init__(
        self,
        n_genes: int,
        n_layers: int = 4,
        n_heads: int = 4,
        head_dim: int | None = None,
        feedforward_dim: int = 1024,
        projection_sizes: Sequence[int] = (1024, 512),
        n_pcs: int | None = None,
    ):
        super().__init__()
        width = n_genes if n_pcs is None else n_pcs + 1
        self.width = width
        head_dim = max(1, width // n_heads) if head_dim is None else head_dim
        # per-gene z-scoring applied to each minibatch, so the stored input can stay sparse
        self.register_buffer("center", torch.zeros(n_genes))
        self.register_buffer("scale", torch.ones(n_genes))
        if n_pcs is not None:
            self.register_buffer("components", torch.eye(n_genes, n_pcs))
            self.register_buffer("homogeneous", torch.ones(()))
        else:
            self.components = self.homogeneous = None
        self.layers = nn.ModuleList(
            CiclEncoderLayer(width, n_heads, head_dim, feedforward_dim) for _ in range(n_layers)
        )
        with torch.no_grad():
            for layer in self.layers:
                layer.attention.out.weight.mul_(BRANCH_INIT_SCALE)
                layer.feedforward[2].weight.mul_(BRANCH_INIT_SCALE)
        head: list[nn.Module] = []
        for size in projection_sizes:
            head += [nn.Linear(width, size, bias=False), nn.ReLU()]
            width = size
        self.projection = nn.Sequential(*head[:-1])  # eq. 10: W3 ReLU(W4 H), no activation on the output

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer's input: z-scored genes, or their principal components and the constant."""
        x = (x - self.center) / self.scale
        if self.components is None:
            return x
        return torch.cat([x @ self.components, self.homogeneous.expand(x.shape[0], 1)], dim=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def encode_in_chunks(self, x: torch.Tensor, chunk_size: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer.forward_in_chunks(x, chunk_size)
        return x


def gaussian_view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sec. 2.2.1: add noise drawn from N(0, 1) and mapped linearly onto [0, 1] (min-max over the batch)."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    low, high = noise.min(), noise.max()
    return x + (noise - low) / (high - low).clamp_min(torch.finfo(x.dtype).eps)


def _similarities(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    # eq. 13: cosine similarity of every pair among the 2B projections, divided by T
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    return z @ z.T / temperature


def instance_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Eq. 12 and 14: InfoNCE with the other view of the same cell as the positive, all else as negatives."""
    n = z1.shape[0]
    logits = _similarities(z1, z2, temperature)
    self_pair = torch.eye(2 * n, dtype=torch.bool, device=z1.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z1.device)
    return F.cross_entropy(logits, partner)  # mean over the 2B anchors = 1/(2B) sum


def cluster_loss(
    z1: torch.Tensor, z2: torch.Tensor, pseudo_labels: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """Eq. 15 and 16: -log(sum over same-pseudo-label pairs / sum over other-label pairs), both views.

    The positives of an anchor are every other projection (either view) whose cell shares its pseudo-label,
    the other view of the anchor's own cell included; the negatives are all projections of other labels. An
    anchor with no negative (a batch holding one pseudo-label only) contributes zero.
    """
    n = z1.shape[0]
    logits = _similarities(z1, z2, temperature)
    labels = torch.cat([pseudo_labels, pseudo_labels])
    same = labels[:, None] == labels[None, :]
    self_pair = torch.eye(2 * n, dtype=torch.bool, device=z1.device)
    log_positive = torch.logsumexp(logits.masked_fill(~same | self_pair, float("-inf")), dim=1)
    log_negative = torch.logsumexp(logits.masked_fill(same, float("-inf")), dim=1)
    has_negative = (~same).any(dim=1)
    per_anchor = torch.where(has_negative, log_negative - log_positive, torch.zeros_like(log_positive))
    return per_anchor.sum() / (2 * n)


class Cicl(Model):
    """A CICL model: the network, the training step of Algorithm 1, and batch-independent inference.

    After `scext.tl.cicl` the model also holds the final K-means centres on H (`centers`) and a seeded
    sample of at most 5,000 training cells (`reference`, their transformer input: z-scored genes, or
    principal components and the constant coordinate). New cells
    (`transform`, `predict`, `scext.tl.cicl_predict`) attend to the reference cells at every layer, never
    to each other: a new cell's embedding then does not depend on which other new cells come with it, and
    a training set of at most 5,000 cells, applied again, gets back its training H. The sample costs
    ``cells x width x 4`` bytes (1 MB at 5,000 cells and 51 features) beside the weights and the principal
    axes (genes x n_pcs).

    Parameters
    ----------
    n_genes
        Genes the model reads; the width of the input and of H when `n_pcs` is None (the transformer keeps
        its width, eq. 3-7).
    n_clusters
        K of the per-step K-means (pseudo-labels) and of the final clustering.
    n_layers, n_heads, head_dim, feedforward_dim, projection_sizes
        Architecture (Table 2: 4 layers, feed-forward 1024 wide, projection head [1024, 512]). `head_dim`
        defaults to ``width // n_heads``.
    temperature, cluster_weight, student_t_dof
        T of eq. 12/15, lambda of eq. 17, and the Student-t degrees of freedom of eq. 8 (the paper's alpha).
    kmeans_iter
        Lloyd iterations of the per-step K-means (seeded afresh by k-means++ at every step).
    var_names, layer, use_raw
        The genes the model reads, in order, and where (as in `scext.tl.cicl`).
    size_factor_median
        When the input was log-normalised by the model (``preprocess=True`` in `scext.tl.cicl`): the median
        library size of the training cells, so that new cells are normalised exactly as they were.
    n_pcs
        Project the z-scored genes onto this many fixed principal axes (set by `set_projection`) and append
        one constant coordinate: the transformer and H are then ``n_pcs + 1`` wide. None: the genes.
    """

    name = "cicl"
    tool = "scext.tl.cicl"
    method = "CICL"

    def __init__(
        self,
        n_genes: int,
        n_clusters: int,
        *,
        n_layers: int = 4,
        n_heads: int = 4,
        head_dim: int | None = None,
        feedforward_dim: int = 1024,
        projection_sizes: Sequence[int] = (1024, 512),
        temperature: float = 0.5,
        cluster_weight: float = 0.1,
        student_t_dof: float = 1.0,
        kmeans_iter: int = 20,
        var_names: Sequence[str] | None = None,
        layer: str | None = None,
        use_raw: bool = False,
        size_factor_median: float | None = None,
        n_pcs: int | None = None,
    ):
        self.n_genes, self.n_clusters = int(n_genes), int(n_clusters)
        self.n_pcs = None if n_pcs is None else int(n_pcs)
        self.architecture = {
            "n_layers": int(n_layers),
            "n_heads": int(n_heads),
            "head_dim": None if head_dim is None else int(head_dim),
            "feedforward_dim": int(feedforward_dim),
            "projection_sizes": [int(size) for size in projection_sizes],
        }
        self.temperature, self.cluster_weight, self.student_t_dof = (
            float(temperature),
            float(cluster_weight),
            float(student_t_dof),
        )
        self.kmeans_iter = int(kmeans_iter)
        self.var_names = None if var_names is None else pd.Index([str(g) for g in var_names])
        if self.var_names is not None and len(self.var_names) != self.n_genes:
            raise ValueError(f"var_names has {len(self.var_names)} genes; the model reads n_genes={n_genes}.")
        self.layer, self.use_raw = layer, bool(use_raw)
        self.size_factor_median = None if size_factor_median is None else float(size_factor_median)
        self.net = CiclNet(
            n_genes, n_layers, n_heads, head_dim, feedforward_dim, projection_sizes, self.n_pcs
        )
        self.width = self.net.width
        self.last_pseudo_labels: torch.Tensor | None = None
        self.last_centers: torch.Tensor | None = None
        # set by scext.tl.cicl (or `set_clusters`): final centres on H and the reference cells' input
        self.centers: torch.Tensor | None = None
        self.reference: np.ndarray | None = None

    def training_step(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """One step of Algorithm 1 on minibatch `x`; returns the loss terms.

        Two views are drawn afresh, K-means runs on H of the clean minibatch (new k-means++ seeding, so the
        centres follow the encoder), and the pseudo-labels are the argmax of the Student-t q (eq. 8-9). The
        last pseudo-labels and centres are kept on the model for inspection.
        """
        net = self.net
        x = net.standardize(x)
        with torch.no_grad():
            h = net.encode(x)
            centers, _ = kmeans(h, self.n_clusters, max_iter=self.kmeans_iter, generator=generator)
            pseudo_labels = student_t(h, centers, self.student_t_dof).argmax(dim=1)
        # both views go through the encoder as one batch of two sequences (each view attends to itself)
        views = torch.stack([gaussian_view(x, generator), gaussian_view(x, generator)])
        z1, z2 = net.projection(net.encode(views)).unbind(0)
        instance = instance_loss(z1, z2, self.temperature)
        cluster = cluster_loss(z1, z2, pseudo_labels, self.temperature)
        self.last_pseudo_labels, self.last_centers = pseudo_labels, centers
        return {"loss": instance + self.cluster_weight * cluster, "instance": instance, "cluster": cluster}

    def fit(
        self,
        matrix,
        *,
        n_epochs: int = 100,
        lr: float = 1e-4,
        batch_size: int = 256,
        device: torch.device = CPU,
        generator: torch.Generator | None = None,
        step_generator: torch.Generator | None = None,
        progress_bar: bool | None = None,
    ) -> dict[str, list[float]]:
        """Train with Adam on eq. 17 over shuffled minibatches of `matrix` (cells x genes); returns the history.

        `generator` (CPU) draws the minibatch order; `step_generator` (on `device`) the noise and the K-means
        seeding. The cells are split into ``ceil(n / batch_size)`` minibatches of near-equal size, so that no
        small remainder batch holds fewer cells than clusters.
        """
        net = self.net.to(device)
        n_cells = matrix.shape[0]
        balanced = balanced_batch_size(n_cells, batch_size)
        # fused: one pass over all weights per step instead of a loop of small tensors (4x on the CPU)
        optimizer = adam(net.parameters(), lr, device)
        rows = np.arange(n_cells)
        return train_loop(
            net,
            optimizer,
            step=lambda batch: self.training_step(batch[0], step_generator),
            batches=lambda: iter_minibatches(
                matrix, rows, balanced, device, shuffle=True, generator=generator
            ),
            n_epochs=n_epochs,
            progress_bar=progress_bar,
            description="cicl",
        )

    def set_scaler(self, center: np.ndarray, scale: np.ndarray) -> None:
        """Per-gene centre and scale applied to every minibatch before the network (z-scoring)."""
        self.net.center.copy_(torch.as_tensor(center, dtype=torch.float32))
        self.net.scale.copy_(torch.as_tensor(scale, dtype=torch.float32))

    def set_projection(self, components: np.ndarray, homogeneous: float) -> None:
        """Principal axes (genes x n_pcs) the z-scored genes are projected onto, and the constant coordinate."""
        if self.net.components is None:
            raise ValueError("This CICL model reads the genes themselves (n_pcs=None); it has no projection.")
        self.net.components.copy_(torch.as_tensor(components, dtype=torch.float32))
        self.net.homogeneous.fill_(float(homogeneous))

    @torch.inference_mode()
    def embed(
        self,
        matrix,
        device: torch.device = CPU,
        chunk_size: int | None = None,
        *,
        reference_size: int | None = None,
        generator: np.random.Generator | None = None,
    ) -> torch.Tensor:
        """H of every cell of `matrix`, each cell attending to all cells of `matrix` (returned on `device`).

        This is the clustering phase of Algorithm 1 with the whole data set as one batch, computed layer by
        layer in chunks of query cells so memory stays O(chunk x cells). A cell's embedding therefore does
        not depend on how cells would be split into batches, nor on their order.

        With more cells than `reference_size`, exact attention (O(cells^2)) is replaced by attention to a
        reference set: `reference_size` cells drawn by `generator` attend among themselves, layer by layer,
        and every cell attends to the reference cells' keys and values at each layer. The cost is then
        O(cells x reference) and only one block of cells is dense at a time; the embedding still does not
        depend on any batch split.
        """
        net = self.net.to(device).eval()
        n_cells = matrix.shape[0]
        n_heads = net.layers[0].attention.n_heads if len(net.layers) else 1
        if reference_size is None or n_cells <= reference_size:
            if chunk_size is None:
                chunk_size = max(64, _ATTENTION_ELEMENTS // max(1, n_cells * n_heads))
            return net.encode_in_chunks(
                _standardized_rows(net, matrix, np.arange(n_cells), device), chunk_size
            )
        generator = np.random.default_rng(0) if generator is None else generator
        reference = np.sort(generator.choice(n_cells, size=reference_size, replace=False))
        return self._embed_against(
            _standardized_rows(net, matrix, reference, device), matrix, device, chunk_size
        )

    def _embed_against(self, hidden: torch.Tensor, matrix, device: torch.device, chunk_size: int | None):
        """H of every row of `matrix`, attending at each layer to the cells whose z-scored input is `hidden`."""
        net = self.net.to(device).eval()
        n_cells = matrix.shape[0]
        if chunk_size is None:
            n_heads = net.layers[0].attention.n_heads if len(net.layers) else 1
            chunk_size = max(64, _ATTENTION_ELEMENTS // max(1, hidden.shape[0] * n_heads))
        keys_values = []
        for layer in net.layers:
            keys_values.append((layer.attention.key(hidden), layer.attention.value(hidden)))
            hidden = layer.forward_in_chunks(hidden, chunk_size)
        out = torch.empty(n_cells, net.width, device=device)
        chunks = iter_minibatches(matrix, np.arange(n_cells), chunk_size, device)
        for start, (x,) in zip(range(0, n_cells, chunk_size), chunks, strict=True):
            hidden = net.standardize(x)
            for layer, (keys, values) in zip(net.layers, keys_values, strict=True):
                hidden = layer.forward_against(hidden, keys, values)
            out[start : start + len(hidden)] = hidden
        return out

    @torch.inference_mode()
    def cluster(
        self, h: torch.Tensor, *, n_init: int = 10, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final K-means on H (lowest inertia of `n_init` seedings; no label is read): labels, q, centres.

        The centres are kept (`centers`), so that `predict` places new cells into the same clusters.
        """
        centers, labels = kmeans(h, self.n_clusters, n_init=n_init, max_iter=300, generator=generator)
        self.centers = centers.detach().cpu()
        return labels, student_t(h, centers, self.student_t_dof), centers

    def keep_reference(self, data, rng: np.random.Generator, max_cells: int = MAX_REFERENCE_CELLS) -> None:
        """Keep the transformer input of all training cells, or of a seeded sample of `max_cells`."""
        n_cells = data.shape[0]
        rows = (
            np.arange(n_cells)
            if n_cells <= max_cells
            else np.sort(rng.choice(n_cells, max_cells, replace=False))
        )
        with torch.inference_mode():
            self.reference = _standardized_rows(self.net.to(CPU), data, rows, CPU).numpy()

    # ------------------------------------------------------------------ new cells
    def model_input(self, adata: AnnData):
        """The model's input for the cells of `adata`: its genes, log-normalised as in training when the
        model normalised its training data (size factor = the cell's total over all genes of the AnnData,
        divided by the training median). Raises before any work on NaN, negative values or empty cells."""
        if self.var_names is None:
            raise ValueError("This CICL model has no gene names; train it with scext.tl.cicl.")
        if adata.n_obs == 0:
            raise ValueError("adata has no cells.")
        aligned = self.aligned_matrix(adata)
        matrix, _ = get_matrix(adata, layer=self.layer, use_raw=self.use_raw, backed=True)
        source = "the input"
        check_finite(matrix, source)
        if self.size_factor_median is None:
            return aligned
        totals = np.zeros(matrix.shape[0])
        for rows, block in row_blocks(matrix):
            values = stored_values(block)
            if values.size and values.min() < 0:
                raise ValueError(
                    "The model log-normalises counts, but the input holds negative values; pass the count "
                    f"layer it was trained on (layer={self.layer!r})."
                )
            totals[rows] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        if (totals <= 0).any():
            raise ValueError(
                f"{int((totals <= 0).sum())} cell(s) have no counts, so they have no size factor; remove them "
                "first with sc.pp.filter_cells(adata, min_counts=1)."
            )
        values = aligned[np.arange(matrix.shape[0])]
        values = sp.csr_matrix(values, dtype=np.float32)
        values = sp.csr_matrix(sp.diags(self.size_factor_median / totals) @ values, dtype=np.float32)
        np.log1p(values.data, out=values.data)
        return values

    def transform(
        self, adata: AnnData, *, device: torch.device = CPU, chunk_size: int | None = None
    ) -> np.ndarray:
        """H of the cells of `adata`, each attending to the reference cells at every layer."""
        if self.reference is None:
            raise ValueError("This CICL model keeps no reference cells; train it with scext.tl.cicl.")
        data = self.model_input(adata)
        with torch.inference_mode():
            reference = torch.from_numpy(self.reference).to(device)
            return self._embed_against(reference, data, device, chunk_size).cpu().numpy()

    def embed_and_predict(
        self, adata: AnnData, *, device: torch.device = CPU, chunk_size: int | None = None
    ) -> tuple[np.ndarray, pd.Categorical, np.ndarray]:
        """H, clusters (nearest final centre, categories ``"0"`` ... ``"K-1"``) and Student-t q of `adata`."""
        if self.centers is None:
            raise ValueError("This CICL model has no clusters yet; train it with scext.tl.cicl.")
        h = self.transform(adata, device=device, chunk_size=chunk_size)
        proba = student_t(torch.from_numpy(h), self.centers, self.student_t_dof).numpy()
        labels = pd.Categorical.from_codes(
            proba.argmax(axis=1), categories=[str(k) for k in range(self.n_clusters)]
        )
        return h, labels, proba

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict:
        return {
            "n_genes": self.n_genes,
            "n_clusters": self.n_clusters,
            **self.architecture,
            "temperature": self.temperature,
            "cluster_weight": self.cluster_weight,
            "student_t_dof": self.student_t_dof,
            "kmeans_iter": self.kmeans_iter,
            "var_names": None if self.var_names is None else list(self.var_names),
            "layer": self.layer,
            "use_raw": self.use_raw,
            "size_factor_median": self.size_factor_median,
            "n_pcs": self.n_pcs,
        }

    def _arrays(self) -> dict[str, dict[str, np.ndarray]]:
        arrays = {"state_dict": self._state_arrays()}
        if self.centers is not None:
            arrays["clusters"] = {"centers": self.centers.numpy()}
        if self.reference is not None:
            arrays["reference"] = {"model_input": self.reference}
        return arrays

    @classmethod
    def _build_net(cls, config: dict, arrays: dict) -> nn.Module:
        return cls(**config).net

    @classmethod
    def _build(cls, config: dict, arrays: dict) -> Cicl:
        model = cls(**config)
        model._load_weights(arrays["state_dict"])
        if "clusters" in arrays:
            centers = np.asarray(arrays["clusters"]["centers"], dtype=np.float32)
            if centers.shape != (model.n_clusters, model.width):
                raise ValueError(
                    f"The stored CICL centres are {centers.shape}, not (n_clusters, {model.width})."
                )
            model.centers = torch.from_numpy(centers)
        if "reference" in arrays:
            stored = arrays["reference"]
            # files written before the principal-component input kept the reference cells before z-scoring
            raw = "model_input" not in stored
            reference = np.asarray(stored["input" if raw else "model_input"], dtype=np.float32)
            expected = model.n_genes if raw else model.width
            if reference.ndim != 2 or reference.shape[1] != expected:
                raise ValueError(
                    f"The stored CICL reference cells are {reference.shape}, not cells x {expected}."
                )
            if raw:
                with torch.inference_mode():
                    reference = model.net.standardize(torch.from_numpy(reference)).numpy()
            model.reference = reference
        return model


def _standardized_rows(net: CiclNet, matrix, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """The z-scored `rows` (sorted) of `matrix` on `device`, densified 4,096 rows at a time."""
    return torch.cat([net.standardize(x) for (x,) in iter_minibatches(matrix, rows, 4096, device)])


def balanced_batch_size(n_cells: int, batch_size: int) -> int:
    """Size of ``ceil(n_cells / batch_size)`` near-equal minibatches (the last one may be a little smaller)."""
    n_batches = -(-n_cells // batch_size)
    return -(-n_cells // n_batches)


def smallest_batch(n_cells: int, batch_size: int) -> int:
    """Cells in the smallest minibatch `Cicl.fit` makes; the per-step K-means needs at least K of them."""
    balanced = balanced_batch_size(n_cells, batch_size)
    return n_cells - (-(-n_cells // balanced) - 1) * balanced
