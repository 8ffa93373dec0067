from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from .._utils import dense_columns, get_matrix, matrix_source, resolve_device, row_blocks, seed_everything
from .._utils._arguments import renamed_arguments
from .._utils._contract import check_adata, check_int, check_ints, check_number, claim_slots
from .._utils._device import keeps_torch_threads
from .._utils._genes import check_counts, highly_variable_column, highly_variable_genes
from .._utils._graph import knn_graph, neighbors_graph
from .._utils._pca import principal_axes
from .._utils._random import preserves_global_rng
from ..models._base import params_record
from ..models._reference import MAX_REFERENCE_CELLS
from ..models._scdefer import CENTER_INITS, ENCODERS, Scdefer, check_encoders
from ..train._graph_batches import graph_training_mode
from ._common import begin_prediction


@renamed_arguments(alpha="fusion_weight", init="center_init")
@keeps_torch_threads
@preserves_global_rng
@doc_params
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
    graph_n_pcs: int | None = 50,
    hidden_sizes: Sequence[int] = (256, 64, 24),
    decoder_sizes: Sequence[int] = (64, 256),
    fusion_weight: float = 0.1,
    hops: int = 3,
    zinb: bool = True,
    encoders: Sequence[str] = ENCODERS,
    denoised: bool = True,
    gammas: Sequence[float] = (0.3, 0.1, 0.5, 0.1),
    n_pretrain_epochs: int | None = None,
    n_epochs: int | None = None,
    pretrain_lr: float = 1e-3,
    lr: float = 1e-4,
    update_interval: int = 5,
    tol: float = 1e-3,
    center_init: str = "kmeans",
    training: str = "auto",
    batch_size: int = 1024,
    device: str | torch.device = "auto",
    random_state: int = 0,
    progress_bar: bool | None = None,
    keep_model: bool = True,
    max_reference_cells: int = MAX_REFERENCE_CELLS,
    key_added: str = "scdefer",
    copy: bool = False,
) -> AnnData | None:
    """Cluster cells from raw counts with scDEFER, a fused autoencoder / graph encoder with a ZINB decoder.

    scDEFER runs a fully connected encoder and a TAGConv graph encoder side by side over a kNN cell graph,
    feeding every layer of both the same mix of their previous outputs (weighted by `fusion_weight`), fuses
    their latents into Z, and decodes Z into the parameters of a zero-inflated negative binomial. It is
    pretrained on the ZINB likelihood of the counts and the reconstruction of the graph; then K-means
    centres on Z start a joint training with DEC-style clustering losses. Clusters are the argmax of the
    soft assignment Q. No label is read. `scext.tl.scdefer_predict` places new cells with the trained model.

    Training is full-graph up to `batch_size` cells and on Cluster-GCN minibatches beyond (see `training`). The
    :doc:`scDEFER page </methods/scdefer>` gives the equations and where scext departs from the paper
    (learning rates, graph loss, fusion).

    Parameters
    ----------
    adata
        Cells x genes of raw counts (non-negative integers). Genes without counts in any cell are left
        out, as the paper's preprocessing does (flagged ``False`` in ``var["<key_added>_modelled"]``);
        a cell without counts has no size factor and is refused.
    n_clusters
        K. ``None`` takes the number of Leiden clusters (resolution 1, unweighted 15-NN graph) of the
        pretrained Z and starts the centres at their means, instead of K-means.
    {layer}
        scDEFER reads raw counts there.
    allow_noninteger
        Proceed on non-integer values that you know to be counts on the count scale (e.g. ambient-RNA
        corrected); the ZINB likelihood is then evaluated at non-integer points. Negative values are never
        accepted.
    n_top_genes
        Genes modelled, among the genes with counts: this many highly variable genes (Scanpy's ``seurat``
        flavour on a normalised, log1p copy; all of them when there are no more). ``None``: the genes
        ``var["highly_variable"]`` flags (those with counts) when that column exists, else all genes with
        counts.
    neighbors_key
        Use the edges of an existing ``sc.pp.neighbors`` graph instead of building a kNN graph here (see
        `graph_n_pcs`).
    n_neighbors
        k of the graph built here (the paper's 10); also the number of reference cells each new cell is
        attached to by `scext.tl.scdefer_predict`.
    graph_n_pcs
        Build that graph on this many principal components of the model's input (the z-scored modelled
        genes), as Scanpy's ``pca`` + ``neighbors`` would; ``None``, or no more genes than components: on
        the log-normalised modelled genes themselves. The paper does not say which space its graph uses.
    hidden_sizes, decoder_sizes
        Encoder widths (last = latent) and decoder hidden widths from Z: 256, 64, 24 by default for
        time; the paper's 1024, 128, 24 take about twice as long (:doc:`/methods/scdefer`).
    fusion_weight
        Layer-wise fusion weight of the fully connected branch (the paper's alpha, 0.1). Formerly
        ``alpha``, which still works for one release with a `FutureWarning`.
    hops
        M, powers of the normalised adjacency in each TAGConv layer (eq. 3); the paper gives no value, 3 is
        torch-geometric's default.
    zinb
        ``False`` drops the ZINB decoder and its loss (the paper's "without ZINB" ablation); no denoised
        layer is written then.
    encoders
        ``("dense", "graph")`` builds both encoders; ``("dense",)`` or ``("graph",)`` one of them alone, the
        paper's ablations without the graph encoder and without the fully connected ("fusion cell
        topology") encoder.
    denoised
        Write the ZINB means ``(1 - pi) mu`` as ``layers["<key_added>_denoised"]``: a dense cells x genes
        float32 array (8 GB at a million cells x 2,000 genes), so turn it off for large data.
    gammas
        Weights of the graph, ZINB, KL and cross-entropy terms (eq. 21; the paper's 0.3, 0.1, 0.5, 0.1). The
        first two also weigh pretraining.
    n_pretrain_epochs, n_epochs
        Epochs of pretraining and the most epochs of joint training (the paper's 250 each; joint
        training usually stops earlier, see `tol`): one Adam step on the full graph, or one per minibatch.
        ``None`` trains about 30 and at most 100 optimizer steps: ``ceil(30 / minibatches per epoch)`` and
        ``ceil(100 / minibatches per epoch)`` epochs (30 and 100 on the full graph, 6 and 20 for 4,271
        cells in minibatches of 1,024).
    pretrain_lr, lr
        Learning rates of the two stages (the paper's 5e-5 and 1e-7; see :doc:`/methods/scdefer`).
    update_interval
        Recompute the target distributions P, P^D, P^G from the current Q every this many optimizer steps
        (on minibatches: at the first epoch start after that many steps, since P needs Q of every cell).
    tol
        Stop joint training once fewer than this fraction of the cells change cluster (argmax of Q)
        between two refreshes of the targets: DEC's stopping rule, label-free. ``0`` trains all
        `n_epochs`.
    center_init
        How the K centres start on the pretrained Z (the paper's "K-means (or spectral)"): ``"kmeans"``
        (10 k-means++ seedings, lowest inertia) or ``"spectral"`` (scikit-learn's spectral clustering on a
        10-NN affinity of Z; centres are its clusters' means). Ignored when `n_clusters` is None. Formerly
        ``init``, which still works for one release with a `FutureWarning`.
    training
        ``"full"`` graph, Cluster-GCN ``"minibatch"``, or ``"auto"``: full up to `batch_size` cells.
    batch_size
        Cells per minibatch, approximately (parts vary in size). At least the number of cells gives one
        batch of all cells, which trains exactly as ``"full"`` does. The default 1,024 costs a fifth of the
        full-graph time on 4,271 cells at the same clustering quality
        (:ref:`bench-scdefer-schedule`).
    {device}
    {random_state}
        For scDEFER on CUDA, the scatter operations of the graph layers are what is not bit-reproducible.
    {progress_bar}
    {keep_model}
        At the defaults the scDEFER model takes about 58 MB (`scext.models.Scdefer`).
    max_reference_cells
        Training cells the model keeps to place new cells (all of them when there are at most this many,
        else a sample seeded by `random_state`); see `scext.models.Scdefer`.
    {key_added}
    {copy}

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
        ZINB mean ``(1 - pi) mu`` of every modelled gene, on each cell's count scale (size factor
        included); NaN for genes not modelled. Not written with ``zinb=False`` or ``denoised=False``.
    ``var["<key_added>_modelled"]``
        Whether a gene was modelled: it has counts and was selected (a highly variable gene).
    ``uns[key_added]``
        ``params`` (every argument, then the resolved ``n_clusters``, ``center_init``,
        ``n_pretrain_epochs`` and ``n_epochs``, device and training mode, ``input``, ``n_genes``, ``n_genes_without_counts``, ``graph_source``, ``n_edges``,
        ``n_parts``, scext version),
        ``history`` (per epoch: ``pretrain_loss``, ``pretrain_graph``, ``pretrain_zinb``, then ``loss``,
        ``graph``, ``zinb``, ``kl``, ``bce_d``, ``bce_g`` of joint training), ``n_clusters``, ``beta`` (the
        learned weight of the global fusion term) and, with `keep_model`, ``model``.

    References
    ----------
    Yue Cheng, Yanchi Su, Zhuohan Yu, Yanchun Liang, Ka-Chun Wong and Xiangtao Li. Unsupervised Deep
    Embedded Fusion Representation of Single-Cell Transcriptomics. Proceedings of the AAAI Conference on
    Artificial Intelligence (AAAI-24), 2024.
    """
    arguments = dict(locals())
    start = logg.info("training scDEFER")
    check_adata(adata, "scdefer", copy=copy)
    check_ints(hidden_sizes, "hidden_sizes")
    check_ints(decoder_sizes, "decoder_sizes", allow_empty=True)
    check_int(n_neighbors, "n_neighbors")
    check_int(graph_n_pcs, "graph_n_pcs", minimum=1, allow_none=True)
    encoders = check_encoders(encoders)
    check_int(n_top_genes, "n_top_genes", minimum=2, allow_none=True)
    claim_slots(
        adata,
        "scdefer",
        key_added,
        key_added,
        [
            ("obsm", f"X_{key_added}"),
            ("obs", key_added),
            ("obsm", f"{key_added}_proba"),
            ("layers", f"{key_added}_denoised"),
            ("var", f"{key_added}_modelled"),
            ("uns", key_added),
        ],
    )
    torch_device = resolve_device(device)
    gammas = _check_arguments(
        n_clusters,
        fusion_weight,
        gammas,
        zinb,
        n_pretrain_epochs,
        n_epochs,
        pretrain_lr,
        lr,
        update_interval,
        hops,
        center_init,
        tol,
    )
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not _is_int(max_reference_cells) or max_reference_cells < 1:
        raise ValueError(f"max_reference_cells must be a positive int, got {max_reference_cells!r}.")
    matrix, var_names = get_matrix(adata, layer=layer, use_raw=use_raw)
    source = matrix_source(layer, use_raw)
    n_cells, n_genes = matrix.shape
    mode = graph_training_mode(training, n_cells, max_full_graph_cells=batch_size)
    # genes without counts carry no information and are left out before anything else, as in the paper's
    # preprocessing; a cell without counts has no size factor and is refused (as by CICL)
    with_counts = np.flatnonzero(
        check_counts(matrix, source, "scdefer", allow_noninteger=allow_noninteger, genes=True)
    )
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
    flagged = highly_variable_column(adata, use_raw) if n_top_genes is None else None
    if flagged is not None:
        flagged = np.intersect1d(flagged, with_counts)
        if len(flagged) == 0:
            raise ValueError(
                "var['highly_variable'] flags only genes without counts; pass n_top_genes instead."
            )

    import scanpy as sc

    totals = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    size_factors = (totals / np.median(totals)).astype(np.float32)
    # the genes left out hold only zeros: the cells' totals, the normalisation and its target are the same
    # with or without them
    work = sp.csr_matrix(matrix, dtype=np.float32, copy=len(with_counts) == n_genes)
    work = AnnData(work if len(with_counts) == n_genes else work[:, with_counts])
    # the target sc.pp.normalize_total takes below: the median of the float32 totals (kept for new cells)
    normalization_target = float(
        np.median(np.asarray(work.X.sum(axis=1, dtype=np.float64)).ravel().astype(np.float32))
    )
    sc.pp.normalize_total(work)
    sc.pp.log1p(work)
    # positions among the genes with counts (the columns of work), then among all genes of the matrix
    if flagged is not None:
        selected = np.searchsorted(with_counts, flagged)
    elif n_top_genes is None:
        selected = np.arange(len(with_counts))
    else:
        selected = highly_variable_genes(work.X, n_top_genes)
    genes = with_counts[selected]
    # kept sparse: the z-scoring (sc.pp.scale's, clipped at 10) is applied a minibatch of rows at a time
    log_expression = work.X if len(selected) == work.n_vars else work.X[:, selected]
    del work
    n_without_counts = n_genes - len(with_counts)
    logg.info(
        f"    modelling {len(genes)} of {n_genes} genes"
        + (f"; {n_without_counts} gene(s) without counts in {source} left out" if n_without_counts else "")
        + f" (var['{key_added}_modelled'])"
    )
    # the minibatch order has its own generator: the global stream (weights, random pairs) then draws the
    # same numbers in both modes, and one batch of all cells reproduces full-graph training
    _, order_generator = seed_everything(random_state)
    model = Scdefer(
        var_names[genes],
        layer=layer,
        use_raw=use_raw,
        hidden_sizes=hidden_sizes,
        decoder_sizes=decoder_sizes,
        fusion_weight=fusion_weight,
        hops=hops,
        n_clusters=n_clusters or 1,
        zinb=zinb,
        encoders=encoders,
        n_neighbors=n_neighbors,
        normalization_target=normalization_target,
    )
    model.fit_scaler(log_expression)
    if cell_graph is None:
        cell_graph, graph_source = _knn_graph(model, log_expression, graph_n_pcs, n_neighbors, random_state)
    else:
        graph_source = f"sc.pp.neighbors graph {neighbors_key!r}"
    result = model.fit(
        log_expression,
        # counts of the modelled genes, densified by CellGraph: whole for full-graph training (this sparse
        # copy is then dropped), else a minibatch at a time
        (matrix if len(genes) == n_genes else matrix[:, genes]) if zinb else None,
        size_factors,
        cell_graph,
        gammas=gammas,
        n_pretrain_epochs=n_pretrain_epochs,
        n_epochs=n_epochs,
        pretrain_lr=pretrain_lr,
        lr=lr,
        update_interval=update_interval,
        tol=tol,
        center_init="leiden" if n_clusters is None else center_init,
        denoised=denoised,
        training=mode,
        batch_size=batch_size,
        max_reference_cells=max_reference_cells,
        device=torch_device,
        generator=order_generator,
        random_state=random_state,
        progress_bar=progress_bar,
    )
    labels, means = result.labels, result.means

    if copy:
        adata = adata.copy()
    rows = adata.var_names.get_indexer(model.var_names)
    found = rows >= 0  # with use_raw, genes of raw that adata.var lacks have no row
    modelled = np.zeros(adata.n_vars, dtype=bool)
    modelled[rows[found]] = True
    adata.obsm[f"X_{key_added}"] = result.embedding
    adata.obs[key_added] = pd.Categorical(labels, categories=labels.categories)
    adata.obsm[f"{key_added}_proba"] = result.proba
    adata.var[f"{key_added}_modelled"] = modelled
    if means is not None:
        if found.all() and np.array_equal(rows, np.arange(adata.n_vars)):
            layer_values = means  # every gene modelled, in order: no second cells x genes array
        else:
            layer_values = np.full((adata.n_obs, adata.n_vars), np.nan, dtype=np.float32)
            layer_values[:, rows[found]] = means[:, found]
        adata.layers[f"{key_added}_denoised"] = layer_values
    adata.uns[key_added] = {
        "params": params_record(
            scdefer,
            arguments,
            n_clusters=model.n_clusters,
            center_init=result.center_init,
            gammas=gammas,
            input=source,
            n_genes=len(genes),
            n_genes_without_counts=n_without_counts,
            graph_source=graph_source,
            n_edges=int(cell_graph.nnz),
            training=mode,
            n_parts=result.n_parts,
            n_pretrain_epochs=result.n_pretrain_epochs,
            n_epochs=result.n_epochs,
            device=torch_device,
        ),
        "history": {name: np.asarray(values) for name, values in result.history.items()},
        "n_clusters": int(len(labels.categories)),
        "beta": float(model.net.beta.detach()),
    }
    if keep_model:
        adata.uns[key_added]["model"] = model.to_dict()
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


