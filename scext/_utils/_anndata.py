from __future__ import annotations

from collections.abc import Iterator

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from anndata.abc import CSCDataset, CSRDataset

# rows per streamed block: about this many matrix elements (64 MB of float32 when dense)
BLOCK_ELEMENTS = 2**24


def matrix_source(layer: str | None, use_raw: bool) -> str:
    """How `get_matrix` names its source in params and error messages."""
    if use_raw:
        return "adata.raw.X"
    return f"adata.layers[{layer!r}]" if layer is not None else "adata.X"


def get_matrix(adata: AnnData, layer: str | None = None, use_raw: bool = False, *, backed: bool = False):
    """The cells x genes matrix a tool reads, and its gene names.

    Sparse input stays sparse (CSR, sorted indices) so that only minibatches are ever densified. Layers
    whose name says they hold counts are checked for negative values, since every count model breaks on them.

    Parameters
    ----------
    backed
        For tools that stream their input in row blocks: when ``adata`` is backed
        (``read_h5ad(..., backed="r")``), return its on-disk ``X`` as is (an h5py dataset or anndata's
        CSR dataset, both row-indexable; see `row_blocks`). Without it, backed ``X`` is read into memory.

    Returns
    -------
    matrix
        `scipy.sparse.csr_matrix`, `numpy.ndarray` or (with `backed`) an on-disk dataset; never a copy when
        avoidable.
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
    source = matrix_source(layer, use_raw)
    if matrix is None:
        raise ValueError(f"{source} is empty.")
    if isinstance(matrix, CSCDataset):
        if backed:
            raise ValueError(
                f"{source} is stored on disk column by column (CSC), which cannot be read in row blocks. "
                "Rewrite it as CSR once (adata.X = adata.X.tocsr() in memory, then write_h5ad) or read "
                "the file without backed=."
            )
        matrix = matrix.to_memory()
    elif is_backed(matrix) and not backed:
        matrix = matrix.to_memory() if isinstance(matrix, CSRDataset) else matrix[()]
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix)
        if not matrix.has_sorted_indices:
            matrix = matrix.copy()
            matrix.sort_indices()
    elif not isinstance(matrix, np.ndarray) and not is_backed(matrix):
        matrix = np.asarray(matrix)
    if not is_backed(matrix) and matrix.dtype == np.float16:
        # half precision overflows above 65,504 (library sizes) and loses counts above 2,048: compute in float32
        matrix = matrix.astype(np.float32)
    check_finite(matrix, source)
    if layer is not None and "count" in layer.lower() and min_value(matrix) < 0:
        raise ValueError(
            f"layer={layer!r} holds negative values, which counts cannot; pass the raw-count layer, "
            "or a layer not named as counts if the values are meant to be negative."
        )
    return matrix, pd.Index(var_names)


def is_backed(matrix) -> bool:
    """Whether `matrix` is an on-disk dataset of a backed AnnData."""
    return isinstance(matrix, (h5py.Dataset, CSRDataset, CSCDataset))


def row_blocks(matrix, rows: np.ndarray | None = None, block_rows: int | None = None) -> Iterator:
    """Yield ``(row_indices, block)`` over `rows` (sorted; all rows by default) of any matrix scext reads.

    Blocks keep the input's kind (CSR stays CSR), hold about `BLOCK_ELEMENTS` values unless `block_rows`
    is given, and read backed matrices one block at a time, so a pass over the data never holds it whole.
    """
    n_rows, n_columns = matrix.shape
    if block_rows is None:
        block_rows = max(1, BLOCK_ELEMENTS // max(1, n_columns))
    if rows is None:
        for start in range(0, n_rows, block_rows):
            stop = min(start + block_rows, n_rows)
            yield np.arange(start, stop), matrix[start:stop]
        return
    rows = np.asarray(rows)
    for start in range(0, len(rows), block_rows):
        chunk = rows[start : start + block_rows]
        yield chunk, matrix[chunk]


def stored_values(matrix) -> np.ndarray:
    """The stored values of a dense or sparse matrix as one flat array (a view where possible)."""
    return matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()


def min_value(matrix) -> float:
    """Smallest stored value (``inf`` for an empty matrix), streamed in row blocks."""
    lows = [stored_values(block).min() for _, block in row_blocks(matrix) if stored_values(block).size]
    return float(min(lows)) if lows else np.inf


def column_mean_var(matrix, rows: np.ndarray | None = None, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and variance over `rows` (all by default), streamed in row blocks, in float64.

    Block statistics are merged pairwise (Chan et al., scikit-learn's `incr_mean_variance_axis`): stable
    for millions of rows, and exactly zero variance for constant columns.
    """
    from sklearn.utils.sparsefuncs import incr_mean_variance_axis

    n_columns = matrix.shape[1]
    mean, var, seen = np.zeros(n_columns), np.zeros(n_columns), np.zeros(n_columns, dtype=np.int64)
    for _, block in row_blocks(matrix, None if rows is None else np.sort(rows)):
        mean, var, seen = incr_mean_variance_axis(
            sp.csr_matrix(block, dtype=np.float64), axis=0, last_mean=mean, last_var=var, last_n=seen
        )
    n_rows = int(seen[0]) if n_columns else 0
    if ddof and n_rows > ddof:
        var = var * n_rows / (n_rows - ddof)
    return mean, var


