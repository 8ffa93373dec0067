from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scanpy import logging as logg

from .. import __version__
from .._utils import (
    ScaledColumns,
    column_mean_var,
    dense_columns,
    get_matrix,
    is_integer_valued,
    matrix_source,
    resolve_device,
    seed_everything,
    stored_values,
)
from .._utils._graph import edge_index, knn_graph, neighbors_graph
from ..models._kmeans import kmeans
from ..models._scdefer import (
    ScdeferNet,
    graph_reconstruction_loss,
    kl_target,
    normalized_adjacency,
    soft_assignments,
    soft_bce,
    target_distribution,
    zinb_nll,
)
from ..train import dense_rows, train_loop
from ..train._graph_batches import (
    graph_partition,
    graph_training_mode,
    induced_edges,
    partition_batches,
    partition_plan,
)


def scdefer(
    adata: AnnData,
    n_clusters: int | None = None,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    allow_noninteger: bool = False,
    n_top_genes: int | None = 2000,
    neighbors_key: str | None = None,
    n_neighbors: int = 10,
    hidden_sizes: Sequence[int] = (1024, 128, 24),
    decoder_sizes: Sequence[int] = (128, 1024),
    alpha: float = 0.1,
    hops: int = 3,
    zinb: bool = True,
    denoised: bool = True,
    gammas: Sequence[float] = (0.3, 0.1, 0.5, 0.1),
    n_pretrain_epochs: int = 250,
    n_epochs: int = 250,
    pretrain_lr: float = 1e-4,
    lr: float = 1e-4,
    update_interval: int = 5,
    init: str = "kmeans",
    training: str = "auto",
    batch_size: int = 8192,
    device: str | torch.device = "auto",
    random_state: int = 0,
    progress_bar: bool | None = None,
    key_added: str = "scdefer",
    copy: bool = False,
) -> AnnData | None:
    """Cluster cells from raw counts with scDEFER, a fused autoencoder / graph encoder with a ZINB decoder.

    scDEFER (single-cell deep embedding fusion representation, paper 004) runs a fully connected encoder
    and a TAGConv graph encoder side by side over a kNN cell graph, feeding every layer of both the same
    mix ``alpha H_D + (1 - alpha) H_G`` of their previous outputs (eq. 1-6), fuses their latents into Z,
    and decodes Z into the parameters of a zero-inflated negative binomial (eq. 7-15). It is pretrained on
    the ZINB likelihood of the counts and on the reconstruction of the graph by ``sigmoid(Z Z^T)``; then
    K-means centres on Z start a joint training (eq. 21) that adds KL(P || Q) on Z and the cross-entropy of
    Q^D, Q^G on Z_D, Z_G against their sharpened targets (eq. 16-20). Clusters are the argmax of Q. No
    label is ever read.

    Training is full-graph (one step per epoch) while the graph fits, with the cells x modelled genes
    matrices (scaled input, counts) dense on the device. Beyond that (see `training`) it takes Cluster-GCN
    minibatches: K-means cuts the cells, in the log-normalised space of the modelled genes that the graph
    is built on, into parts of about ``batch_size / 4`` cells, and each step trains on 4 random parts
    joined, with the edges among them renormalised. This approximates the full graph: edges to cells
    outside the batch (the few between parts not drawn together) are dropped for that step, and the
    global attention of the fusion and the random pairs of the graph loss stay within the batch. The
    targets P are refreshed from Q of all cells (an inference pass); initial centres and outputs come
    from passes over the parts, 4 at a time in a fixed order. The device then holds the model and one
    batch (about ``batch_size`` x genes inputs and activations, an attention of batch_size^2 at worst)
    besides the edge list; the host keeps the log-normalised input and the counts sparse when given sparse,
    and z-scores a batch of rows at a time.

    Deviations from the paper, with reasons: the joint-training learning rate is `lr` (1e-4), not 1e-7,
    at which the loss terms barely move in 250 full-graph steps (its public code uses 1e-8); pretraining
    uses 1e-4, not 5e-5, because with one full-graph step per epoch the ZINB loss is still falling after
    250 steps at 5e-5. The graph loss (eq. 9) is the squared error on the edges and as many random pairs,
    not on the N x N matrix. Latent layers are linear; the decoder's last hidden layer (1024) feeds the
    ZINB heads directly. The Z_D / Z_G fusion follows DFCN, which the paper cites without equations.

    Parameters
    ----------
    adata
        Cells x genes of raw counts (non-negative integers).
    n_clusters
        K. ``None`` takes the number of Leiden clusters (resolution 1, unweighted 15-NN graph) of the
        pretrained Z and starts the centres at their means, instead of K-means.
    layer, use_raw
        Read counts from ``adata.layers[layer]`` or ``adata.raw`` instead of ``adata.X``.
    allow_noninteger
        Proceed on non-integer values that you know to be counts on the count scale (e.g. ambient-RNA
        corrected); the ZINB likelihood is then evaluated at non-integer points. Negative values are never
        accepted.
    n_top_genes
        Genes modelled: this many highly variable genes (Scanpy's ``seurat`` flavour on a normalised,
        log1p copy); ``None`` or at least the number of genes models all.
    neighbors_key
        Use the edges of an existing ``sc.pp.neighbors`` graph instead of building a kNN graph on the
        log-normalised expression of the modelled genes.
    n_neighbors
        k of the graph built here (the paper's 10).
    hidden_sizes, decoder_sizes
        Encoder widths (last = latent; the paper's 1024, 128, 24) and decoder hidden widths from Z.
    alpha
        Layer-wise fusion weight of the fully connected branch (eq. 4; the paper's 0.1).
    hops
        M, powers of the normalised adjacency in each TAGConv layer (eq. 3); the paper gives no value, 3 is
        torch-geometric's default.
    zinb
        ``False`` drops the ZINB decoder and its loss (the paper's "without ZINB" ablation); no denoised
        layer is written then.
    denoised
        Write the ZINB means as ``layers["<key_added>_denoised"]``: a dense cells x genes float32 array
        (8 GB at a million cells x 2,000 genes), so turn it off for large data.
    gammas
        Weights of the graph, ZINB, KL and cross-entropy terms (eq. 21; the paper's 0.3, 0.1, 0.5, 0.1). The
        first two also weigh pretraining.
    n_pretrain_epochs, n_epochs
        Epochs of pretraining and of joint training (the paper's 250 each): one Adam step on the full
        graph, or one per minibatch.
    pretrain_lr, lr
        Learning rates of the two stages.
    update_interval
        Recompute the target distributions P, P^D, P^G from the current Q every this many epochs.
    init
        How the K centres start on the pretrained Z (the paper's "K-means (or spectral)"): ``"kmeans"``
        (10 k-means++ seedings, lowest inertia) or ``"spectral"`` (scikit-learn's spectral clustering on a
        10-NN affinity of Z; centres are its clusters' means). Ignored when `n_clusters` is None.
    training
        ``"full"`` graph, Cluster-GCN ``"minibatch"``, or ``"auto"``: full up to 50,000 cells.
    batch_size
        Cells per minibatch, approximately (parts vary in size). At least the number of cells gives one
        batch of all cells, which trains exactly as ``"full"`` does.
    device, random_state, progress_bar
        As everywhere in scext. On the CPU the same `random_state` gives the same numbers; on CUDA the
        scatter operations of the graph layers are not bit-reproducible.
    key_added, copy
        Prefix of every slot written; return a copy instead of writing to `adata`.

    Returns
    -------
    `None`, or the copy when ``copy=True``. Writes:

    ``obsm["X_<key_added>"]``
        Fused embedding Z (cells x latent size).
    ``obs["<key_added>"]``
        Clusters, argmax of Q (categorical; categories ``"0"`` ... name the columns of the proba matrix;
        clusters left empty are dropped from the categories).
    ``obsm["<key_added>_proba"]``
        Q (eq. 16): soft assignment of every cell to each of the K centres.
    ``layers["<key_added>_denoised"]``
        ZINB mean mu of every modelled gene, on each cell's count scale (size factor included); NaN for
        genes not modelled. Not written with ``zinb=False`` or ``denoised=False``.
    ``var["<key_added>_modelled"]``
        Whether a gene was modelled (a highly variable gene).
    ``uns[key_added]``
        ``params`` (every argument, resolved device and training mode, scext version, n_genes, n_edges,
        n_parts, init method),
        ``history`` (per epoch: ``pretrain_loss``, ``pretrain_graph``, ``pretrain_zinb``, then ``loss``,
        ``graph``, ``zinb``, ``kl``, ``bce_d``, ``bce_g`` of joint training), ``n_clusters``, ``beta`` (the
        learned weight of the global fusion term).
    """
    start = logg.info("training scDEFER")
    torch_device = resolve_device(device)
    gammas = _check_arguments(
        n_clusters,
        alpha,
        gammas,
        zinb,
        n_pretrain_epochs,
        n_epochs,
        pretrain_lr,
        lr,
        update_interval,
        hops,
        init,
    )
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    matrix, var_names = get_matrix(adata, layer=layer, use_raw=use_raw)
    source = matrix_source(layer, use_raw)
    n_cells, n_genes = matrix.shape
    mode = graph_training_mode(training, n_cells)
    _check_counts(matrix, source, allow_noninteger)
    if n_clusters is not None and n_clusters >= n_cells:
        raise ValueError(f"n_clusters={n_clusters} must be below the number of cells ({n_cells}).")
    if neighbors_key is None and not 1 <= n_neighbors < n_cells:
        raise ValueError(
            f"n_neighbors={n_neighbors} needs at least {n_neighbors + 1} cells; adata has {n_cells}. "
            "Lower n_neighbors."
        )
    if n_top_genes is not None and (
        not isinstance(n_top_genes, (int, np.integer)) or isinstance(n_top_genes, bool) or n_top_genes < 2
    ):
        raise ValueError(
            f"n_top_genes must be an int of at least 2, or None for all genes; got {n_top_genes!r}."
        )
    cell_graph = neighbors_graph(adata, neighbors_key) if neighbors_key is not None else None

    import scanpy as sc

    totals = np.asarray(matrix.sum(axis=1)).ravel()
    size_factors = (totals / np.median(totals)).astype(np.float32)
    work = AnnData(sp.csr_matrix(matrix, dtype=np.float32, copy=True))
    sc.pp.normalize_total(work)
    sc.pp.log1p(work)
    if n_top_genes is None or n_top_genes >= n_genes:
        genes = np.arange(n_genes)
    else:
        variable = sc.pp.highly_variable_genes(work, n_top_genes=n_top_genes, flavor="seurat", inplace=False)
        genes = np.flatnonzero(variable["highly_variable"].to_numpy(bool))
    # kept sparse: the z-scoring (sc.pp.scale's, clipped at 10) is applied a minibatch of rows at a time
    log_expression = work.X if len(genes) == n_genes else work.X[:, genes]
    del work
    if cell_graph is None:
        cell_graph = knn_graph(
            dense_columns(log_expression, np.arange(len(genes))), n_neighbors, random_state=random_state
        )
        graph_source = f"{n_neighbors}-NN graph of the log-normalised modelled genes"
    else:
        graph_source = f"sc.pp.neighbors graph {neighbors_key!r}"
    mean, var = column_mean_var(log_expression, ddof=1)
    features = ScaledColumns(log_expression, mean, np.sqrt(var), max_value=10)
    n_parts, parts_per_batch, parts = 1, 1, None
    if mode == "minibatch":
        n_parts, parts_per_batch = partition_plan(n_cells, batch_size)
        parts = graph_partition(log_expression, n_parts, random_state=random_state)
    counts = None
    if zinb:  # densified by _CellGraph: whole for full-graph training, else a minibatch at a time
        counts = matrix if len(genes) == n_genes else matrix[:, genes]

    # the minibatch order has its own generator: the global stream (weights, random pairs) then draws the
    # same numbers in both modes, and one batch of all cells reproduces full-graph training
    _, order_generator = seed_everything(random_state)
    cells = _CellGraph(
        features,
        counts,
        size_factors,
        cell_graph,
        torch_device,
        parts=parts,
        parts_per_batch=parts_per_batch,
        generator=order_generator,
    )
    del features, counts
    net = ScdeferNet(
        len(genes),
        hidden_sizes=hidden_sizes,
        decoder_sizes=decoder_sizes,
        alpha=alpha,
        hops=hops,
        n_clusters=n_clusters or 1,
        zinb=zinb,
    ).to(torch_device)
    g_graph, g_zinb, g_kl, g_bce = gammas

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
            torch.optim.Adam(net.parameters(), lr=pretrain_lr),
            step=pretrain_step,
            batches=cells.training_batches,
            n_epochs=n_pretrain_epochs,
            progress_bar=progress_bar,
            description="scDEFER pretraining",
        )
        history.update({f"pretrain_{name}": values for name, values in pretrained.items()})
        _check_finite_history(pretrained, "pretraining", "pretrain_lr", pretrain_lr)

    (z,) = cells.map(lambda batch: encode(batch)[:1], torch_device)
    if n_clusters is None:
        init = "leiden"
        centers = _cluster_means(z, _leiden_codes(z, random_state))
        n_clusters = centers.shape[0]
        if n_clusters < 2:
            raise ValueError("Leiden found a single cluster in the pretrained embedding; pass n_clusters.")
        net.centers = torch.nn.Parameter(centers.detach().clone())
    elif init == "spectral":
        centers = _cluster_means(z, _spectral_codes(z, int(n_clusters), random_state))
        net.set_centers(centers)
    else:
        generator = torch.Generator(device=torch_device)
        generator.manual_seed(int(random_state))
        centers, _ = kmeans(z, int(n_clusters), n_init=10, generator=generator)
        net.set_centers(centers)
    del z

    targets: dict[str, object] = {"epoch": 0}

    def joint_step(batch):
        z, z_d, z_g = encode(batch)
        q, q_d, q_g = soft_assignments(net, z, z_d, z_g)
        index = batch[-1]
        if index is None:  # the whole graph: this step's Q is every cell's, no extra pass needed
            if targets["epoch"] % update_interval == 0:
                targets["p"] = tuple(target_distribution(t.detach()) for t in (q, q_d, q_g))
            targets["epoch"] += 1
            p, p_d, p_g = targets["p"]
        else:
            p, p_d, p_g = (t[index] for t in targets["p"])
        loss, terms = reconstruction(z, batch)
        terms.update(kl=kl_target(q, p), bce_d=soft_bce(q_d, p_d), bce_g=soft_bce(q_g, p_g))
        loss = loss + g_kl * terms["kl"] + g_bce * (terms["bce_d"] + terms["bce_g"])
        return {"loss": loss, **terms}

    def joint_batches():
        if mode == "minibatch":
            # P divides by the soft cluster frequencies, which only Q of all cells gives
            if targets["epoch"] % update_interval == 0:
                q = cells.map(lambda batch: soft_assignments(net, *encode(batch)), torch_device)
                targets["p"] = tuple(target_distribution(t) for t in q)
            targets["epoch"] += 1
        return cells.training_batches()

    if n_epochs:
        joint = train_loop(
            net,
            torch.optim.Adam(net.parameters(), lr=lr),
            step=joint_step,
            batches=joint_batches,
            n_epochs=n_epochs,
            progress_bar=progress_bar,
            description="scDEFER",
        )
        history.update(joint)
        _check_finite_history(joint, "joint training", "lr", lr)

    def outputs(batch):
        z, z_d, z_g = encode(batch)
        q = soft_assignments(net, z, z_d, z_g)[0]
        return (z, q, net.decode(z, batch[2])[1]) if zinb and denoised else (z, q)

    results = [value.numpy() for value in cells.map(outputs, torch.device("cpu"))]
    embedding, proba = results[:2]
    means = results[2] if len(results) > 2 else None
    codes = proba.argmax(axis=1)
    beta = float(net.beta.detach())
    labels = pd.Categorical.from_codes(codes, categories=[str(k) for k in range(n_clusters)])
    labels = labels.remove_unused_categories()
    modelled_names = var_names[genes]

    if copy:
        adata = adata.copy()
    rows = adata.var_names.get_indexer(modelled_names)
    found = rows >= 0  # with use_raw, genes of raw that adata.var lacks have no row
    modelled = np.zeros(adata.n_vars, dtype=bool)
    modelled[rows[found]] = True
    adata.obsm[f"X_{key_added}"] = embedding
    adata.obs[key_added] = pd.Categorical(labels, categories=labels.categories)
    adata.obsm[f"{key_added}_proba"] = proba
    adata.var[f"{key_added}_modelled"] = modelled
    if means is not None:
        if found.all() and np.array_equal(rows, np.arange(adata.n_vars)):
            layer_values = means  # every gene modelled, in order: no second cells x genes array
        else:
            layer_values = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
            layer_values[:, rows[found]] = means[:, found]
        adata.layers[f"{key_added}_denoised"] = layer_values
    adata.uns[key_added] = {
        "params": {
            "n_clusters": int(n_clusters),
            "init": init,
            "layer": layer,
            "use_raw": bool(use_raw),
            "input": source,
            "allow_noninteger": bool(allow_noninteger),
            "n_top_genes": n_top_genes,
            "n_genes": len(genes),
            "neighbors_key": neighbors_key,
            "graph_source": graph_source,
            "n_neighbors": int(n_neighbors),
            "n_edges": int(cell_graph.nnz),
            "hidden_sizes": np.asarray(hidden_sizes, dtype=np.int64),
            "decoder_sizes": np.asarray(decoder_sizes, dtype=np.int64),
            "alpha": float(alpha),
            "hops": int(hops),
            "zinb": bool(zinb),
            "denoised": bool(denoised),
            "gammas": np.asarray(gammas, dtype=np.float64),
            "n_pretrain_epochs": int(n_pretrain_epochs),
            "n_epochs": int(n_epochs),
            "pretrain_lr": float(pretrain_lr),
            "lr": float(lr),
            "update_interval": int(update_interval),
            "training": mode,
            "batch_size": int(batch_size),
            "n_parts": int(n_parts),
            "device": str(torch_device),
            "random_state": int(random_state),
            "scext_version": __version__,
        },
        "history": {name: np.asarray(values) for name, values in history.items()},
        "n_clusters": int(len(labels.categories)),
        "beta": beta,
    }
    logg.info(
        f"    finished ({len(labels.categories)} clusters)",
        time=start,
        deep=(
            f"added\n    'X_{key_added}', embedding (adata.obsm)\n    '{key_added}', clusters (adata.obs)\n"
            f"    '{key_added}_proba' (adata.obsm)\n"
            + (f"    '{key_added}_denoised' (adata.layers)\n" if means is not None else "")
            + f"    '{key_added}_modelled' (adata.var)\n    '{key_added}' (adata.uns)"
        ),
    )
    return adata if copy else None