@keeps_torch_threads
@preserves_global_rng
@doc_params
def scdefer_predict(
    adata: AnnData,
    model: Scdefer | AnnData,
    *,
    key: str = "scdefer",
    allow_noninteger: bool = False,
    device: str | torch.device = "auto",
    chunk_size: int = 4096,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed new cells with a trained scDEFER model and assign them to its clusters.

    Each new cell is preprocessed as the training cells were (normalised by its total count over all genes
    of `adata` to the training target, log1p, z-scored with the training statistics), attached as a
    receiver to its nearest reference cells of the model and encoded (`scext.models.Scdefer` describes
    how). Its cluster is the argmax of its soft assignment Q to the learned centres.

    Parameters
    ----------
    adata
        New cells x genes of raw counts, read from the model's layer (or ``raw``). Must hold every
        modelled gene; extra genes are ignored for the model input but count towards each cell's total,
        as all genes of the training data did.
    {predict_model}
    allow_noninteger
        Accept non-integer values that are counts on the count scale, as in `scext.tl.scdefer`.
    {device}
    chunk_size
        New cells placed and encoded at once (with all reference cells); results do not depend on it
        beyond float rounding.
    {copy}

    Returns
    -------
    `None`, or the copy when ``copy=True``. Writes:

    ``obsm["X_<key_added>"]``
        Z of every cell.
    ``obs["<key_added>"]``
        Clusters (categorical with the reference's categories).
    ``obsm["<key_added>_proba"]``
        Q: soft assignment to each of the K centres, columns as in the reference's proba matrix.
    ``uns["<key_added>_predict"]``
        ``params`` (the arguments, resolved device, number of reference cells and of neighbours),
        ``categories``.
    """
    arguments = dict(locals())
    start = logg.info("embedding cells with a trained scDEFER model")
    reference = model
    model, torch_device, key_added = begin_prediction(
        adata,
        model,
        Scdefer,
        tool="scdefer_predict",
        key=key,
        key_added=key_added,
        device=device,
        chunk_size=chunk_size,
        copy=copy,
    )
    embedding, labels, proba = model.embed_and_predict(
        adata, device=torch_device, chunk_size=chunk_size, allow_noninteger=allow_noninteger
    )
    if copy:
        adata = adata.copy()
    adata.obsm[f"X_{key_added}"] = embedding
    adata.obs[key_added] = labels
    adata.obsm[f"{key_added}_proba"] = proba
    colors = reference.uns.get(f"{key}_colors") if isinstance(reference, AnnData) else None
    if colors is not None and len(colors) == len(model.categories):
        adata.uns[f"{key_added}_colors"] = list(colors)
    adata.uns[f"{key_added}_predict"] = {
        "params": params_record(
            scdefer_predict,
            arguments,
            key_added=key_added,
            device=torch_device,
            n_reference_cells=model.reference.n_cells,
            n_neighbors=model.n_neighbors,
        ),
        "categories": np.asarray(model.categories, dtype=object),
    }
    logg.info(
        "    finished",
        time=start,
        deep=f"added 'X_{key_added}', '{key_added}', '{key_added}_proba' (adata.obsm, adata.obs)",
    )
    return adata if copy else None


def _knn_graph(model: Scdefer, log_expression, n_pcs: int | None, n_neighbors: int, random_state: int):
    """The training graph built here and its description: k-NN on the top `n_pcs` principal components of
    the model's input (its z-scored, clipped modelled genes), or on the log-normalised genes."""
    n_cells, n_genes = log_expression.shape
    if n_pcs is None or n_genes <= min(n_pcs, n_cells - 1):
        coordinates = dense_columns(log_expression, np.arange(n_genes))
        description = f"{n_neighbors}-NN graph of the log-normalised modelled genes"
    else:
        n_pcs = min(n_pcs, n_cells - 1)
        rng = np.random.default_rng(random_state)
        axes, _ = principal_axes(log_expression, model.center, model.scale, n_pcs, rng)
        coordinates = np.concatenate([block @ axes for _, block in row_blocks(model.scaled(log_expression))])
        description = f"{n_neighbors}-NN graph of {n_pcs} principal components of the scaled modelled genes"
    return knn_graph(coordinates, n_neighbors, random_state=random_state), description


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_arguments(
    n_clusters,
    fusion_weight,
    gammas,
    zinb,
    n_pretrain_epochs,
    n_epochs,
    pretrain_lr,
    lr,
    update_interval,
    hops,
    center_init,
    tol,
) -> tuple[float, float, float, float]:
    if center_init not in CENTER_INITS:
        raise ValueError(f"center_init={center_init!r} is unknown; choose 'kmeans' or 'spectral'.")
    if n_clusters is not None and (not _is_int(n_clusters) or n_clusters < 2):
        raise ValueError(
            f"n_clusters must be an int of at least 2 (or None to take the number of Leiden clusters); "
            f"got {n_clusters!r}."
        )
    if not 0 <= fusion_weight <= 1:
        raise ValueError(f"fusion_weight={fusion_weight} must be in [0, 1] (the paper's alpha is 0.1).")
    gammas = tuple(float(g) for g in gammas)
    if len(gammas) != 4 or min(gammas) < 0:
        raise ValueError(
            f"gammas must be four non-negative weights (graph, ZINB, KL, cross-entropy); got {gammas}."
        )
    if n_pretrain_epochs != 0 and gammas[0] == 0 and not (zinb and gammas[1] > 0):
        raise ValueError(
            "pretraining has nothing to minimise: give gammas[0] or (with zinb=True) gammas[1] > 0."
        )
    for name, value in (("n_pretrain_epochs", n_pretrain_epochs), ("n_epochs", n_epochs)):
        if value is not None and (not _is_int(value) or value < 0):
            raise ValueError(f"{name} must be a non-negative int or None, got {value!r}.")
    for name, value in (("pretrain_lr", pretrain_lr), ("lr", lr)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}.")
    if not _is_int(update_interval) or update_interval < 1:
        raise ValueError(f"update_interval must be a positive int, got {update_interval!r}.")
    if not _is_int(hops) or hops < 0:
        raise ValueError(f"hops must be a non-negative int, got {hops!r}.")
    check_number(tol, "tol", low=0, high=1, open_high=True)
    return gammas
