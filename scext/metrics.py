"""Evaluation: clustering agreement, and discriminative power and redundancy of gene panels (KRATOS sec. 6)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scanpy import logging as logg
from scipy.stats import expon
from sklearn import metrics as skm
from sklearn.model_selection import RandomizedSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from ._utils import get_matrix, matrix_source

__all__ = ["clustering_scores", "compare_panels", "panel_auroc", "panel_redundancy", "svm_auroc"]

# silhouette is O(n^2); above this many cells it is estimated on a seeded subsample
SILHOUETTE_MAX_CELLS = 5000


def clustering_scores(
    labels_true, labels_pred=None, embedding: np.ndarray | None = None, random_state: int = 0
) -> dict[str, float]:
    """ARI, AMI and NMI of `labels_pred` against `labels_true`, and the silhouette of `embedding`.

    Parameters
    ----------
    labels_true
        Reference labels, one per cell.
    labels_pred
        Predicted labels (e.g. ``adata.obs["cicl"]``), or None.
    embedding
        Cells x dimensions, or None. The silhouette groups it by `labels_true` (how well the embedding
        separates the known classes), on at most 5,000 cells.
    random_state
        Seeds the subsample of the silhouette.

    Returns
    -------
    ``{"ari", "ami", "nmi", "silhouette"}``; keys whose input is missing are left out.
    """
    labels_true = np.asarray(labels_true).astype(str)
    scores: dict[str, float] = {}
    if labels_pred is not None:
        labels_pred = np.asarray(labels_pred).astype(str)
        scores["ari"] = float(skm.adjusted_rand_score(labels_true, labels_pred))
        scores["ami"] = float(skm.adjusted_mutual_info_score(labels_true, labels_pred))
        scores["nmi"] = float(skm.normalized_mutual_info_score(labels_true, labels_pred))
    if embedding is not None and 1 < len(np.unique(labels_true)) < len(labels_true):
        scores["silhouette"] = float(
            skm.silhouette_score(
                embedding,
                labels_true,
                sample_size=min(len(labels_true), SILHOUETTE_MAX_CELLS),
                random_state=random_state,
            )
        )
    return scores


# ---------------------------------------------------------------------------------------------------------
# Gene panels (KRATOS sec. 6.2, Fig. 4 and 5)

_N_FOLDS = 3
# every class needs a few members in each inner training fold of the nested 3 x 3 cross-validation
_MIN_CLASS_SIZE = 2 * _N_FOLDS


def svm_auroc(X: np.ndarray, y, *, n_iter: int = 10, n_jobs: int = 1, random_state: int = 0) -> float:
    """Cross-validated AUROC of an RBF-kernel SVM separating `y == True` from the rest.

    3-fold stratified outer cross-validation; in each outer training fold, `C ~ Exp(scale=100)` and
    `gamma ~ Exp(scale=0.1)` are tuned by random search (`n_iter` draws, 3-fold stratified inner CV,
    ROC AUC). Features are standardised inside the pipeline, so scaling is fitted on training cells only.
    The paper calls the bandwidth sigma; its Exp(0.1) prior is put here on scikit-learn's `gamma` in
    `exp(-gamma * ||x - x'||^2)`. With the same `random_state`, the first draws of a larger `n_iter` are
    those of a smaller one, so raising `n_iter` only adds candidates.

    Parameters
    ----------
    X
        Cells x features, dense.
    y
        Boolean label per cell (`True` = the target group).
    n_iter
        Hyperparameter draws per outer fold.
    n_jobs
        Workers for the inner search.
    random_state
        Seeds the outer and inner splits and the hyperparameter draws.

    Returns
    -------
    Mean over the outer folds of the AUROC of `decision_function` on the held-out fold.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=bool)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X must be cells x features with one label per cell; got X {X.shape}, y {y.shape}.")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if min(n_pos, n_neg) < _MIN_CLASS_SIZE:
        raise ValueError(
            f"Both classes need at least {_MIN_CLASS_SIZE} cells for nested 3-fold cross-validation; "
            f"got {n_pos} in the group and {n_neg} in the rest."
        )
    if not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}.")
    rng = np.random.default_rng(random_state)
    seeds = rng.integers(0, 2**31 - 1, size=1 + 2 * _N_FOLDS)
    outer = StratifiedKFold(n_splits=_N_FOLDS, shuffle=True, random_state=int(seeds[0]))
    aucs = []
    for i, (train, test) in enumerate(outer.split(X, y)):
        search = RandomizedSearchCV(
            make_pipeline(StandardScaler(), SVC(kernel="rbf")),
            param_distributions={"svc__C": expon(scale=100), "svc__gamma": expon(scale=0.1)},
            n_iter=n_iter,
            scoring="roc_auc",
            cv=StratifiedKFold(n_splits=_N_FOLDS, shuffle=True, random_state=int(seeds[1 + 2 * i])),
            n_jobs=n_jobs,
            random_state=int(seeds[2 + 2 * i]),
            error_score="raise",
        )
        search.fit(X[train], y[train])
        aucs.append(skm.roc_auc_score(y[test], search.decision_function(X[test])))
    return float(np.mean(aucs))