class _CellGraph:
    """The model's inputs for the whole cell graph, or for Cluster-GCN minibatches of its parts.

    A batch is ``(x, counts, size_factors, (edges, propagation, adjacency), index)``: the rows of its cells
    on the device, the edges among them (renumbered) with their normalised adjacencies, and the cells'
    positions in the graph (``None`` for the whole graph). Without `parts` the whole graph moves to the
    device once; with `parts` the cells x genes inputs stay on the host (sparse when the input is) and
    move a batch at a time.
    """

    def __init__(self, features, counts, size_factors, graph, device, *, parts, parts_per_batch, generator):
        self.features, self.counts, self.graph, self.device = features, counts, graph, device
        self.size_factors = torch.from_numpy(size_factors).to(device)
        self.n_cells = len(size_factors)
        self.parts, self.parts_per_batch, self.generator = parts, parts_per_batch, generator
        self.whole = None
        if parts is None:
            x = dense_rows(features, np.arange(self.n_cells), device)
            y = None if counts is None else dense_rows(counts, np.arange(self.n_cells), device)
            edges = edge_index(graph, device)
            self.whole = (x, y, self.size_factors, self._graph(edges, self.n_cells), None)
            self.features = self.counts = None

    def training_batches(self):
        """One epoch: the whole graph, or `parts_per_batch` random parts at a time (every part once)."""
        if self.whole is not None:
            return [self.whole]
        batches = partition_batches(self.parts, self.parts_per_batch, generator=self.generator)
        return (self._batch(cells, counts=True) for cells in batches)

    @torch.no_grad()
    def map(self, function, device: torch.device) -> tuple[torch.Tensor, ...]:
        """`function` of every batch (tensors with a row per batch cell), as tensors in cell order.

        Minibatches are the parts `parts_per_batch` at a time in a fixed order, every cell once.
        """
        if self.whole is not None:
            return tuple(value.to(device) for value in function(self.whole))
        outputs = None
        for cells in partition_batches(self.parts, self.parts_per_batch, shuffle=False):
            batch = self._batch(cells, counts=False)
            values = function(batch)
            if outputs is None:
                outputs = [
                    torch.empty((self.n_cells, *value.shape[1:]), dtype=value.dtype, device=device)
                    for value in values
                ]
            rows = batch[-1].to(device)
            for output, value in zip(outputs, values, strict=True):
                output[rows] = value.to(device)
        return tuple(outputs)

    @staticmethod
    def _graph(edges: torch.Tensor, n_cells: int):
        """Edges with the TAGConv propagation ``D^-1/2 A D^-1/2`` and the fusion's ``D^-1/2 (A + I) D^-1/2``."""
        return (
            edges,
            normalized_adjacency(edges, n_cells, self_loops=False),
            normalized_adjacency(edges, n_cells, self_loops=True),
        )

    def _batch(self, cells: np.ndarray, *, counts: bool):
        index = torch.from_numpy(cells).to(self.device)
        edges = induced_edges(self.graph, cells).to(self.device)
        y = dense_rows(self.counts, cells, self.device) if counts and self.counts is not None else None
        x = dense_rows(self.features, cells, self.device)
        return (x, y, self.size_factors[index], self._graph(edges, len(cells)), index)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_arguments(
    n_clusters, alpha, gammas, zinb, n_pretrain_epochs, n_epochs, pretrain_lr, lr, update_interval, hops, init
) -> tuple[float, float, float, float]:
    if init not in ("kmeans", "spectral"):
        raise ValueError(f"init={init!r} is unknown; choose 'kmeans' or 'spectral'.")
    if n_clusters is not None and (not _is_int(n_clusters) or n_clusters < 2):
        raise ValueError(
            f"n_clusters must be an int of at least 2 (or None to take the number of Leiden clusters); "
            f"got {n_clusters!r}."
        )
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (the paper uses 0.1).")
    gammas = tuple(float(g) for g in gammas)
    if len(gammas) != 4 or min(gammas) < 0:
        raise ValueError(
            f"gammas must be four non-negative weights (graph, ZINB, KL, cross-entropy); got {gammas}."
        )
    if n_pretrain_epochs and gammas[0] == 0 and not (zinb and gammas[1] > 0):
        raise ValueError(
            "pretraining has nothing to minimise: give gammas[0] or (with zinb=True) gammas[1] > 0."
        )
    for name, value in (("n_pretrain_epochs", n_pretrain_epochs), ("n_epochs", n_epochs)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}.")
    for name, value in (("pretrain_lr", pretrain_lr), ("lr", lr)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}.")
    if not _is_int(update_interval) or update_interval < 1:
        raise ValueError(f"update_interval must be a positive int, got {update_interval!r}.")
    if not _is_int(hops) or hops < 0:
        raise ValueError(f"hops must be a non-negative int, got {hops!r}.")
    return gammas


