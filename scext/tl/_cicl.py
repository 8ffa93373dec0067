from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scanpy import logging as logg

from .._docs import doc_params
from .._utils import (
    SelectedColumns,
    column_mean_var,
    get_matrix,
    matrix_source,
    resolve_device,
    row_blocks,
    seed_everything,
    stored_values,
)
from .._utils._arguments import renamed_arguments
from .._utils._contract import check_adata, check_int, check_ints, check_number, claim_slots
from .._utils._device import keeps_torch_threads
from .._utils._genes import highly_variable_column, highly_variable_genes, is_counts
from .._utils._pca import principal_axes
from .._utils._random import preserves_global_rng
from ..models import Cicl
from ..models._base import params_record
from ..models._cicl import HOMOGENEOUS_SCALE, balanced_batch_size, smallest_batch
from ..train._loop import epochs_for_steps
from ._common import begin_prediction

# below this many genes a transformer over genes-as-features has too little to attend with
MIN_GENES = 10
# n_epochs=None: enough epochs for this many optimizer steps (benchmarks: 100 scored as well as 300)
DEFAULT_STEPS = 100
# above this many input genes (without preprocessing) the model, as wide as the input, gets slow
MANY_GENES = 5000
# preprocess="auto" log-normalises non-negative values above this (log1p of 1e4-scaled counts stays below 10)
LOG_MAX = 50.0
# above this many cells, highly variable genes are chosen on a seeded sample of this many cells
HVG_MAX_CELLS = 100_000