def _ranking(adata: AnnData, key: str) -> tuple[dict[str, np.ndarray], dict]:
    """Ranked gene names per group, and the params, from a rank_genes_groups-style `uns[key]`."""
    if key not in adata.uns:
        raise KeyError(
            f"key={key!r} is not in adata.uns; run scext.tl.rank_genes_perturbation or "
            f"sc.tl.rank_genes_groups first (with key_added={key!r})."
        )
    result = adata.uns[key]
    if not hasattr(result, "keys") or "names" not in result:
        raise KeyError(
            f"adata.uns[{key!r}] has no 'names'; it is not a gene ranking from "
            "scext.tl.rank_genes_perturbation or sc.tl.rank_genes_groups."
        )
    names = result["names"]
    if isinstance(names, pd.DataFrame):
        columns = {str(g): names[g].to_numpy() for g in names.columns}
    elif getattr(getattr(names, "dtype", None), "names", None):
        columns = {str(g): np.asarray(names[g]) for g in names.dtype.names}
    else:
        raise ValueError(f"adata.uns[{key!r}]['names'] must be a structured array with one field per group.")
    ranking = {}
    for group, genes in columns.items():
        # sc.tl.filter_rank_genes_groups blanks filtered genes with NaN; the order of the rest still holds
        keep = pd.notna(genes)
        ranking[group] = np.asarray([g.decode() if isinstance(g, bytes) else str(g) for g in genes[keep]])
    params = dict(result.get("params", {}))
    return ranking, params


def _resolve_source(params: dict, layer: str | None, use_raw: bool | None) -> tuple[str | None, bool]:
    """Read the matrix the ranking was made from unless the caller says otherwise."""
    if use_raw is None:
        use_raw = False if layer is not None else bool(params.get("use_raw", False))
    if layer is None and not use_raw:
        layer = params.get("layer")
    return layer, bool(use_raw)


def _gene_indices(genes: np.ndarray, var_names: pd.Index, key: str, source: str) -> np.ndarray:
    if not var_names.is_unique:
        raise ValueError(f"The gene names of {source} are not unique; run adata.var_names_make_unique().")
    idx = var_names.get_indexer(genes)
    if (idx < 0).any():
        missing = list(genes[idx < 0][:5])
        raise KeyError(
            f"{int((idx < 0).sum())} gene(s) ranked in adata.uns[{key!r}] are not in {source} "
            f"(e.g. {missing}); pass the layer/use_raw the ranking was made from."
        )
    return idx


def _panel_size(fraction: float, n_genes: int) -> int:
    # nearest integer, halves up (Python's round() would send 2.5 to 2), and never an empty panel
    return max(1, int(np.floor(fraction * n_genes + 0.5)))


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fractions = tuple(float(f) for f in np.atleast_1d(fractions))
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions must be numbers in (0, 1], got {fractions!r}.")
    return fractions


def _group_seed(random_state: int, group: str) -> int:
    # a seed per group, not per call order: every fraction and every method is then scored on the same
    # splits for a group, so their differences are not split noise
    rng = np.random.default_rng([int(random_state), zlib.crc32(group.encode())])
    return int(rng.integers(0, 2**31 - 1))


