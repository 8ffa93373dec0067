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
    check_finite,
    column_min_max,
    dense_columns,
    get_matrix,
    is_integer_valued,
    matrix_source,
    resolve_device,
    seed_everything,
    stored_values,
)
from .._utils._graph import edge_index, knn_graph, neighbors_graph, undirected_edges
from ..models._cellvgae import (
    CONVOLUTIONS,
    REGULARIZERS,
    CellVGAENet,
    default_regularizer_weight,
    loss_terms,
)
from ..train import dense_rows, train_loop
from ..train._graph_batches import (
    graph_partition,
    graph_training_mode,
    induced_edges,
    partition_batches,
    partition_plan,
)

GRAPHS = ("knn", "pknn")
CLUSTER_METHODS = ("hdbscan", "leiden")
NOISE = "noise"


def cellvgae(
    adata: AnnData,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    n_top_genes: int | None = None,
    neighbors_key: str | None = None,
    graph: str | sp.spmatrix | np.ndarray = "knn",
    n_neighbors: int = 5,
    graph_n_top_genes: int | None = None,
    graph_use_rep: str | None = None,
    conv: str = "gat",
    hidden_sizes: Sequence[int] = (128, 128),
    heads: int | Sequence[int] = 3,
    latent_size: int = 50,
    regularizer: str = "kl",
    regularizer_weight: float | None = None,
    feature_decoder: bool = False,
    n_epochs: int = 200,
    lr: float = 1e-4,
    training: str = "auto",
    batch_size: int = 8192,
    cluster_method: str | None = "hdbscan",
    min_cluster_size: int | None = None,
    resolution: float = 1.0,
    attention_layer: int = 2,
    attention_heads: bool = False,
    n_marker_genes: int = 15,
    device: str | torch.device = "auto",
    random_state: int = 0,
    progress_bar: bool | None = None,
    key_added: str = "cellvgae",
    copy: bool = False,
) -> AnnData | None:
    """Embed and cluster cells with CellVGAE, a variational graph autoencoder with graph attention.

    CellVGAE (Buterez et al., Bioinformatics 2022) encodes each cell's (min-max scaled) expression over a
    cell graph with graph-attention layers (eq. 6-7), samples ``z ~ N(mu, sigma^2)`` and reconstructs the
    graph's edges with an inner-product decoder against as many random pairs (eq. 10), regularised by a KL
    or MMD term (eq. 9). The embedding is ``mu``. Clusters are HDBSCAN's on a UMAP of ``mu`` (the paper's
    procedure; cells it leaves unassigned are labelled ``"noise"``), or Leiden's on a kNN graph of ``mu``.
    Training is full-graph (one step per epoch), as in the paper, up to 50,000 cells, and on Cluster-GCN
    minibatches of graph parts beyond (see `training`); no label is read.

    Parameters
    ----------
    adata
        Cells x genes, log-normalised (``sc.pp.normalize_total`` + ``sc.pp.log1p``), as in the paper.
    layer, use_raw
        Read expression from ``adata.layers[layer]`` or ``adata.raw`` instead of ``adata.X``.
    n_top_genes
        Node features: this many highly variable genes (Scanpy's ``seurat`` flavour on the input). ``None``
        uses ``var["highly_variable"]`` when present, else every gene.
    neighbors_key
        Use the edges of an existing ``sc.pp.neighbors`` graph (its ``key_added``; ``"neighbors"`` for the
        default) instead of building one. The edges are its neighbour pairs, unweighted.
    graph
        ``"knn"`` (Euclidean) or ``"pknn"`` (Pearson correlation) graph built here when `neighbors_key` is
        ``None``: each cell joined to its `n_neighbors` nearest cells, then made undirected. Or your own cells
        x cells adjacency matrix (its non-zeros are the edges). GAT layers add the self-loops.
    n_neighbors
        k of the graph; the paper's 5.
    graph_n_top_genes
        Build the graph on this many highly variable genes (the paper's KHVG), which may differ from the
        feature genes; ``None`` uses the feature genes. The graph sees log values, not min-max scaled ones.
    graph_use_rep
        Build the graph on ``adata.obsm[graph_use_rep]`` (e.g. ``"X_pca"``) instead of genes.
    conv
        Graph layer type: ``"gat"`` (default), ``"gatv2"`` or ``"gcn"`` (torch-geometric).
    hidden_sizes, heads, latent_size
        Per-head output size of each hidden layer (concatenated heads), heads per hidden layer and for the
        mu / log-sigma layers (which average their heads), and the latent size: the paper's (128, 128), 3,
        50.
    regularizer, regularizer_weight
        ``"kl"`` or ``"mmd"`` (eq. 9) and its weight; ``None`` means 1/N for KL (the VGAE recipe: the
        node-averaged KL over the number of nodes) and 1 for MMD.
    feature_decoder
        Add a dense decoder that reconstructs the features from z with an MSE loss (eq. 11).
    n_epochs, lr
        Adam epochs and learning rate; the paper's 200 epochs (sec. 3.7) and 1e-4.
    training, batch_size
        ``"full"``: one step per epoch on the whole graph (the paper). ``"minibatch"``: Cluster-GCN training;
        K-means on the node features cuts the cells into parts of about ``batch_size / 4`` cells, and each
        step trains on 4 random parts joined with the edges among them (every part once per epoch), so
        memory follows `batch_size`, not the number of cells. It approximates the full graph: edges between
        parts not drawn together are left out of that step, and attention normalises over the edges kept.
        Negatives are drawn within the batch; the regulariser keeps its weight per cell; node features are
        scaled and densified a batch at a time, so a sparse input stays sparse. Inference (the embedding and
        the attention written) is always exact on the whole graph, without autograd: layer by layer, over
        the batches' cells with their one-hop neighbours. With `batch_size` at least the number of cells
        both modes compute the same. ``"auto"`` trains full-graph up to 50,000 cells.
    cluster_method
        ``"hdbscan"`` (scikit-learn's, on a 2-D UMAP of mu with umap-learn's clustering settings,
        ``n_neighbors=30, min_dist=0``) or ``"leiden"`` (on a 15-nearest-neighbour graph of mu, at
        `resolution`). ``None`` skips clustering: on atlases the UMAP + HDBSCAN (or kNN + Leiden) of mu can
        take longer than training; cluster afterwards with ``sc.pp.neighbors(adata, use_rep="X_cellvgae")``
        and ``sc.tl.leiden``, and describe the clusters with `scext.tl.cellvgae_marker_genes`.
    min_cluster_size
        HDBSCAN's smallest cluster; ``None`` means ``max(10, n_cells // 100)``, 1 % of the cells.
    attention_layer
        Which graph layer's attention to store, counted from 1 over the hidden layers then the mu layer; the
        paper shows the second. Ignored for GCN, which has no attention.
    attention_heads
        Also store every head's coefficients, not only their mean.
    n_marker_genes
        Genes per cluster and latent dimension in the ``marker_genes`` table (sec. 3.4; see
        `scext.tl.cellvgae_marker_genes`).
    device, random_state, progress_bar
        As everywhere in scext. On the CPU with one thread (``torch.set_num_threads(1)``) the same
        `random_state` gives the same numbers; with more threads, parallel reductions may round differently
        from run to run (differences of about 1e-8 that UMAP + HDBSCAN can amplify). On CUDA the scatter
        operations of graph layers are not bit-reproducible.
    key_added, copy
        Prefix of every slot written; return a copy instead of writing to `adata`.

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
        ``n_clusters``, ``n_noise``, ``marker_genes`` (table; these three only when clustered), and with
        ``attention_heads=True`` ``attention_heads`` (one column per head, rows in the CSR order of the attention matrix).
    """
    start = logg.info("training CellVGAE")
    torch_device = resolve_device(device)
    custom_graph = not isinstance(graph, str)
    _check_choices(conv, regularizer, "knn" if custom_graph else graph, cluster_method)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
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
    mode = graph_training_mode(training, n_cells)
    n_graph_layers = len(hidden_sizes) + 1
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
    _, order_generator = seed_everything(random_state)

    # min-max scaling (as the paper) is applied a minibatch of rows at a time: a sparse input stays sparse
    selected = matrix if len(features) == matrix.shape[1] else matrix[:, features]
    low, high = column_min_max(selected)
    node_features = ScaledColumns(selected, low, high - low)
    parts = parts_per_batch = None
    if mode == "minibatch":
        n_parts, parts_per_batch = partition_plan(n_cells, batch_size)
        parts = graph_partition(node_features, n_parts, random_state=random_state)
        x = None
    else:
        x = dense_rows(node_features, np.arange(n_cells), torch_device)
        edges = edge_index(cell_graph, torch_device)
    net = CellVGAENet(
        len(features),
        conv=conv,
        hidden_sizes=hidden_sizes,
        heads=heads,
        latent_size=latent_size,
        feature_decoder=feature_decoder,
    ).to(torch_device)
    weight = (
        default_regularizer_weight(regularizer, n_cells) if regularizer_weight is None else regularizer_weight
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)

    def batches():
        if mode == "full":
            yield x, edges
            return
        for cells in partition_batches(parts, parts_per_batch, generator=order_generator):
            yield (
                dense_rows(node_features, cells, torch_device),
                induced_edges(cell_graph, cells).to(torch_device),
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
    # inference is exact on the whole graph, layer by layer over chunks of cells (the training parts when
    # minibatched), so memory follows a chunk's edges, not the graph's
    chunks = (
        [np.arange(n_cells)]
        if mode == "full"
        else list(partition_batches(parts, parts_per_batch, shuffle=False))
    )
    mu, attention = net.infer(
        (lambda rows: x[torch.from_numpy(rows).to(torch_device)])
        if mode == "full"
        else (lambda rows: dense_rows(node_features, rows, torch_device)),
        cell_graph,
        chunks,
        attention_layer=None if conv == "gcn" else attention_layer,
    )
    embedding = mu.cpu().numpy()
    loadings = net.gene_loadings()[0].detach().cpu().numpy()
    if attention is not None:
        attention = (attention[0].cpu().numpy(), attention[1].cpu().numpy())

    feature_names = var_names[features]
    gene_loadings, is_feature = _loadings_per_var(adata.var_names, feature_names, loadings)
    labels, clustering = None, {}
    if cluster_method is not None:
        labels = _cluster(embedding, cluster_method, min_cluster_size, resolution, random_state)
        clustering = {
            "n_clusters": int(len(labels.categories) - (NOISE in labels.categories)),
            "n_noise": int((labels == NOISE).sum()),
            "marker_genes": _marker_gene_table(embedding, labels, loadings, feature_names, n_marker_genes),
        }

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
        "params": {
            "layer": layer,
            "use_raw": bool(use_raw),
            "input": matrix_source(layer, use_raw),
            "n_top_genes": n_top_genes,
            "features": "var['highly_variable']" if uses_hvg_column else f"{len(features)} genes",
            "neighbors_key": neighbors_key,
            "graph": "custom" if custom_graph else graph if neighbors_key is None else "neighbors_key",
            "graph_source": graph_source,
            "n_neighbors": int(n_neighbors),
            "n_edges": int(cell_graph.nnz),
            "graph_n_top_genes": graph_n_top_genes,
            "graph_use_rep": graph_use_rep,
            "conv": conv,
            "hidden_sizes": np.asarray(hidden_sizes, dtype=np.int64),
            "heads": np.asarray(net.heads, dtype=np.int64),
            "latent_size": int(latent_size),
            "regularizer": regularizer,
            "regularizer_weight": float(weight),
            "feature_decoder": bool(feature_decoder),
            "n_epochs": int(n_epochs),
            "lr": float(lr),
            "training": mode,
            "batch_size": int(batch_size),
            "n_parts": int(len(np.unique(parts))) if parts is not None else 1,
            "cluster_method": cluster_method,
            "min_cluster_size": _min_cluster_size(min_cluster_size, n_cells)
            if cluster_method == "hdbscan"
            else None,
            "resolution": float(resolution),
            "n_marker_genes": int(n_marker_genes),
            "device": str(torch_device),
            "random_state": int(random_state),
            "scext_version": __version__,
        },
        "history": {name: np.asarray(values) for name, values in history.items()},
        "attention_layer": int(attention_layer) if attention is not None else None,
        **clustering,
        **extra,
    }
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