@renamed_arguments(alpha="student_t_dof")
@keeps_torch_threads
@preserves_global_rng
@doc_params
def cicl(
    adata: AnnData,
    n_clusters: int | None = None,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    preprocess: bool | str = "auto",
    n_top_genes: int = 2000,
    n_pcs: int | None = 50,
    n_layers: int = 4,
    n_heads: int = 4,
    head_dim: int | None = None,
    feedforward_dim: int = 256,
    projection_sizes: Sequence[int] = (256, 128),
    temperature: float = 0.5,
    cluster_weight: float = 0.1,
    student_t_dof: float = 1.0,
    n_epochs: int | None = None,
    lr: float = 1e-4,
    batch_size: int = 256,
    kmeans_iter: int = 20,
    kmeans_n_init: int = 10,
    max_attention_cells: int | None = 20_000,
    device: str | torch.device = "auto",
    random_state: int = 0,
    progress_bar: bool | None = None,
    key_added: str = "cicl",
    keep_model: bool = True,
    copy: bool = False,
) -> AnnData | None:
    """Cluster cells with CICL, cluster-aware iterative contrastive learning.

    CICL trains a transformer encoder whose tokens are the cells of a minibatch. At every step two noisy
    views of the minibatch are drawn, K-means on the clean minibatch's representation H gives pseudo-labels
    through a Student-t assignment, and the views' projections are trained with an instance-wise contrastive loss plus
    `cluster_weight` times a cluster-aware one. The final labels are K-means on H of all cells. No label in
    ``adata.obs`` is read. The input is the z-scored highly variable genes projected onto their top `n_pcs`
    principal axes plus one constant coordinate. The :doc:`CICL page </methods/cicl>` gives the equations and
    why scext's input and training schedule differ from the paper's.

    At inference every cell attends to all cells of `adata`, in chunks (exact; the embedding does not
    depend on the order of the cells or on any batch split); above `max_attention_cells` cells, to a seeded
    sample of that many. Input is streamed: a backed AnnData is never loaded whole.

    Parameters
    ----------
    adata
        Cells x genes: raw counts, or processed values (see `preprocess`).
    n_clusters
        Number of clusters K (required): of the per-step K-means and of the final labels.
    {layer}
    preprocess
        ``True``: the paper's preprocessing on a copy, with Scanpy: drop genes without counts,
        ``normalize_total`` (to the median library size), ``log1p``, keep the `n_top_genes` genes of highest
        normalised dispersion (``flavor="seurat"``), z-score each gene. ``False``: use the values as given
        (e.g. log-normalised highly variable genes), z-scored per gene. ``"auto"``: ``True`` when the matrix
        holds non-negative integers or non-negative values above 50 (RPKM, TPM); else ``False``.
    n_top_genes
        Genes kept by the preprocessing (the paper's 500); all genes when there are fewer. ``None``: the genes
        ``var["highly_variable"]`` flags when that column exists, else all.
    n_pcs
        Principal components of the z-scored genes that, with one constant coordinate, are the transformer's
        input. ``None``, or no more genes than `n_pcs`: the z-scored genes themselves, as in the paper.
    n_layers, n_heads, head_dim, feedforward_dim, projection_sizes
        Transformer layers (the paper's 4), attention heads and their width (default width // heads),
        feed-forward width (width -> feedforward_dim -> width) and projection head sizes.
    temperature, cluster_weight, student_t_dof
        Temperature T of both contrastive losses (the paper's 0.5), the weight lambda of the cluster-aware
        loss (0.1; 0 drops it, the paper's ablation) and the Student-t degrees of freedom (the paper's
        alpha, 1).
    n_epochs, lr, batch_size
        Adam training on near-equal minibatches of at most `batch_size` cells. ``n_epochs=None`` trains for
        about 100 optimizer steps: ``ceil(100 / minibatches per epoch)`` epochs (100 epochs up to 256 cells,
        6 at 4,271, one from 25,600 cells on).
    kmeans_iter, kmeans_n_init
        Lloyd iterations of the per-step K-means, and seedings of the final K-means.
    max_attention_cells
        Inference is exact (every cell attends to every cell) up to this many cells; above, every cell attends
        to a seeded sample of this many reference cells. ``None``: always exact.
    device
        ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a `torch.device`.
        Training, K-means and inference all stay on it; results are copied to the CPU once, at the end.
    random_state
        Seeds the weights, the minibatch order, the noise and every K-means seeding. Runs on the CPU are
        reproducible bit for bit; on CUDA, results agree to float tolerance only.
    {progress_bar}
    {key_added}
    {keep_model}
        The model holds its weights, the principal axes, the final centres and up to 5,000 training cells'
        transformer input (`scext.models.Cicl`): about 2 MB at the defaults.
    {copy}

    Returns
    -------
    `None`, or the copy when ``copy=True``. Writes:

    ``obsm["X_<key_added>"]``
        H, the transformer's representation of every cell (``n_pcs + 1`` wide, or as wide as the genes used
        when they are the input).
    ``obs["<key_added>"]``
        Cluster labels ``"0"`` ... ``"K-1"`` (categorical), from K-means on H.
    ``obsm["<key_added>_proba"]``
        Student-t soft assignment q of every cell to the final K-means centres.
    ``uns[key_added]``
        ``params`` (all arguments; the resolved ``device``, ``input`` matrix, ``preprocessing`` applied,
        ``n_genes`` and ``n_pcs`` used, the ``width`` of H, effective minibatch sizes, ``n_steps``;
        ``random_state``; ``scext_version``), ``genes`` (the genes used, in order), ``history`` (``loss``,
        ``instance``, ``cluster`` per epoch) and, with `keep_model`, ``model``
        (`scext.models.Cicl.from_adata` rebuilds it; `scext.tl.cicl_predict` uses it).

    References
    ----------
    Weikang Jiang, Jinxian Wang, Jihong Guan and Shuigeng Zhou. scRNA-seq Data Clustering by Cluster-aware
    Iterative Contrastive Learning. arXiv:2312.16600, 2023.
    """
    arguments = dict(locals())
    start = logg.info("clustering cells with CICL")
    check_adata(adata, "cicl", copy=copy)
    check_int(n_layers, "n_layers", minimum=0)
    check_int(n_pcs, "n_pcs", allow_none=True)
    check_int(n_heads, "n_heads")
    check_int(head_dim, "head_dim", allow_none=True)
    check_int(feedforward_dim, "feedforward_dim")
    check_ints(projection_sizes, "projection_sizes")
    check_int(kmeans_iter, "kmeans_iter")
    check_int(kmeans_n_init, "kmeans_n_init")
    check_number(temperature, "temperature", low=0, open_low=True)
    check_number(student_t_dof, "student_t_dof", low=0, open_low=True)
    check_number(lr, "lr", low=0, open_low=True)
    claim_slots(adata, "cicl", key_added, key_added, _slots(key_added))
    torch_device = resolve_device(device)
    matrix, var_names = get_matrix(adata, layer=layer, use_raw=use_raw, backed=True)
    n_cells = matrix.shape[0]
    _check_arguments(n_clusters, n_cells, batch_size, n_top_genes, preprocess, cluster_weight, n_epochs)
    if max_attention_cells is not None and (
        not isinstance(max_attention_cells, (int, np.integer)) or max_attention_cells < 1
    ):
        raise ValueError(f"max_attention_cells must be a positive int or None, got {max_attention_cells!r}.")
    if n_epochs is None:
        n_epochs = default_n_epochs(n_cells, batch_size)
    if matrix.shape[1] < MIN_GENES:
        raise ValueError(
            f"{matrix_source(layer, use_raw)} has {matrix.shape[1]} genes; CICL needs at least {MIN_GENES}. "
            "Pass the full gene matrix (e.g. a layer or adata.raw), not a handful of features."
        )
    rng, generator = seed_everything(random_state)
    data, genes, scaler, preprocessing, size_factor_median = _prepare(
        matrix,
        var_names,
        preprocess,
        n_top_genes,
        layer,
        use_raw,
        rng,
        flagged=highly_variable_column(adata, use_raw) if n_top_genes is None else None,
    )
    # noise and K-means seeding draw on the device itself, so a GPU run never waits on the host
    step_generator = torch.Generator(device=torch_device)
    step_generator.manual_seed(int(rng.integers(2**62)))

    components, homogeneous = _principal_axes(data, scaler, n_pcs, rng)
    model = Cicl(
        data.shape[1],
        n_clusters,
        n_layers=n_layers,
        n_heads=n_heads,
        head_dim=head_dim,
        feedforward_dim=feedforward_dim,
        projection_sizes=projection_sizes,
        temperature=temperature,
        cluster_weight=cluster_weight,
        student_t_dof=student_t_dof,
        kmeans_iter=kmeans_iter,
        var_names=genes,
        layer=layer,
        use_raw=use_raw,
        size_factor_median=size_factor_median,
        n_pcs=None if components is None else components.shape[1],
    )
    model.set_scaler(*scaler)
    if components is not None:
        model.set_projection(components, homogeneous)
    history = model.fit(
        data,
        n_epochs=n_epochs,
        lr=lr,
        batch_size=batch_size,
        device=torch_device,
        generator=generator,
        step_generator=step_generator,
        progress_bar=progress_bar,
    )
    h = model.embed(data, torch_device, reference_size=max_attention_cells, generator=rng)
    labels, proba, _ = model.cluster(h, n_init=kmeans_n_init, generator=step_generator)
    embedding, labels, proba = h.cpu().numpy(), labels.cpu().numpy(), proba.cpu().numpy()
    head_dim_used = model.net.layers[0].attention.head_dim if n_layers else None
    model.keep_reference(data, rng)

    if copy:
        adata = adata.copy()
    adata.obsm[f"X_{key_added}"] = embedding
    adata.obs[key_added] = pd.Categorical.from_codes(labels, categories=[str(k) for k in range(n_clusters)])
    adata.obsm[f"{key_added}_proba"] = proba
    params = params_record(
        cicl,
        arguments,
        n_clusters=n_clusters,
        input=matrix_source(layer, use_raw),
        preprocessing=preprocessing,
        n_genes=data.shape[1],
        n_pcs=model.n_pcs,  # as used (None: the genes themselves are the input)
        width=model.width,
        head_dim=head_dim_used,
        n_epochs=n_epochs,  # as trained (resolved when None was passed)
        effective_batch_size=balanced_batch_size(n_cells, batch_size),
        n_steps=n_epochs * -(-n_cells // balanced_batch_size(n_cells, batch_size)),
        smallest_batch=smallest_batch(n_cells, batch_size),
        inference=(
            "whole data set as one batch (exact attention over all cells, in query chunks)"
            if max_attention_cells is None or n_cells <= max_attention_cells
            else f"attention to a seeded reference sample of {max_attention_cells} cells"
        ),
        device=torch_device,
    )
    adata.uns[key_added] = {
        "params": params,
        "genes": np.asarray(genes, dtype=object),
        "history": {name: np.asarray(values) for name, values in history.items()},
        **({"model": model.to_dict()} if keep_model else {}),
    }
    logg.info(
        "    finished",
        time=start,
        deep=(
            f"added\n    'X_{key_added}', CICL representation (adata.obsm)\n"
            f"    '{key_added}_proba', Student-t assignment (adata.obsm)\n"
            f"    '{key_added}', cluster labels (adata.obs)\n    '{key_added}' (adata.uns)"
        ),
    )
    return adata if copy else None


@keeps_torch_threads
@preserves_global_rng
@doc_params
def cicl_predict(
    adata: AnnData,
    model: Cicl | AnnData,
    *,
    key: str = "cicl",
    device: str | torch.device = "auto",
    chunk_size: int | None = None,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Embed new cells with a trained CICL model and assign them to its clusters.

    Each new cell attends, at every layer, to the model's reference cells (up to 5,000 training cells kept
    by `scext.tl.cicl`), never to the other new cells, so its embedding does not depend on which cells come
    with it; its cluster is the nearest of the final K-means centres, as in training.

    Parameters
    ----------
    adata
        New cells in the units the model was trained on: counts when `scext.tl.cicl` normalised its input
        (they are normalised here the same way), else the processed values. Every gene of the model must be
        present; extra genes are ignored and the order may differ.
    {predict_model}
    {device}
    chunk_size
        New cells embedded at once; results do not depend on it.
    {copy}

    Returns
    -------
    `None`, or the copy when ``copy=True``. Writes ``obsm["X_<key_added>"]``, ``obs["<key_added>"]`` and
    ``obsm["<key_added>_proba"]`` as `scext.tl.cicl` does, and ``uns["<key_added>_predict"]["categories"]``.
    """
    arguments = dict(locals())
    start = logg.info("placing cells with a trained CICL model")
    model, torch_device, key_added = begin_prediction(
        adata,
        model,
        Cicl,
        tool="cicl_predict",
        key=key,
        key_added=key_added,
        device=device,
        chunk_size=chunk_size,
        copy=copy,
    )
    embedding, labels, proba = model.embed_and_predict(adata, device=torch_device, chunk_size=chunk_size)
    if copy:
        adata = adata.copy()
    adata.obsm[f"X_{key_added}"] = embedding
    adata.obs[key_added] = labels
    adata.obsm[f"{key_added}_proba"] = proba
    adata.uns[f"{key_added}_predict"] = {
        "params": params_record(cicl_predict, arguments, key_added=key_added, device=torch_device),
        "categories": np.asarray(labels.categories, dtype=object),
    }
    logg.info("    finished", time=start, deep=f"added 'X_{key_added}', '{key_added}', '{key_added}_proba'")
    return adata if copy else None


def _slots(key_added: str) -> list[tuple[str, str]]:
    """The slots `cicl` writes under `key_added`."""
    return [
        ("obsm", f"X_{key_added}"),
        ("obs", key_added),
        ("obsm", f"{key_added}_proba"),
        ("uns", key_added),
    ]


def default_n_epochs(n_cells: int, batch_size: int) -> int:
    """Epochs that ``n_epochs=None`` trains: at least DEFAULT_STEPS optimizer steps, whole epochs."""
    return epochs_for_steps(DEFAULT_STEPS, -(-n_cells // batch_size))


def _check_arguments(n_clusters, n_cells, batch_size, n_top_genes, preprocess, cluster_weight, n_epochs):
    if n_clusters is None:
        raise ValueError("n_clusters is required: pass the number of clusters K, e.g. n_clusters=8.")
    if not isinstance(n_clusters, (int, np.integer)) or isinstance(n_clusters, bool):
        raise ValueError(f"n_clusters must be an int, got {n_clusters!r}.")
    if not 2 <= n_clusters <= n_cells:
        raise ValueError(
            f"n_clusters={n_clusters} must be at least 2 and at most the number of cells ({n_cells})."
        )
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if smallest_batch(n_cells, batch_size) < n_clusters:
        raise ValueError(
            f"batch_size={batch_size} gives minibatches of {smallest_batch(n_cells, batch_size)} cells, fewer "
            f"than n_clusters={n_clusters}; the per-step K-means needs at least K cells. Raise batch_size."
        )
    if n_top_genes is not None and (
        not isinstance(n_top_genes, (int, np.integer)) or n_top_genes < MIN_GENES
    ):
        raise ValueError(f"n_top_genes must be an int of at least {MIN_GENES}, or None; got {n_top_genes!r}.")
    if preprocess not in (True, False, "auto"):
        raise ValueError(f"preprocess must be True, False or 'auto', got {preprocess!r}.")
    if cluster_weight < 0:
        raise ValueError(f"cluster_weight (lambda) must be >= 0, got {cluster_weight}.")
    if n_epochs is not None and (not isinstance(n_epochs, (int, np.integer)) or n_epochs < 0):
        raise ValueError(f"n_epochs must be a non-negative int, got {n_epochs!r}.")


def _prepare(matrix, var_names, preprocess, n_top_genes, layer, use_raw, rng, flagged=None):
    """The model input, its genes, the per-gene z-scoring (centre, scale), a description of what was done,
    and the median library size the size factors divide by (None without preprocessing).

    Every pass over `matrix` is streamed in row blocks, so backed input is never read whole; the input kept
    for training is the sparse log-normalised matrix of the selected genes, z-scored per minibatch. With
    ``n_top_genes=None``, the genes are `flagged` (``var["highly_variable"]``) when given, else all.
    """
    source = matrix_source(layer, use_raw)
    n_cells, n_genes = matrix.shape
    if preprocess == "auto":
        preprocess = _unlogged_abundances(matrix)
    if not preprocess:
        if n_genes > MANY_GENES:
            logg.warning(
                f"{source} has {n_genes} genes and preprocess=False: every one is z-scored and projected "
                "(with n_pcs=None the model is as wide as the input); select highly variable genes first, "
                "or pass counts with preprocess=True."
            )
        if flagged is not None:
            matrix, var_names = SelectedColumns(matrix, flagged), var_names[flagged]
        center, var = column_mean_var(matrix, ddof=1)
        scale = np.sqrt(var)
        scale[scale == 0] = 1.0
        genes_used = ", genes of var['highly_variable']" if flagged is not None else ""
        return matrix, var_names, (center, scale), f"none ({source} used as given{genes_used}), z-score", None
    # one pass over the data for the sign check and both sums (a backed matrix is read from disk each pass)
    totals, gene_totals, lowest = np.zeros(n_cells), np.zeros(n_genes), np.inf
    for rows, block in row_blocks(matrix):
        values = stored_values(block)
        lowest = min(lowest, float(values.min())) if values.size else lowest
        totals[rows] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        gene_totals += np.asarray(block.sum(axis=0, dtype=np.float64)).ravel()
    if lowest < 0:
        raise ValueError(
            f"preprocess=True needs non-negative counts, but {source} holds negative values; pass the count "
            "layer (layer='counts'), or preprocess=False for values that are already processed."
        )
    if (totals <= 0).any():
        raise ValueError(
            f"{int((totals <= 0).sum())} cell(s) have no counts in {source}, so they have no size factor; "
            "remove them first with sc.pp.filter_cells(adata, min_counts=1)."
        )
    expressed = np.flatnonzero(gene_totals > 0)
    if len(expressed) < MIN_GENES:
        raise ValueError(
            f"{source} has {len(expressed)} genes with counts; CICL needs at least {MIN_GENES}. Pass the full "
            "gene matrix."
        )
    # sec. 2.1: divide by size factors (library size / median, as sc.pp.normalize_total), natural log1p
    size_factors = totals / np.median(totals)

    def log_normalised(rows, columns):
        blocks = [
            sp.csr_matrix(
                sp.diags(1 / size_factors[chunk]) @ sp.csr_matrix(block[:, columns], dtype=np.float32)
            )
            for chunk, block in row_blocks(matrix, rows)
        ]
        out = (
            sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(columns)), dtype=np.float32)
        )
        out = out.astype(np.float32)
        np.log1p(out.data, out=out.data)
        return out

    if n_top_genes is None and flagged is not None:
        expressed = np.intersect1d(expressed, flagged)
    n_selected = len(expressed) if n_top_genes is None else min(n_top_genes, len(expressed))
    sampled = n_cells > HVG_MAX_CELLS
    if n_selected < len(expressed):
        # Scanpy's own HVG selection (normalised dispersion, flavour seurat), on a seeded sample of an atlas
        rows = np.sort(rng.choice(n_cells, HVG_MAX_CELLS, replace=False)) if sampled else None
        genes = expressed[highly_variable_genes(log_normalised(rows, expressed), n_selected)]
    else:
        genes = expressed
    data = log_normalised(None, genes)
    # z-score as sc.pp.scale does (unbiased variance; constant genes left at zero), applied per minibatch
    center, var = column_mean_var(data, ddof=1)
    scale = np.sqrt(var)
    scale[scale == 0] = 1.0
    description = (
        f"sec. 2.1 on {source}: genes with counts, size factors (normalize_total), log1p, "
        + (
            f"{len(genes)} genes of var['highly_variable']"
            if n_top_genes is None and flagged is not None
            else f"top {len(genes)} genes by normalised dispersion (seurat"
            + (f", on {HVG_MAX_CELLS:,} sampled cells" if sampled and len(genes) < len(expressed) else "")
            + ")"
        )
        + ", z-score"
    )
    return data, var_names[genes], (center, scale), description, float(np.median(totals))


def _unlogged_abundances(matrix) -> bool:
    """``preprocess="auto"``: counts (non-negative whole numbers), or non-negative values above
    `LOG_MAX` that no log-normalised matrix holds (RPKM, TPM, CPM), streamed in row blocks."""
    if is_counts(matrix):
        return True
    low, high = np.inf, -np.inf
    for _, block in row_blocks(matrix):
        values = stored_values(block)
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    return low >= 0 and high > LOG_MAX


def _principal_axes(data, scaler, n_pcs, rng, max_cells: int = HVG_MAX_CELLS):
    """The top `n_pcs` principal axes (genes x n_pcs, float32) of the z-scored `data`
    (`scext._utils._pca.principal_axes`), and the constant coordinate appended to the scores
    (`HOMOGENEOUS_SCALE` times their root-mean-square norm); ``(None, None)`` when `n_pcs` is None or the
    genes are no more than the components (the genes are then the input).
    """
    n_cells, n_genes = data.shape
    if n_pcs is None:
        return None, None
    n_pcs = min(n_pcs, n_cells - 1)
    if n_genes <= n_pcs:
        return None, None
    axes, squared_norms = principal_axes(data, *scaler, n_pcs, rng, max_cells=max_cells)
    n_used = min(n_cells, max_cells)
    rms_norm = float(np.sqrt(float(np.sum(squared_norms)) / n_used))
    return axes, HOMOGENEOUS_SCALE * max(rms_norm, 1e-6)