def _groups_and_labels(adata: AnnData, groupby: str | None, params: dict, key: str):
    groupby = params.get("groupby") if groupby is None else groupby
    if groupby is None:
        raise ValueError(f"adata.uns[{key!r}]['params'] names no groupby; pass groupby=.")
    if groupby not in adata.obs:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs.")
    column = adata.obs[groupby]
    return groupby, column.astype(str).to_numpy(), column.notna().to_numpy()


def panel_auroc(
    adata: AnnData,
    key: str,
    *,
    groupby: str | None = None,
    reference: str | None = None,
    fractions: Sequence[float] = (0.001, 0.01, 0.05),
    n_iter: int = 10,
    min_cells: int = 40,
    layer: str | None = None,
    use_raw: bool | None = None,
    n_jobs: int = 1,
    random_state: int = 0,
) -> pd.DataFrame:
    """Discriminative power of each group's top-ranked genes: AUROC of an RBF-SVM, group vs its reference.

    For each group of the ranking in `adata.uns[key]` with at least `min_cells` cells, and each fraction
    `f`, the top `k = max(1, round(f * n_genes))` genes (`n_genes` = genes in the matrix) are the features
    of a two-class problem scored by :func:`svm_auroc` (KRATOS sec. 6.2, Fig. 5): the group against all
    other labelled cells for a one-vs-rest ranking, and against the cells of the reference group only for
    a ranking made against one `reference` (``params['reference']``, as `sc.tl.rank_genes_groups` and
    `scext.tl.rank_genes_perturbation` record it). Cells whose `groupby` label is missing are left out.

    Parameters
    ----------
    adata
        Annotated data matrix.
    key
        `adata.uns` key of a ranking in `sc.tl.rank_genes_groups` layout (from
        `scext.tl.rank_genes_perturbation` or `sc.tl.rank_genes_groups`, any method).
    groupby
        `adata.obs` column with the groups; defaults to the ranking's `params['groupby']`.
    reference
        ``"rest"`` or a group of `groupby` to score each group against; defaults to the ranking's
        `params['reference']` (``"rest"`` when it records none). Pass ``"rest"`` to score a one-vs-one
        ranking against all other cells.
    fractions
        Panel sizes as fractions of all genes in the matrix.
    n_iter
        Hyperparameter draws of the random search in each outer fold; more is slower and rarely better.
    min_cells
        Groups (and rests or references) with fewer cells are skipped, as the paper skips classes under 40
        cells.
    layer, use_raw
        Expression matrix; default to the ranking's params. Sparse input stays sparse; only the panel's
        columns are densified.
    n_jobs
        Workers for the hyperparameter search.
    random_state
        Seeds splits and draws; a group gets the same splits for every fraction and every ranking.

    Returns
    -------
    Long table with columns `group`, `fraction`, `n_genes` (the actual panel size, smaller than `k` when
    the stored ranking is shorter), `auroc` (mean over the 3 outer folds; NaN for an empty ranking) and
    `n_cells` (cells in the group). A one-vs-one ranking's entry for the reference group itself, if any, is
    skipped.
    """
    ranking, params = _ranking(adata, key)
    fractions = _check_fractions(fractions)
    if not isinstance(min_cells, (int, np.integer)) or min_cells < _MIN_CLASS_SIZE:
        raise ValueError(f"min_cells must be an int >= {_MIN_CLASS_SIZE}, got {min_cells!r}.")
    if not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive int, got {n_iter!r}.")
    groupby, labels, labelled = _groups_and_labels(adata, groupby, params, key)
    reference = str(params.get("reference") or "rest") if reference is None else str(reference)
    if reference != "rest" and not (labelled & (labels == reference)).any():
        raise KeyError(
            f"reference={reference!r} has no cells in adata.obs[{groupby!r}]; pass reference='rest' or a "
            "group of that column."
        )
    layer, use_raw = _resolve_source(params, layer, use_raw)
    source = matrix_source(layer, use_raw)
    matrix, var_names = get_matrix(adata, layer=layer, use_raw=use_raw)
    n_genes_total = matrix.shape[1]
    sizes = [_panel_size(f, n_genes_total) for f in fractions]

    # validate every group before the (slow) fitting starts
    absent = [g for g in ranking if not (labelled & (labels == g)).any()]
    if absent:
        raise KeyError(
            f"Group(s) {absent} of adata.uns[{key!r}] have no cells in adata.obs[{groupby!r}]; "
            "was the ranking made with another groupby?"
        )
    indices = {g: _gene_indices(genes[: max(sizes)], var_names, key, source) for g, genes in ranking.items()}

    against = "rest" if reference == "rest" else f"reference {reference!r}"
    start = logg.info(f"scoring gene panels of {key!r} by SVM AUROC ({len(ranking)} groups vs {against})")
    rows, skipped = [], []
    for group, idx in indices.items():
        # the cells of the two-class problem: the group and the rest, or the group and the reference
        cells = labelled if reference == "rest" else labelled & ((labels == group) | (labels == reference))
        is_group = labels[cells] == group
        n_pos, n_neg = int(is_group.sum()), int((~is_group).sum())
        if group == reference or min(n_pos, n_neg) < min_cells:
            skipped.append(group)
            continue
        # select the panel's columns while still sparse, so only k columns are ever densified
        panel = matrix[:, idx]
        panel = (panel.toarray() if sp.issparse(panel) else np.asarray(panel))[cells]
        seed = _group_seed(random_state, group)
        for fraction, k in zip(fractions, sizes, strict=True):
            k_used = min(k, len(idx))
            if k_used == 0:  # every gene filtered out (sc.tl.filter_rank_genes_groups): nothing to score
                auroc = float("nan")
            else:
                auroc = svm_auroc(
                    panel[:, :k_used], is_group, n_iter=n_iter, n_jobs=n_jobs, random_state=seed
                )
            rows.append(
                {"group": group, "fraction": fraction, "n_genes": k_used, "auroc": auroc, "n_cells": n_pos}
            )
    if skipped:
        logg.info(
            f"    skipped group(s) with fewer than {min_cells} cells in the group or the {against} "
            f"(or the reference itself): {skipped}"
        )
    logg.info("    finished", time=start)
    return pd.DataFrame(rows, columns=["group", "fraction", "n_genes", "auroc", "n_cells"])