def cellvgae_marker_genes(
    adata: AnnData,
    *,
    key: str = "cellvgae",
    groupby: str | None = None,
    n_genes: int = 15,
    n_dims: int = 5,
) -> pd.DataFrame:
    """Genes that drive each cluster's latent profile, from P_mu (CellVGAE sec. 3.4).

    For each cluster, the `n_dims` latent dimensions where its mean mu departs most from all cells' (in
    standard deviations) are taken; for each such dimension the `n_genes` genes with the largest loading in
    the direction of the departure are selected, and genes are ranked by how many dimensions selected them
    (then by their summed oriented loading). This is our reading of the paper's "for each cluster, and then
    for each latent dimension, the 15 top genes": the cluster decides which dimensions count.

    Parameters
    ----------
    key
        Where `scext.tl.cellvgae` wrote its slots.
    groupby
        Clusters to describe: a column of ``adata.obs``; defaults to CellVGAE's own clusters (`key`).

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
        if not use_raw and "highly_variable" in adata.var:
            selected = np.flatnonzero(adata.var["highly_variable"].to_numpy(bool))
            if len(selected) == 0:
                raise ValueError("var['highly_variable'] selects no gene; pass n_top_genes instead.")
            return selected
        return np.arange(n_genes)
    if not 1 <= n_top_genes <= n_genes:
        raise ValueError(f"{argument}={n_top_genes} must be between 1 and the number of genes ({n_genes}).")
    if n_top_genes == n_genes:
        return np.arange(n_genes)
    import scanpy as sc

    variable = sc.pp.highly_variable_genes(
        AnnData(matrix), n_top_genes=n_top_genes, flavor="seurat", inplace=False
    )
    return np.flatnonzero(variable["highly_variable"].to_numpy(bool))


def _warn_if_counts(matrix) -> None:
    values = stored_values(matrix)[:100_000]
    if values.size and values.max() > 30 and is_integer_valued(values):
        logg.warning(
            "the input looks like raw counts; CellVGAE expects log-normalised expression "
            "(sc.pp.normalize_total, then sc.pp.log1p)."
        )


def _min_cluster_size(min_cluster_size: int | None, n_cells: int) -> int:
    return max(10, n_cells // 100) if min_cluster_size is None else int(min_cluster_size)


def _cluster(embedding, method, min_cluster_size, resolution, random_state) -> pd.Categorical:
    n_cells = embedding.shape[0]
    if method == "leiden":
        import scanpy as sc

        work = AnnData(obsm={"X_latent": embedding}, obs=pd.DataFrame(index=[str(i) for i in range(n_cells)]))
        sc.pp.neighbors(work, use_rep="X_latent", n_neighbors=min(15, n_cells - 1), random_state=random_state)
        sc.tl.leiden(
            work,
            resolution=resolution,
            random_state=random_state,
            flavor="igraph",
            n_iterations=2,
            directed=False,
        )
        codes = work.obs["leiden"].astype(int).to_numpy()
    else:
        import umap
        from sklearn.cluster import HDBSCAN

        coordinates = umap.UMAP(
            n_components=2,
            n_neighbors=min(30, n_cells - 1),
            min_dist=0.0,
            random_state=random_state,
            n_jobs=1,
        ).fit_transform(embedding)
        # copy given: scikit-learn 1.9 warns that its default changes; 2 columns cost nothing to copy
        codes = HDBSCAN(min_cluster_size=_min_cluster_size(min_cluster_size, n_cells), copy=True).fit_predict(
            coordinates
        )
    names = [str(code) for code in range(codes.max() + 1)]
    if (codes < 0).any():
        names.append(NOISE)
        codes = np.where(codes < 0, len(names) - 1, codes)
    return pd.Categorical.from_codes(codes, categories=names)


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