def column_min_max(matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-column minimum and maximum (a sparse matrix's implicit zeros count), streamed in row blocks."""
    from sklearn.utils.sparsefuncs import min_max_axis

    low = np.full(matrix.shape[1], np.inf)
    high = np.full(matrix.shape[1], -np.inf)
    for _, block in row_blocks(matrix):
        if sp.issparse(block):
            block_low, block_high = min_max_axis(sp.csr_matrix(block), axis=0)
        else:
            block_low, block_high = np.min(block, axis=0), np.max(block, axis=0)
        np.minimum(low, block_low, out=low)
        np.maximum(high, block_high, out=high)
    return low, high


class ScaledColumns:
    """Rows of `matrix` as dense float32 ``(x - center) / scale``, clipped to ``[-max_value, max_value]``.

    A per-gene affine rescaling (min-max, z-score) applied a minibatch at a time, so a sparse input stays
    sparse and only the rows read are densified. A zero `scale` counts as 1 (constant genes stay at 0).
    Offers what the minibatch readers need (``shape``, ``[rows]``).
    """

    def __init__(self, matrix, center: np.ndarray, scale: np.ndarray, max_value: float | None = None):
        scale = np.asarray(scale, dtype=np.float64)
        self.matrix, self.shape, self.max_value = matrix, matrix.shape, max_value
        self.center = np.asarray(center, dtype=np.float32)
        self.scale = np.where(scale > 0, scale, 1.0).astype(np.float32)

    def __getitem__(self, rows) -> np.ndarray:
        block = self.matrix[rows]
        # a copy in float32: the caller's matrix is never modified
        block = (
            block.toarray().astype(np.float32, copy=False)
            if sp.issparse(block)
            else np.array(block, dtype=np.float32)
        )
        block -= self.center
        block /= self.scale
        if self.max_value is not None:
            np.clip(block, -self.max_value, self.max_value, out=block)
        return block


class SelectedColumns:
    """Rows of `matrix` restricted to `columns`, read lazily: backed input is never loaded whole.

    Offers what the minibatch readers need (``shape``, ``[rows]``), for models whose genes are a reordered
    subset of an AnnData's.
    """

    def __init__(self, matrix, columns: np.ndarray):
        self.matrix, self.columns = matrix, np.asarray(columns)
        self.shape = (matrix.shape[0], len(self.columns))

    def __getitem__(self, rows):
        return self.matrix[rows][:, self.columns]


def check_finite(matrix, source: str) -> None:
    """Raise a ValueError naming `source` when the matrix holds NaN or inf (streamed in row blocks)."""
    n_bad = sum(int((~np.isfinite(stored_values(block))).sum()) for _, block in row_blocks(matrix))
    if n_bad:
        raise ValueError(
            f"{source} holds {n_bad} NaN or infinite value(s); impute or drop them (e.g. "
            "np.nan_to_num, or filter the affected cells) before training."
        )


def is_integer_valued(matrix) -> bool:
    """Whether every stored value of a dense or sparse matrix is a whole number (counts, not normalised data)."""
    values = stored_values(matrix)
    return bool(np.array_equal(values, np.round(values)))


def dense_columns(matrix, columns: np.ndarray) -> np.ndarray:
    """The chosen columns of a dense or sparse matrix as a C-contiguous float32 array (for whole-graph models)."""
    block = matrix[:, columns]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return np.ascontiguousarray(block, dtype=np.float32)
