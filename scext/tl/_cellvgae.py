"""CellVGAE as a tool: validate the input, build the graph, train `scext.models.CellVGAE`, cluster, write slots."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from .._utils import (
    check_finite,
    dense_columns,
    get_matrix,
    is_integer_valued,
    matrix_source,
    resolve_device,
    seed_everything,
    stored_values,
)
from .._utils._arguments import renamed_arguments
from .._utils._contract import check_adata, check_int, check_ints, check_number, claim_slots
from .._utils._device import keeps_torch_threads
from .._utils._genes import highly_variable_column, highly_variable_genes
from .._utils._graph import (
    EXACT_KNN_MAX_CELLS,
    exact_neighbor_distances,
    knn_graph,
    leiden_codes,
    neighbors_graph,
    undirected_edges,
)
from .._utils._random import preserves_global_rng
from .._utils._warnings import warn
from ..models._base import params_record
from ..models._cellvgae import CONVOLUTIONS, REGULARIZERS, CellVGAE, default_regularizer_weight
from ..models._kmeans import kmeans
from ..models._reference import MAX_REFERENCE_CELLS
from ..train._graph_batches import graph_training_mode
from ._common import begin_prediction

GRAPHS = ("knn", "pknn")
CLUSTER_METHODS = ("hdbscan", "umap_hdbscan", "leiden")
# HDBSCAN in mu's dimensions grows about quadratically with the cells (11 s for 20,000 cells on 2 cores)
HDBSCAN_WARN_CELLS = 50_000
NOISE = "noise"
#: encoder widths before `hidden_sizes` held the latent size (the paper's 128, 128; latent 50 apart)
_OLD_DEFAULT_HIDDEN = (128, 128)
_DEFAULT_HIDDEN = (128, 128, 50)


@renamed_arguments(heads="n_heads")
@keeps_torch_threads
@preserves_global_rng
@doc_params
def cellvgae(
    adata: AnnData,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    n_top_genes: int | None = 2000,
    neighbors_key: str | None = None,
    graph: str | sp.spmatrix | np.ndarray = "knn",
    n_neighbors: int = 5,
    graph_n_top_genes: int | None = None,
    graph_use_rep: str | None = None,
    conv: str = "gat",
    hidden_sizes: Sequence[int] = _DEFAULT_HIDDEN,
    n_heads: int | Sequence[int] = 3,
    latent_size: int | None = None,
    regularizer: str = "kl",
    regularizer_weight: float | None = None,
    feature_decoder: bool = False,
    n_epochs: int | None = None,
    lr: float = 1e-3,
    training: str = "auto",
    batch_size: int = 1024,
    n_clusters: int | None = None,
    cluster_method: str | None = "hdbscan",
    min_cluster_size: int | None = None,
    resolution: float = 1.0,
    attention_layer: int = 2,
    attention_heads: bool = False,
    n_marker_genes: int = 15,
    max_reference_cells: int = MAX_REFERENCE_CELLS,
    keep_model: bool = True,
    device: str | torch.device = "auto",
    random_state: int = 0,
    progress_bar: bool | None = None,
    key_added: str = "cellvgae",
    copy: bool = False,
) -> AnnData | None:
    """Embed and cluster cells with CellVGAE, a variational graph autoencoder with graph attention.

    CellVGAE encodes each cell's (min-max scaled) expression over a cell graph with graph-attention layers,
    samples ``z ~ N(mu, sigma^2)`` and reconstructs the graph's edges with an inner-product decoder,
    regularised by a KL or MMD term. The embedding is ``mu``. Clusters are HDBSCAN's on ``mu`` (the
    paper's clustering; cells it leaves unassigned are labelled ``"noise"``), or Leiden's on a kNN graph of
    ``mu``. Training is full-graph up to `batch_size` cells and on Cluster-GCN minibatches beyond
    (see `training`); no label is read. `scext.tl.cellvgae_predict` embeds and clusters new cells with the
    trained model. The :doc:`CellVGAE page </methods/cellvgae>` gives the equations and scext's choices.

    Parameters
    ----------
    adata
        Cells x genes, log-normalised (``sc.pp.normalize_total`` + ``sc.pp.log1p``), as in the paper.
    {layer}
    n_top_genes
        Node features: this many highly variable genes of the input (Scanpy's ``seurat`` flavour; every gene
        when there are fewer), as in the paper, which uses highly variable genes (2,000 here: see the
        method page). ``None`` uses ``var["highly_variable"]`` when present, else every gene.
    neighbors_key
        Use the edges of an existing ``sc.pp.neighbors`` graph (its ``key_added``; ``"neighbors"`` for the
        default) instead of building one. The edges are its neighbour pairs, unweighted.
    graph
        ``"knn"`` (Euclidean) or ``"pknn"`` (Pearson correlation) graph built here when `neighbors_key` is
        ``None``: each cell joined to its `n_neighbors` nearest cells, then made undirected. Or your own cells
        x cells adjacency matrix (its non-zeros are the edges). GAT layers add the self-loops.
    n_neighbors
        k of the graph; the paper's 5. New cells (`scext.tl.cellvgae_predict`) are attached to this many
        reference cells, by Pearson correlation for ``"pknn"`` and Euclidean distance otherwise.
    graph_n_top_genes
        Build the graph on this many highly variable genes (the paper's KHVG), which may differ from the
        feature genes; ``None`` uses the feature genes. The graph sees log values, not min-max scaled ones.
    graph_use_rep
        Build the graph on ``adata.obsm[graph_use_rep]`` (e.g. ``"X_pca"``) instead of genes.
    conv
        Graph layer type: ``"gat"`` (default), ``"gatv2"`` or ``"gcn"`` (torch-geometric).
    hidden_sizes, n_heads
        Encoder widths up to and including the latent size: the per-head output size of each hidden layer
        (concatenated heads), then the size of mu; and the heads of each hidden layer and of the mu /
        log-sigma layers (which average their heads), one int for all or one per entry of `hidden_sizes`.
        The paper's (128, 128, 50) and 3.
    latent_size
        Deprecated (FutureWarning; removed in the next release): when given, `hidden_sizes` are read the old
        way, as the hidden widths only, and `latent_size` is appended (the old default hidden widths were
        (128, 128)). Give the latent size as the last entry of `hidden_sizes` instead.
    regularizer, regularizer_weight
        ``"kl"`` or ``"mmd"`` (eq. 9) and its weight; ``None`` means 1/N for KL (the VGAE recipe: the
        node-averaged KL over the number of nodes) and 1 for MMD.
    feature_decoder
        Add a dense decoder that reconstructs the features from z with an MSE loss (eq. 11).
    n_epochs, lr
        Adam epochs and learning rate. The paper trains 200 full-graph epochs at 1e-4 (sec. 3.7); 50 at
        1e-3 reach about the same reconstruction loss and clusters in 3.5x less time (see the method page).
        ``None`` trains about 50 optimizer steps: ``ceil(50 / minibatches per epoch)`` epochs (50 on the
        full graph, 10 for 4,271 cells in minibatches of 1,024).
    training, batch_size
        ``"full"``: one step per epoch on the whole graph (the paper). ``"minibatch"``: Cluster-GCN
        training on 4 random graph parts of about ``batch_size / 4`` cells per step, so memory follows
        `batch_size`, not the number of cells (an approximation: edges between parts not drawn together are
        left out of that step). Inference is always exact on the whole graph. ``"auto"``: full-graph up to
        `batch_size` cells. The default 1,024 trains 2-6x faster than the full graph on 1,886-4,271 cells,
        with the same HDBSCAN clusters on average and better K-means ones (:ref:`bench-cellvgae-minibatch`).
        See :doc:`/large_data`.
    n_clusters
        When you know how many cell types to expect: K-means with this K on mu (10 k-means++ seedings, the
        run of lowest inertia; `scext.models.kmeans`), exactly `n_clusters` clusters and no noise label.
        ``None``: clusters are found by `cluster_method`.
    cluster_method
        Used when `n_clusters` is None: ``"hdbscan"`` (scikit-learn's HDBSCAN on mu itself, whose
        clusters barely move with the thread count, :ref:`bench-cellvgae-readout`; its time grows about with
        the square of the cells, 11 s for 20,000), ``"umap_hdbscan"`` (HDBSCAN on a 2-D UMAP of mu with
        ``n_neighbors=30, min_dist=0``, the former default, whose clusters change with last-bit
        differences of mu) or ``"leiden"`` (on a 15-nearest-neighbour graph of mu). ``None`` skips
        clustering, which can take longer than training on an atlas; cluster afterwards with ``sc.pp.neighbors(adata,
        use_rep="X_cellvgae")`` and ``sc.tl.leiden``. The model of an unclustered run embeds new cells but
        cannot predict their clusters.
    min_cluster_size
        HDBSCAN's smallest cluster; ``None`` means ``max(10, n_cells // 100)``, 1 % of the cells.
    resolution
        Leiden's resolution (``cluster_method="leiden"`` only).
    attention_layer
        Which graph layer's attention to store, counted from 1 over the hidden layers then the mu layer; the
        paper shows the second. Ignored for GCN, which has no attention.
    attention_heads
        Also store every head's coefficients, not only their mean.
    n_marker_genes
        Genes per cluster and latent dimension in the ``marker_genes`` table (sec. 3.4; see
        `scext.tl.cellvgae_marker_genes`).
    max_reference_cells
        Training cells the model keeps to place new cells (all of them up to this many, else a seeded
        sample), with the graph among them; see `scext.models.CellVGAE`.
    {keep_model}
    {device}
    {random_state}
        On the CPU, bit-for-bit repetition also needs one thread (``torch.set_num_threads(1)``); on CUDA
        the scatter operations of graph layers are not bit-reproducible.
    {progress_bar}
    {key_added}
    {copy}

    Returns
    -------
    `None`, or the copy when ``copy=True``. Writes:

    ``obsm["X_<key_added>"]``
        mu for every cell.
    ``obs["<key_added>"]``
        Clusters (categorical; ``"noise"`` for cells HDBSCAN leaves out). Not written when
        ``cluster_method=None``.
    ``obsp["<key_added>_attention"]``
        Attention of the chosen layer, mean over heads, sparse and directed: entry ``[i, j]`` is the weight
        cell i gives cell j's message (eq. 4); each row sums to 1. Self-loops included. Not written for GCN.
    ``varm["<key_added>_loadings"]``
        P_mu (eq. 12), genes x latent; zero rows for genes that were not features.
    ``var["<key_added>_feature"]``
        Whether a gene was a node feature.
    ``uns[key_added]``
        ``params``, ``history`` (loss, reconstruction and regulariser per epoch), ``attention_layer``,
        ``n_clusters``, ``n_noise``, ``marker_genes`` (table; these three only when clustered), with
        ``attention_heads=True`` ``attention_heads`` (one column per head, rows in the CSR order of the
        attention matrix), and with ``keep_model=True`` ``model`` (`scext.models.CellVGAE.from_adata`
        rebuilds it, `scext.tl.cellvgae_predict` uses it).

    References
    ----------
    David Buterez, Ioana Bica, Ifrah Tariq, Helena Andrés-Terré and Pietro Liò. CellVGAE: an unsupervised
    scRNA-seq analysis workflow with graph attention networks. Bioinformatics 38(5):1277-1286, 2022.
    doi:10.1093/bioinformatics/btab804
    """
    arguments = dict(locals())
    start = logg.info("training CellVGAE")
    if latent_size is not None:
        warn(
            "cellvgae(): 'latent_size' is deprecated and stops working in the next release; give the latent "
            "size as the last entry of hidden_sizes (e.g. hidden_sizes=(128, 128, 50)).",
            FutureWarning,
        )
        hidden = _OLD_DEFAULT_HIDDEN if hidden_sizes is _DEFAULT_HIDDEN else tuple(hidden_sizes)
        hidden_sizes = (*hidden, latent_size)
    check_adata(adata, "cellvgae", copy=copy)
    check_ints(hidden_sizes, "hidden_sizes")
    check_ints(n_heads, "n_heads")
    hidden_sizes = tuple(int(size) for size in hidden_sizes)
    torch_device = resolve_device(device)
    custom_graph = not isinstance(graph, str)
    _check_choices(conv, regularizer, "knn" if custom_graph else graph, cluster_method)
    check_int(batch_size, "batch_size")
    check_int(max_reference_cells, "max_reference_cells")
    check_int(n_epochs, "n_epochs", minimum=0, allow_none=True)
    check_int(n_neighbors, "n_neighbors")
    check_int(n_marker_genes, "n_marker_genes")
    check_int(min_cluster_size, "min_cluster_size", minimum=2, allow_none=True)
    check_int(n_clusters, "n_clusters", minimum=2, allow_none=True)
    check_int(n_top_genes, "n_top_genes", allow_none=True)
    check_int(graph_n_top_genes, "graph_n_top_genes", allow_none=True)
    check_number(lr, "lr", low=0, open_low=True)
    check_number(resolution, "resolution", low=0, open_low=True)
    if regularizer_weight is not None:
        check_number(regularizer_weight, "regularizer_weight", low=0)
    claim_slots(adata, "cellvgae", key_added, key_added, _slots(key_added))
    matrix, var_names = get_matrix(adata, layer=layer, use_raw=use_raw)
    n_cells = matrix.shape[0]
    if custom_graph and neighbors_key is not None:
        raise ValueError("Pass either an adjacency matrix as graph= or neighbors_key=, not both.")
    if custom_graph and graph.shape != (n_cells, n_cells):
        raise ValueError(
            f"graph is {graph.shape[0]} x {graph.shape[1]}, but adata has {n_cells} cells; pass a cells x cells "
            "adjacency matrix in the order of adata.obs_names."
        )
    if not custom_graph and neighbors_key is None and not 1 <= n_neighbors < n_cells:
        raise ValueError(
            f"n_neighbors={n_neighbors} needs at least {n_neighbors + 1} cells; adata has {n_cells}. "
            "Lower n_neighbors."
        )
    if n_clusters is not None and n_clusters > n_cells:
        raise ValueError(f"n_clusters={n_clusters} is more than the {n_cells} cells.")
    graph_training_mode(training, n_cells, batch_size)  # validates `training` before any work
    n_graph_layers = len(hidden_sizes)
    if conv != "gcn" and not 1 <= attention_layer <= n_graph_layers:
        raise ValueError(
            f"attention_layer={attention_layer} does not exist: the encoder has {n_graph_layers} graph layers "
            "(the hidden layers, then mu), counted from 1."
        )
    uses_hvg_column = n_top_genes is None and not use_raw and "highly_variable" in adata.var
    features = _gene_selection(adata, matrix, n_top_genes, use_raw, "n_top_genes")
    if custom_graph:
        cell_graph = undirected_edges(graph)
        graph_source = "user-supplied adjacency matrix"
    elif neighbors_key is not None:
        cell_graph = neighbors_graph(adata, neighbors_key)
        graph_source = f"sc.pp.neighbors graph {neighbors_key!r}"
    else:
        if graph_use_rep is not None:
            if graph_use_rep not in adata.obsm:
                raise KeyError(
                    f"graph_use_rep={graph_use_rep!r} is not in adata.obsm (have: {list(adata.obsm.keys())})."
                )
            graph_data = np.asarray(adata.obsm[graph_use_rep], dtype=np.float32)
            check_finite(graph_data, f"adata.obsm[{graph_use_rep!r}]")
            graph_source = f"adata.obsm[{graph_use_rep!r}]"
        else:
            graph_genes = (
                features
                if graph_n_top_genes is None
                else _gene_selection(adata, matrix, graph_n_top_genes, use_raw, "graph_n_top_genes")
            )
            graph_data = dense_columns(matrix, graph_genes)
            graph_source = f"{len(graph_genes)} genes of {matrix_source(layer, use_raw)}"
        cell_graph = knn_graph(
            graph_data,
            n_neighbors,
            metric="correlation" if graph == "pknn" else "euclidean",
            random_state=random_state,
        )
    _warn_if_counts(matrix)
    # the minibatch order has its own generator: the global stream (weights, random pairs) then draws the
    # same numbers in both modes, and one batch of all cells reproduces full-graph training
    rng, order_generator = seed_everything(random_state)

    feature_names = var_names[features]
    # new cells join their nearest reference cells as training cells joined the graph built here
    built_pknn = not custom_graph and neighbors_key is None and graph == "pknn"
    placement_metric = "correlation" if built_pknn else "euclidean"
    model = CellVGAE(
        feature_names,
        layer=layer,
        use_raw=use_raw,
        conv=conv,
        hidden_sizes=hidden_sizes,
        n_heads=n_heads,
        feature_decoder=feature_decoder,
        n_neighbors=n_neighbors,
        metric=placement_metric,
    )
    selected = matrix if len(features) == matrix.shape[1] else matrix[:, features]
    fitted = model.fit(
        selected,
        cell_graph,
        regularizer=regularizer,
        regularizer_weight=regularizer_weight,
        n_epochs=n_epochs,
        lr=lr,
        training=training,
        batch_size=batch_size,
        attention_layer=attention_layer,
        max_reference_cells=max_reference_cells,
        device=torch_device,
        random_state=random_state,
        generator=order_generator,
        rng=rng,
        progress_bar=progress_bar,
    )
    embedding, attention = fitted.embedding, fitted.attention
    loadings = model.net.gene_loadings()[0].detach().cpu().numpy()

    gene_loadings, is_feature = _loadings_per_var(adata.var_names, feature_names, loadings)
    labels, clustering = None, {}
    if n_clusters is not None or cluster_method is not None:
        labels = _cluster(embedding, cluster_method, min_cluster_size, resolution, random_state, n_clusters)
        model.set_clusters(labels)
        clustering = {
            "n_clusters": int(len(labels.categories) - (NOISE in labels.categories)),
            "n_noise": int((labels == NOISE).sum()),
            "marker_genes": _marker_gene_table(embedding, labels, loadings, feature_names, n_marker_genes),
        }
    weight = (
        default_regularizer_weight(regularizer, n_cells) if regularizer_weight is None else regularizer_weight
    )
    params = params_record(
        cellvgae,
        arguments,
        hidden_sizes=hidden_sizes,
        input=matrix_source(layer, use_raw),
        features="var['highly_variable']" if uses_hvg_column else f"{len(features)} genes",
        graph="custom" if custom_graph else graph if neighbors_key is None else "neighbors_key",
        graph_source=graph_source,
        n_edges=int(cell_graph.nnz),
        n_heads=list(model.n_heads),
        regularizer_weight=float(weight),
        training=fitted.mode,
        n_parts=fitted.n_parts,
        n_epochs=fitted.n_epochs,
        min_cluster_size=_min_cluster_size(min_cluster_size, n_cells)
        if cluster_method in ("hdbscan", "umap_hdbscan") and n_clusters is None
        else None,
        n_reference_cells=model.reference.n_cells,
        device=torch_device,
    )

    if copy:
        adata = adata.copy()
    adata.obsm[f"X_{key_added}"] = embedding
    if labels is not None:
        adata.obs[key_added] = labels
    adata.varm[f"{key_added}_loadings"] = gene_loadings
    adata.var[f"{key_added}_feature"] = is_feature
    extra = {}
    if attention is not None:
        matrix_attention, per_head = _attention_matrix(*attention, n_cells)
        adata.obsp[f"{key_added}_attention"] = matrix_attention
        if attention_heads:
            extra["attention_heads"] = per_head
    adata.uns[key_added] = {
        "params": params,
        "history": {name: np.asarray(values) for name, values in fitted.history.items()},
        "attention_layer": int(attention_layer) if attention is not None else None,
        **clustering,
        **extra,
    }
    if keep_model:
        adata.uns[key_added]["model"] = model.to_dict()
    logg.info(
        f"    finished ({clustering['n_clusters']} clusters, {clustering['n_noise']} noise cells)"
        if clustering
        else "    finished (not clustered)",
        time=start,
        deep=(
            f"added\n    'X_{key_added}', embedding (adata.obsm)\n"
            + (f"    '{key_added}', clusters (adata.obs)\n" if clustering else "")
            + (f"    '{key_added}_attention' (adata.obsp)\n" if attention is not None else "")
            + f"    '{key_added}_loadings' (adata.varm)\n    '{key_added}' (adata.uns)"
        ),
    )
    return adata if copy else None


@keeps_torch_threads
@preserves_global_rng
@doc_params
def cellvgae_predict(
    adata: AnnData,
    model: CellVGAE | AnnData,
    *,
    key: str = "cellvgae",
    device: str | torch.device = "auto",
    chunk_size: int = 4096,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed new cells with a trained CellVGAE model and give them the training clusters.

    Each new cell is attached to its nearest reference cells of the model (`scext.models.CellVGAE`
    describes how) and encoded; its cluster is the majority among its 15 nearest reference cells in mu.

    Parameters
    ----------
    adata
        New cells. Must hold every feature gene of the model, in the same units (layer, log-normalisation)
        as the training data; extra genes are ignored and the order may differ.
    {predict_model}
    {device}
    chunk_size
        New cells searched and embedded at once; results do not depend on it beyond float rounding.
    {copy}

    Returns
    -------
    `None`, or the copy when ``copy=True``. Writes:

    ``obsm["X_<key_added>"]``
        mu for every cell.
    ``obs["<key_added>"]``
        Predicted clusters, categorical with the reference clusters' categories (``"noise"`` included when
        HDBSCAN left training cells out).
    ``obsm["<key_added>_proba"]``
        Vote fractions among the 15 nearest reference cells, columns in the order of the categories.
    ``uns["<key_added>_predict"]``
        ``categories`` and ``n_reference_cells``.

    A model trained with ``cluster_method=None`` has no clusters: then only ``obsm["X_<key_added>"]`` and
    ``uns["<key_added>_predict"]`` (with ``categories`` None) are written, and a warning says so.
    """
    arguments = dict(locals())
    start = logg.info("embedding cells with a trained CellVGAE model")
    reference = model
    model, torch_device, key_added = begin_prediction(
        adata,
        model,
        CellVGAE,
        tool="cellvgae_predict",
        key=key,
        key_added=key_added,
        device=device,
        chunk_size=chunk_size,
        copy=copy,
    )
    labels = proba = None
    if model.categories is None:
        embedding = model.transform(adata, device=torch_device, chunk_size=chunk_size)
        logg.warning(
            "the CellVGAE model has no clusters (trained with cluster_method=None); only the embedding "
            f"obsm['X_{key_added}'] is written."
        )
    else:
        embedding, labels, proba = model.embed_and_predict(adata, device=torch_device, chunk_size=chunk_size)
    if copy:
        adata = adata.copy()
    adata.obsm[f"X_{key_added}"] = embedding
    if labels is not None:
        adata.obs[key_added] = labels
        adata.obsm[f"{key_added}_proba"] = proba
        colors = reference.uns.get(f"{key}_colors") if isinstance(reference, AnnData) else None
        if colors is not None and len(colors) == len(model.categories):
            adata.uns[f"{key_added}_colors"] = list(colors)
    adata.uns[f"{key_added}_predict"] = {
        "params": params_record(cellvgae_predict, arguments, key_added=key_added, device=torch_device),
        "categories": None if model.categories is None else np.asarray(model.categories, dtype=object),
        "n_reference_cells": int(model.reference.n_cells),
    }
    logg.info(
        "    finished",
        time=start,
        deep=f"added 'X_{key_added}'"
        + (f", '{key_added}', '{key_added}_proba'" if labels is not None else "")
        + f", '{key_added}_predict' (adata.uns)",
    )
    return adata if copy else None


def _slots(key_added: str) -> list[tuple[str, str]]:
    """The slots `cellvgae` writes under `key_added`."""
    return [
        ("obsm", f"X_{key_added}"),
        ("obs", key_added),
        ("obsp", f"{key_added}_attention"),
        ("varm", f"{key_added}_loadings"),
        ("var", f"{key_added}_feature"),
        ("uns", key_added),
    ]


def cellvgae_marker_genes(
    adata: AnnData,
    *,
    key: str = "cellvgae",
    groupby: str | None = None,
    n_genes: int = 15,
    n_dims: int = 5,
) -> pd.DataFrame:
    """Genes that drive each cluster's latent profile, from the loadings P_mu (CellVGAE sec. 3.4).

    For each cluster, the `n_dims` latent dimensions where its mean mu departs most from all cells' (in
    standard deviations) are taken; for each such dimension the `n_genes` genes with the largest loading in
    the direction of the departure are selected, and genes are ranked by how many dimensions selected them
    (then by their summed oriented loading). This is scext's reading of the paper's "for each cluster, and
    then for each latent dimension, the 15 top genes": the cluster decides which dimensions count.

    Parameters
    ----------
    adata
        AnnData on which `scext.tl.cellvgae` ran.
    key
        Where `scext.tl.cellvgae` wrote its slots.
    groupby
        Clusters to describe: a column of ``adata.obs``; defaults to CellVGAE's own clusters (`key`).
    n_genes
        Genes selected per cluster and latent dimension.
    n_dims
        Latent dimensions per cluster.

    Returns
    -------
    A table with columns ``cluster``, ``gene``, ``appearances``, ``loading`` (summed oriented loading) and
    ``dimensions`` (the latent dimensions that selected the gene), best genes first within each cluster.
    """
    for slot, store in ((f"X_{key}", adata.obsm), (f"{key}_loadings", adata.varm)):
        if slot not in store:
            raise KeyError(f"{slot!r} is missing; run scext.tl.cellvgae(adata, key_added={key!r}) first.")
    groupby = key if groupby is None else groupby
    if groupby not in adata.obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs.")
    is_feature = adata.var.get(f"{key}_feature", pd.Series(True, index=adata.var_names)).to_numpy(bool)
    labels = pd.Categorical(adata.obs[groupby].astype(str))
    return _marker_gene_table(
        np.asarray(adata.obsm[f"X_{key}"]),
        labels,
        np.asarray(adata.varm[f"{key}_loadings"])[is_feature],
        adata.var_names[is_feature],
        n_genes,
        n_dims,
    )


def _check_choices(conv: str, regularizer: str, graph: str, cluster_method: str) -> None:
    for name, value, allowed in (
        ("conv", conv, CONVOLUTIONS),
        ("regularizer", regularizer, REGULARIZERS),
        ("graph", graph, GRAPHS),
        ("cluster_method", cluster_method, (*CLUSTER_METHODS, None)),
    ):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is unknown; choose one of {allowed}.")


def _gene_selection(
    adata: AnnData, matrix, n_top_genes: int | None, use_raw: bool, argument: str
) -> np.ndarray:
    """Column indices of the genes to use: top variable, the highly_variable column, or all."""
    n_genes = matrix.shape[1]
    if n_top_genes is None:
        selected = highly_variable_column(adata, use_raw)
        return np.arange(n_genes) if selected is None else selected
    if n_top_genes < 1:
        raise ValueError(f"{argument}={n_top_genes} must be at least 1.")
    if n_top_genes < n_genes and _looks_like_counts(matrix):
        # Scanpy's seurat flavour exponentiates its input: counts overflow it
        raise ValueError(
            f"{argument}={n_top_genes} selects highly variable genes of log-normalised expression, but the "
            "input looks like raw counts. Run sc.pp.normalize_total and sc.pp.log1p first (as the paper "
            f"does), or pass {argument}=None to use var['highly_variable'] or every gene."
        )
    return highly_variable_genes(matrix, n_top_genes)  # every gene when there are no more


def _looks_like_counts(matrix) -> bool:
    values = stored_values(matrix)[:100_000]
    return bool(values.size and values.max() > 30 and is_integer_valued(values))


def _warn_if_counts(matrix) -> None:
    if _looks_like_counts(matrix):
        logg.warning(
            "the input looks like raw counts; CellVGAE expects log-normalised expression "
            "(sc.pp.normalize_total, then sc.pp.log1p)."
        )


def _min_cluster_size(min_cluster_size: int | None, n_cells: int) -> int:
    return max(10, n_cells // 100) if min_cluster_size is None else int(min_cluster_size)


def _cluster(
    embedding, method, min_cluster_size, resolution, random_state, n_clusters=None
) -> pd.Categorical:
    n_cells = embedding.shape[0]
    if n_clusters is not None:
        generator = torch.Generator().manual_seed(int(random_state))
        _, codes = kmeans(
            torch.from_numpy(np.ascontiguousarray(embedding)), n_clusters, n_init=10, generator=generator
        )
        codes = codes.numpy()
    elif method == "leiden":
        codes = leiden_codes(embedding, resolution=resolution, random_state=random_state)
    else:
        from sklearn.cluster import HDBSCAN

        if method == "hdbscan" and n_cells > HDBSCAN_WARN_CELLS:
            logg.warning(
                f"HDBSCAN on mu of {n_cells:,} cells can take long (it grows about with the square of the cells); "
                "cluster_method='leiden' is faster on large data."
            )
        points = _umap_layout(embedding, random_state) if method == "umap_hdbscan" else embedding
        smallest = _min_cluster_size(min_cluster_size, n_cells)
        # copy given: scikit-learn 1.9 warns that its default changes; copying mu costs little
        codes = HDBSCAN(min_cluster_size=smallest, copy=True).fit_predict(points)
        if n_cells < 2 * smallest or (codes < 0).all():
            warn(
                f"HDBSCAN labelled {(codes < 0).sum()} of {n_cells} cells noise: with min_cluster_size="
                f"{smallest}, {n_cells} cells leave room for {n_cells // smallest} cluster(s) at most. Pass "
                "n_clusters=K if you know how many types to expect, cluster_method='leiden', or a smaller "
                "min_cluster_size.",
                UserWarning,
            )
    names = [str(code) for code in range(codes.max() + 1)]
    if (codes < 0).any():
        names.append(NOISE)
        codes = np.where(codes < 0, len(names) - 1, codes)
    return pd.Categorical.from_codes(codes, categories=names)


def _umap_layout(embedding: np.ndarray, random_state: int) -> np.ndarray:
    """2-D UMAP of mu with umap-learn's clustering settings (``n_neighbors=30, min_dist=0``)."""
    import umap

    n_cells = embedding.shape[0]
    n_neighbors = min(30, n_cells - 1)
    # below 4,096 cells UMAP would compute every distance itself, one Python call per pair (most of the
    # read-out's time); the same exact neighbours, computed in float64, are seconds faster
    neighbors = (
        exact_neighbor_distances(embedding, n_neighbors)
        if n_cells < EXACT_KNN_MAX_CELLS
        else (None, None, None)
    )
    with warnings.catch_warnings():
        # the layout is only read here, never extended to new points, so no search index is needed
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
        return umap.UMAP(
            n_components=2,
            n_neighbors=n_neighbors,
            min_dist=0.0,
            random_state=random_state,
            n_jobs=1,
            precomputed_knn=neighbors,
        ).fit_transform(embedding)


def _loadings_per_var(var_names: pd.Index, feature_names: pd.Index, loadings: np.ndarray):
    """Scatter the features' loadings into one row per gene of the AnnData (use_raw maps by name)."""
    rows = var_names.get_indexer(feature_names)
    found = rows >= 0
    per_var = np.zeros((len(var_names), loadings.shape[1]), dtype=np.float32)
    per_var[rows[found]] = loadings[found]
    is_feature = np.zeros(len(var_names), dtype=bool)
    is_feature[rows[found]] = True
    return per_var, is_feature


def _attention_matrix(edges: np.ndarray, alpha: np.ndarray, n_cells: int):
    """Head-mean attention as a CSR matrix [target, source], and the per-head values in its CSR order."""
    source, target = edges
    order = np.lexsort((source, target))
    source, target, alpha = source[order], target[order], alpha[order]
    matrix = sp.csr_matrix((alpha.mean(axis=1), (target, source)), shape=(n_cells, n_cells), dtype=np.float32)
    return matrix, alpha.astype(np.float32)


def _marker_gene_table(embedding, labels, loadings, feature_names, n_genes, n_dims=5) -> pd.DataFrame:
    labels = pd.Categorical(labels)
    mean, std = embedding.mean(axis=0), embedding.std(axis=0) + 1e-8
    n_genes = min(n_genes, len(feature_names))
    rows = []
    for cluster in labels.categories:
        if cluster == NOISE:
            continue
        inside = np.asarray(labels == cluster)
        shift = (embedding[inside].mean(axis=0) - mean) / std
        dims = np.argsort(-np.abs(shift))[:n_dims]
        counts: dict[int, list] = {}
        for dim in dims:
            oriented = np.sign(shift[dim]) * loadings[:, dim]
            for gene in np.argsort(-oriented)[:n_genes]:
                entry = counts.setdefault(int(gene), [0, 0.0, []])
                entry[0] += 1
                entry[1] += float(oriented[gene])
                entry[2].append(str(dim))
        for gene, (appearances, loading, selected) in counts.items():
            rows.append((str(cluster), str(feature_names[gene]), appearances, loading, ",".join(selected)))
    table = pd.DataFrame(rows, columns=["cluster", "gene", "appearances", "loading", "dimensions"])
    # clusters in their category order ("2" before "10"), best genes first
    table["order"] = table["cluster"].map({str(name): i for i, name in enumerate(labels.categories)})
    table = table.sort_values(
        ["order", "appearances", "loading"], ascending=[True, False, False], kind="stable"
    )
    return table.drop(columns="order").reset_index(drop=True)