def _gene_mean_std(matrix, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std over cells of the columns `idx`, two-pass, without densifying."""
    n = matrix.shape[0]
    mean = np.zeros(len(idx))
    sq = np.zeros(len(idx))
    # column chunks bound the dense copy of a dense X, and the CSC copy of a sparse one
    for s in range(0, len(idx), 1024):
        cols = matrix[:, idx[s : s + 1024]]
        if sp.issparse(cols):
            cols = sp.csc_matrix(cols, dtype=np.float64)
            m = np.asarray(cols.sum(axis=0)).ravel() / n
            nnz = np.diff(cols.indptr)
            dev = cols.data - np.repeat(m, nnz)
            col_of = np.repeat(np.arange(cols.shape[1]), nnz)
            sq[s : s + len(m)] = np.bincount(col_of, dev**2, minlength=len(m)) + (n - nnz) * m**2
        else:
            cols = np.asarray(cols, dtype=np.float64)
            m = cols.mean(axis=0)
            sq[s : s + len(m)] = ((cols - m) ** 2).sum(axis=0)
        mean[s : s + len(m)] = m
    std = np.sqrt(sq / n)
    # a constant gene's two-pass std is rounding noise, not zero; treat it as zero
    std[std <= 1e-10 * np.maximum(np.abs(mean), 1e-300)] = 0.0
    return mean, std


def _mean_pairwise_pcc(matrix, idx: np.ndarray, mean: np.ndarray, std: np.ndarray) -> float:
    """Mean Pearson correlation over all distinct pairs of the columns `idx` with non-zero std.

    With standardised columns z_i, sum_{i,j} r_ij = ||sum_i z_i||^2 / n, so the mean over pairs follows from
    one matrix-vector product instead of a k x k correlation matrix (k reaches 40% of all genes). Dropping
    constant genes is what nanmean over a correlation matrix with NaN rows would do.
    """
    ok = std > 0
    k = int(ok.sum())
    if k < 2:
        return float("nan")
    n = matrix.shape[0]
    weights = np.zeros(matrix.shape[1])
    weights[idx[ok]] = 1.0 / std[ok]
    z_sum = matrix @ weights - float(np.sum(mean[ok] / std[ok]))
    total = float(np.dot(z_sum, z_sum)) / n
    return (total - k) / (k * (k - 1))


def panel_redundancy(
    adata: AnnData,
    key: str,
    *,
    groupby: str | None = None,
    fractions: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.4),
    layer: str | None = None,
    use_raw: bool | None = None,
) -> pd.DataFrame:
    """Redundancy of each group's top-ranked genes: mean Pearson correlation over all pairs (KRATOS Fig. 4).

    For each group of the ranking in `adata.uns[key]` and each fraction `f`, the top
    `k = max(1, round(f * n_genes))` genes are taken and the Pearson correlation of every distinct pair is
    averaged. Correlations are computed across **all cells** of the matrix, not within the group: a panel is
    meant to be read out on every cell, and within a small group most marker genes are near-constant, which
    makes within-group correlations noisy. (The paper's "within each cell type" is read as "for each cell
    type's panel".) Genes that are constant over all cells have no correlation and are left out of the mean,
    as `nanmean` would; `k < 2` (after that) gives NaN.

    Parameters
    ----------
    adata
        Annotated data matrix.
    key
        `adata.uns` key of a ranking in `sc.tl.rank_genes_groups` layout.
    groupby
        Only checked for existence; defaults to the ranking's `params['groupby']`.
    fractions
        Panel sizes as fractions of all genes in the matrix.
    layer, use_raw
        Expression matrix; default to the ranking's params. Nothing is densified.

    Returns
    -------
    Long table with columns `group`, `fraction`, `n_genes` (actual panel size) and `pcc`.
    """
    ranking, params = _ranking(adata, key)
    fractions = _check_fractions(fractions)
    _groups_and_labels(adata, groupby, params, key)
    layer, use_raw = _resolve_source(params, layer, use_raw)
    source = matrix_source(layer, use_raw)
    matrix, var_names = get_matrix(adata, layer=layer, use_raw=use_raw)
    sizes = [_panel_size(f, matrix.shape[1]) for f in fractions]
    indices = {g: _gene_indices(genes[: max(sizes)], var_names, key, source) for g, genes in ranking.items()}

    rows = []
    for group, idx in indices.items():
        mean, std = _gene_mean_std(matrix, idx)
        for fraction, k in zip(fractions, sizes, strict=True):
            k_used = min(k, len(idx))
            pcc = _mean_pairwise_pcc(matrix, idx[:k_used], mean[:k_used], std[:k_used])
            rows.append({"group": group, "fraction": fraction, "n_genes": k_used, "pcc": pcc})
    return pd.DataFrame(rows, columns=["group", "fraction", "n_genes", "pcc"])


def compare_panels(
    adata: AnnData, keys: dict[str, str] | Sequence[str], metric: str = "auroc", **kwargs
) -> pd.DataFrame:
    """Score several rankings with :func:`panel_auroc` or :func:`panel_redundancy` and stack the tables.

    Parameters
    ----------
    adata
        Annotated data matrix.
    keys
        `{label: uns key}`, or a list of `uns` keys (each key is then its own label).
    metric
        `"auroc"` (discriminative power, :func:`panel_auroc`) or `"pcc"` (redundancy, :func:`panel_redundancy`;
        `"redundancy"` is accepted as the same).
    **kwargs
        Passed to the metric function.

    Returns
    -------
    The metric's long table with a leading `method` column holding the label.
    """
    metrics = {"auroc": panel_auroc, "pcc": panel_redundancy, "redundancy": panel_redundancy}
    if metric not in metrics:
        raise ValueError(f"metric must be 'auroc' or 'pcc' ('redundancy'), got {metric!r}.")
    if isinstance(keys, str):
        keys = [keys]
    labelled = dict(keys) if isinstance(keys, dict) else {k: k for k in keys}
    if not labelled:
        raise ValueError("keys is empty; pass at least one adata.uns key.")
    for k in labelled.values():
        _ranking(adata, k)  # fail on a missing key before any ranking is scored
    tables = [metrics[metric](adata, k, **kwargs).assign(method=label) for label, k in labelled.items()]
    table = pd.concat(tables, ignore_index=True)
    return table[["method", *[c for c in table.columns if c != "method"]]]