def _check_counts(matrix, source: str, allow_noninteger: bool) -> None:
    """Raw counts only: the ZINB likelihood is undefined for negative and meaningless for scaled values."""
    values = stored_values(matrix)
    if values.size and values.min() < 0:
        raise ValueError(
            f"{source} holds negative values; scdefer needs raw counts. Pass the raw-count layer "
            "(layer='counts') or use_raw=True if adata.raw holds the counts."
        )
    if not allow_noninteger and values.size and not is_integer_valued(values):
        raise ValueError(
            f"{source} holds non-integer values (normalised or log data?); scdefer needs raw counts. Pass "
            "the raw-count layer (layer='counts'), or allow_noninteger=True if these are corrected counts."
        )
    totals_cells = np.asarray(matrix.sum(axis=1)).ravel()
    if (totals_cells == 0).any():
        raise ValueError(
            f"{int((totals_cells == 0).sum())} cell(s) of {source} have no counts; their size factor is 0. "
            "Remove them first: sc.pp.filter_cells(adata, min_counts=1)."
        )
    totals_genes = np.asarray(matrix.sum(axis=0)).ravel()
    if (totals_genes == 0).any():
        raise ValueError(
            f"{int((totals_genes == 0).sum())} gene(s) of {source} have no counts in any cell. Remove them "
            "first: sc.pp.filter_genes(adata, min_counts=1)."
        )


def _check_finite_history(history: dict, stage: str, argument: str, rate: float) -> None:
    if not np.isfinite(history["loss"]).all():
        raise FloatingPointError(
            f"scDEFER's {stage} diverged (non-finite loss at {argument}={rate:g}); lower {argument}. "
            "adata was not modified."
        )


def _leiden_codes(z: torch.Tensor, random_state: int) -> np.ndarray:
    """Leiden clusters (resolution 1) of Z's unweighted 15-NN graph: K and centres when n_clusters is None."""
    import scanpy as sc

    embedding = z.cpu().numpy()
    n_cells = embedding.shape[0]
    graph = knn_graph(embedding, min(15, n_cells - 1), random_state=random_state)
    work = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(n_cells)]))
    sc.tl.leiden(
        work, adjacency=graph, random_state=random_state, flavor="igraph", n_iterations=2, directed=False
    )
    return work.obs["leiden"].astype(int).to_numpy()


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
