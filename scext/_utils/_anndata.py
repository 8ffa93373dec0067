from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def matrix_source(layer: str | None, use_raw: bool) -> str:
    """How `get_matrix` names its source in params and error messages."""
    if use_raw:
        return "adata.raw.X"
    return f"adata.layers[{layer!r}]" if layer is not None else "adata.X"


def get_matrix(adata: AnnData, layer: str | None = None, use_raw: bool = False):
    """The cells x genes matrix a tool reads, and its gene names.

    Sparse input stays sparse (CSR, sorted indices) so that only minibatches are ever densified. Layers
    whose name says they hold counts are checked for negative values, since every count model breaks on them.

    Returns
    -------
    matrix
        `scipy.sparse.csr_matrix` or `numpy.ndarray`, never a copy when avoidable.
    var_names
        `pandas.Index` of the matrix's genes.
    """
    if use_raw and layer is not None:
        raise ValueError("Pass either layer= or use_raw=True, not both.")
    if use_raw:
        if adata.raw is None:
            raise ValueError("use_raw=True, but adata.raw is None; set adata.raw or use X / a layer.")
        matrix, var_names = adata.raw.X, adata.raw.var_names
    elif layer is not None:
        if layer not in adata.layers:
            raise KeyError(f"layer={layer!r} is not in adata.layers (have: {list(adata.layers.keys())}).")
        matrix, var_names = adata.layers[layer], adata.var_names
    else:
        matrix, var_names = adata.X, adata.var_names
    if matrix is None:
        raise ValueError(f"{matrix_source(layer, use_raw)} is empty.")
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix)
        if not matrix.has_sorted_indices:
            matrix = matrix.copy()
            matrix.sort_indices()
    elif not isinstance(matrix, np.ndarray):
        # backed datasets and array-likes: read the whole thing only here, where it is needed anyway
        matrix = np.asarray(matrix)
    check_finite(matrix, matrix_source(layer, use_raw))
    if layer is not None and "count" in layer.lower():
        values = matrix.data if sp.issparse(matrix) else matrix
        if values.size and values.min() < 0:
            raise ValueError(
                f"layer={layer!r} holds negative values, which counts cannot; pass the raw-count layer, "
                "or a layer not named as counts if the values are meant to be negative."
            )
    return matrix, pd.Index(var_names)


def check_finite(matrix, source: str) -> None:
    """Raise a ValueError naming `source` when the matrix holds NaN or inf."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size and not np.isfinite(values).all():
        n_bad = int((~np.isfinite(values)).sum())
        raise ValueError(
            f"{source} holds {n_bad} NaN or infinite value(s); impute or drop them (e.g. "
            "np.nan_to_num, or filter the affected cells) before training."
        )


def is_integer_valued(matrix) -> bool:
    """Whether every stored value of a dense or sparse matrix is a whole number (counts, not normalised data)."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    return bool(np.array_equal(values, np.round(values)))


def dense_columns(matrix, columns: np.ndarray) -> np.ndarray:
    """The chosen columns of a dense or sparse matrix as a C-contiguous float32 array (for whole-graph models)."""
    block = matrix[:, columns]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return np.ascontiguousarray(block, dtype=np.float32)
