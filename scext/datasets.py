"""Data: the labelled benchmark sets beside the repository, and seeded synthetic data of any size."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["data_dir", "load", "synthetic_counts"]

SHARED_NAMES = (
    "kratos_sim_140",
    "kratos_sim_220",
    "baron_mouse",
    "pbmc3k_hvg250",
    "10x_pbmc_top2000",
    "mouse_bladder_top2000",
    "paul15",
    "yan",
    "cellbench_celseq2_3cl",
    "pbmc_small",
)


def data_dir() -> Path:
    """Folder of the shared data sets: ``$SCEXT_DATA_DIR``, else ``../shared/datasets`` of the checkout."""
    if "SCEXT_DATA_DIR" in os.environ:
        return Path(os.environ["SCEXT_DATA_DIR"])
    return Path(__file__).resolve().parents[2] / "shared" / "datasets"


def load(name: str) -> ad.AnnData:
    """Read one labelled data set (``obs["cell_type"]``) from `data_dir`, e.g. ``load("baron_mouse")``.

    Parameters
    ----------
    name
        One of ``kratos_sim_140``, ``kratos_sim_220``, ``baron_mouse``, ``pbmc3k_hvg250``,
        ``10x_pbmc_top2000``, ``mouse_bladder_top2000``, ``paul15``, ``yan``, ``cellbench_celseq2_3cl``,
        ``pbmc_small``.

    Returns
    -------
    The AnnData read from ``<data_dir()>/<name>.h5ad``.
    """
    if name not in SHARED_NAMES:
        raise ValueError(f"Unknown data set {name!r}; choose one of {SHARED_NAMES}.")
    path = data_dir() / f"{name}.h5ad"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist. Set SCEXT_DATA_DIR to the folder holding the shared .h5ad files."
        )
    return ad.read_h5ad(path)


def synthetic_counts(
    n_cells: int = 1000,
    n_genes: int = 200,
    n_types: int = 4,
    n_markers: int = 10,
    *,
    fold_change: float = 4.0,
    dispersion: float = 0.5,
    mean_log_expression: float = 0.0,
    counts_layer: bool = True,
    random_state: int = 0,
) -> ad.AnnData:
    """Negative-binomial counts with planted cell types, each marked by its own up-regulated genes.

    Each gene gets a log-normal base mean; each type multiplies the mean of its `n_markers` genes by
    `fold_change`. Counts are NB with the given `dispersion` (variance = mu + dispersion * mu^2). Cells are
    drawn in blocks straight into a sparse matrix, so a million cells never exist as a dense array.

    Parameters
    ----------
    n_cells, n_genes
        Size of the matrix.
    n_types
        Number of cell types; each cell gets one uniformly at random.
    n_markers
        Marker genes per type (disjoint blocks, so ``n_types * n_markers <= n_genes``).
    fold_change
        Factor on the mean of a type's marker genes in the cells of that type.
    dispersion
        Negative-binomial dispersion: variance = mu + dispersion * mu^2.
    mean_log_expression
        Mean of the genes' log base expression (standard deviation 1). The default 0 gives about 55% non-zero
        counts; -2.5 gives about 10%, as in droplet data, and keeps 10^6 cells x 2,000 genes near 2 GB.
    counts_layer
        Also store the counts in ``layers["counts"]`` (a second copy; leave it off for very large data).
    random_state
        Seed of every draw.

    Returns
    -------
    AnnData with sparse CSR float32 counts in ``X`` (and ``layers["counts"]``), ``obs["cell_type"]``
    (categorical ``type_0`` ...), and ``var["marker_of"]`` (the type a gene marks, or ``"none"``).
    """
    if n_types * n_markers > n_genes:
        raise ValueError(f"n_types * n_markers = {n_types * n_markers} exceeds n_genes = {n_genes}.")
    rng = np.random.default_rng(random_state)
    types = rng.integers(0, n_types, size=n_cells)
    base = rng.lognormal(mean=mean_log_expression, sigma=1.0, size=n_genes)
    means = np.tile(base, (n_types, 1))
    marker_of = np.full(n_genes, "none", dtype=object)
    marker_genes = rng.permutation(n_genes)[: n_types * n_markers].reshape(n_types, n_markers)
    for t, genes in enumerate(marker_genes):
        means[t, genes] *= fold_change
        marker_of[genes] = f"type_{t}"
    library = rng.lognormal(mean=0.0, sigma=0.2, size=(n_cells, 1))
    block_rows = max(1, 2**22 // n_genes)
    blocks = []
    for start in range(0, n_cells, block_rows):
        rows = slice(start, start + block_rows)
        mu = means[types[rows]] * library[rows]
        # NB as a gamma-Poisson mixture
        counts = rng.poisson(rng.gamma(shape=1 / dispersion, scale=mu * dispersion)).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
    matrix = sp.vstack(blocks, format="csr") if len(blocks) != 1 else blocks[0]
    adata = ad.AnnData(
        X=matrix,
        obs=pd.DataFrame(
            {
                "cell_type": pd.Categorical(
                    [f"type_{t}" for t in types], [f"type_{t}" for t in range(n_types)]
                )
            },
            index=[f"cell_{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame({"marker_of": marker_of}, index=[f"gene_{j}" for j in range(n_genes)]),
    )
    if counts_layer:
        adata.layers["counts"] = matrix.copy()
    return adata
