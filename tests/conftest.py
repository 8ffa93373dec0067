from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import scanpy as sc

import scext


def pytest_collection_modifyitems(config, items):
    if scext.datasets.data_dir().exists():
        return
    skip = pytest.mark.skip(reason=f"shared data sets not found at {scext.datasets.data_dir()}")
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _quiet():
    scext.settings.progress_bar = False
    sc.settings.verbosity = 0
    yield
    matplotlib.pyplot.close("all")


def make_toy(random_state: int = 0, n_cells: int = 300):
    """Three log-normalised cell types, each with 5 planted up-regulated marker genes among 60."""
    adata = scext.datasets.synthetic_counts(
        n_cells=n_cells, n_genes=60, n_types=3, n_markers=5, fold_change=10.0, random_state=random_state
    )
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


FAST = {"n_epochs": 40, "batch_size": 32, "hidden_sizes": (32, 16)}


@pytest.fixture(scope="session")
def toy_cells():
    """500 toy cells: the first 300 train the shared model, the last 200 are new cells of the same kind."""
    return make_toy(n_cells=500)


@pytest.fixture(scope="session")
def trained_toy(toy_cells):
    """A toy AnnData with a trained KRATOS model (shared; tests must copy before writing)."""
    adata = toy_cells[:300].copy()
    scext.settings.progress_bar = False
    scext.tl.kratos(adata, groupby="cell_type", random_state=0, device="cpu", **FAST)
    return adata
