"""Principal axes of z-scored genes without forming the z-scored matrix (shared by CICL and scDEFER)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg

from ._anndata import row_blocks

#: an atlas is sampled to this many cells before its principal axes are fitted
PCA_MAX_CELLS = 100_000


def principal_axes(
    data,
    center: np.ndarray,
    scale: np.ndarray,
    n_components: int,
    rng: np.random.Generator,
    max_cells: int = PCA_MAX_CELLS,
) -> tuple[np.ndarray, np.ndarray]:
    """The top `n_components` principal axes (genes x n_components, float32) of ``(data - center) / scale``
    and the squared norm of the scores along each (the squared singular values), largest first.

    Truncated SVD by ARPACK's Lanczos iterations (as ``sc.pp.pca``), with the centring and scaling applied
    inside the matrix-vector products, so sparse input stays sparse (more than `max_cells` cells are
    sampled first, with `rng`). The start vector is fixed, so the axes are the same on every run, and each
    axis's sign makes its largest loading positive. `n_components` must be below both dimensions.
    """
    n_cells, n_genes = data.shape
    rows = np.sort(rng.choice(n_cells, max_cells, replace=False)) if n_cells > max_cells else None
    blocks = [block for _, block in row_blocks(data, rows)]
    if all(sp.issparse(block) for block in blocks):
        matrix = sp.vstack(blocks, format="csr").astype(np.float32)
    else:
        matrix = np.concatenate([b.toarray() if sp.issparse(b) else np.asarray(b) for b in blocks])
        matrix = matrix.astype(np.float32, copy=False)
    center, scale = (np.asarray(v, dtype=np.float64) for v in (center, scale))
    shift = center / scale

    def matvec(v):  # ((X - center) / scale) v
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        return matrix @ (v / scale) - shift @ v

    def rmatvec(u):  # ((X - center) / scale)^T u
        u = np.asarray(u, dtype=np.float64).reshape(-1)
        return (matrix.T @ u) / scale - shift * u.sum()

    operator = scipy.sparse.linalg.LinearOperator(
        (matrix.shape[0], n_genes), matvec=matvec, rmatvec=rmatvec, dtype=np.float64
    )
    start = np.full(min(matrix.shape), 1.0 / np.sqrt(min(matrix.shape)))
    _, singular, axes_t = scipy.sparse.linalg.svds(operator, k=n_components, v0=start, solver="arpack")
    order = np.argsort(singular)[::-1]
    axes = axes_t[order].T
    axes = axes * np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(n_components)])
    return np.ascontiguousarray(axes, dtype=np.float32), singular[order] ** 2
