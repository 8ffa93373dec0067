"""Streamed and backed input: the same results as in memory, without reading the matrix whole."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import FAST, make_toy
from sklearn.metrics import adjusted_rand_score

import scext
from scext._utils import (
    ScaledColumns,
    column_mean_var,
    column_min_max,
    get_matrix,
    is_backed,
    min_value,
    row_blocks,
    stored_values,
)
from scext.models import Cicl
from scext.tl import _cicl

CICL_FAST = {"n_layers": 1, "feedforward_dim": 32, "projection_sizes": (32, 16), "n_epochs": 8}


def test_synthetic_counts_blocks_seed_and_sparsity():
    one = scext.datasets.synthetic_counts(300, 50, n_types=3, n_markers=5, random_state=3)
    again = scext.datasets.synthetic_counts(300, 50, n_types=3, n_markers=5, random_state=3)
    assert (one.X != again.X).nnz == 0
    # many blocks of rows (2**22 // 20000 genes = 209 rows each) still give integer NB counts
    wide = scext.datasets.synthetic_counts(500, 20000, n_types=2, n_markers=5, counts_layer=False)
    assert sp.isspmatrix_csr(wide.X) and "counts" not in wide.layers
    assert np.array_equal(wide.X.data, np.round(wide.X.data))
    density = {
        m: scext.datasets.synthetic_counts(400, 200, mean_log_expression=m).X.nnz / (400 * 200)
        for m in (0.0, -2.5)
    }
    assert density[-2.5] < 0.2 < 0.4 < density[0.0]


def test_row_blocks_and_column_statistics_match_in_memory():
    rng = np.random.default_rng(0)
    dense = rng.poisson(1.0, size=(103, 7)).astype(np.float32)
    dense[:, 3] = 2.0  # a constant column must get exactly zero variance
    rows = np.sort(rng.choice(103, 40, replace=False))
    for matrix in (dense, sp.csr_matrix(dense)):
        seen = np.concatenate([r for r, _ in row_blocks(matrix, block_rows=10)])
        np.testing.assert_array_equal(seen, np.arange(103))
        mean, var = column_mean_var(matrix, rows)
        np.testing.assert_allclose(mean, dense[rows].mean(0), rtol=1e-6)
        np.testing.assert_allclose(var, dense[rows].var(0), rtol=1e-6, atol=1e-12)
        assert var[3] == 0
        assert sorted(stored_values(matrix)[stored_values(matrix) != 0]) == sorted(dense[dense != 0])
        assert min_value(matrix) == stored_values(matrix).min() and not is_backed(matrix)
        _, unbiased = column_mean_var(matrix, ddof=1)
        np.testing.assert_allclose(unbiased, dense.var(0, ddof=1), rtol=1e-6, atol=1e-12)


def test_scaled_columns_match_scanpy_scale_and_minmax_without_densifying_the_input():
    import scanpy as sc
    from sklearn.preprocessing import minmax_scale

    rng = np.random.default_rng(1)
    dense = (rng.poisson(0.3, size=(120, 9)) * rng.uniform(0.5, 40, size=9)).astype(np.float32)
    dense[:, 4] = 0.0  # a constant gene stays at 0 under both scalings
    dense[:, 5] += 1.0  # no zero in this column: its minimum is 1, not the sparse matrix's implicit 0
    rows = np.array([7, 3, 100, 55])  # unsorted, as a graph halo reads them
    for matrix in (dense, sp.csr_matrix(dense)):
        low, high = column_min_max(matrix)
        np.testing.assert_array_equal(low, dense.min(0))
        np.testing.assert_array_equal(high, dense.max(0))
        minmax = ScaledColumns(matrix, low, high - low)
        np.testing.assert_allclose(minmax[rows], minmax_scale(dense)[rows], rtol=1e-5, atol=1e-6)
        mean, var = column_mean_var(matrix, ddof=1)
        zscore = ScaledColumns(matrix, mean, np.sqrt(var), max_value=2.5)
        np.testing.assert_allclose(
            zscore[rows], sc.pp.scale(dense, max_value=2.5, copy=True)[rows], rtol=1e-5, atol=1e-5
        )
        assert zscore[rows].dtype == np.float32 and zscore.shape == dense.shape
    assert dense[:, 4].max() == 0 and dense.min() >= 0  # the input was not modified in place


@pytest.fixture
def toy_file(tmp_path):
    adata = make_toy()
    adata.X = sp.csr_matrix(adata.X)
    path = tmp_path / "toy.h5ad"
    adata.write_h5ad(path)
    return adata, path


def test_get_matrix_backed_stays_on_disk_and_checks_stream(toy_file, tmp_path):
    adata, path = toy_file
    backed = ad.read_h5ad(path, backed="r")
    matrix, _ = get_matrix(backed, backed=True)
    assert not isinstance(matrix, (np.ndarray, sp.spmatrix)) and is_backed(matrix)
    assert min_value(matrix) == adata.X.data.min()
    assert (matrix[np.array([0, 5, 9])] != adata.X[[0, 5, 9]]).nnz == 0
    in_memory, _ = get_matrix(backed)
    assert sp.issparse(in_memory)

    broken = adata.copy()
    broken.X = broken.X.toarray()
    broken.X[7, 3] = np.nan
    broken.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(ValueError, match="NaN"):
        get_matrix(ad.read_h5ad(tmp_path / "nan.h5ad", backed="r"), backed=True)

    column_major = adata.copy()
    column_major.X = sp.csc_matrix(column_major.X)
    column_major.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="CSC"):
        get_matrix(ad.read_h5ad(tmp_path / "csc.h5ad", backed="r"), backed=True)


def test_kratos_backed_and_dense_input_give_the_in_memory_embedding(toy_file, tmp_path):
    adata, path = toy_file
    scext.tl.kratos(adata, "cell_type", device="cpu", **FAST)
    backed = ad.read_h5ad(path, backed="r")
    scext.tl.kratos(backed, "cell_type", device="cpu", **FAST)
    np.testing.assert_allclose(backed.obsm["X_kratos"], adata.obsm["X_kratos"], atol=1e-5)
    dense = adata.copy()
    dense.X = dense.X.toarray()
    scext.tl.kratos(dense, "cell_type", device="cpu", **FAST)
    np.testing.assert_allclose(dense.obsm["X_kratos"], adata.obsm["X_kratos"], atol=1e-5)
    # prediction reads a backed AnnData lazily, genes reordered
    adata[:, ::-1].copy().write_h5ad(tmp_path / "reordered.h5ad")
    reordered = ad.read_h5ad(tmp_path / "reordered.h5ad", backed="r")
    scext.tl.kratos_predict(reordered, adata, device="cpu", key_added="again")
    np.testing.assert_allclose(reordered.obsm["X_again"], adata.obsm["X_kratos"], atol=1e-5)
    # gene panels read the backed matrix in blocks too, and agree with the in-memory ones
    for data in (adata, backed):
        scext.tl.rank_genes_perturbation(data, method="integrated_gradients", ig_n_steps=8, device="cpu")
    np.testing.assert_allclose(
        backed.varm["kratos_integrated_gradients_scores"],
        adata.varm["kratos_integrated_gradients_scores"],
        rtol=1e-4,
        atol=1e-6,
    )


def test_cicl_backed_counts_match_in_memory(tmp_path):
    counts = scext.datasets.synthetic_counts(240, 80, n_types=3, n_markers=8, fold_change=8.0)
    path = tmp_path / "counts.h5ad"
    counts.write_h5ad(path)
    scext.tl.cicl(counts, 3, n_top_genes=40, device="cpu", **CICL_FAST)
    backed = ad.read_h5ad(path, backed="r")
    scext.tl.cicl(backed, 3, n_top_genes=40, device="cpu", **CICL_FAST)
    np.testing.assert_allclose(backed.obsm["X_cicl"], counts.obsm["X_cicl"], atol=1e-4)
    assert list(backed.uns["cicl"]["genes"]) == list(counts.uns["cicl"]["genes"])


def test_cicl_preprocessing_matches_scanpy_and_samples_hvg_on_atlases(monkeypatch):
    import scanpy as sc

    counts = scext.datasets.synthetic_counts(300, 120, n_types=3, n_markers=8)
    matrix, var_names = get_matrix(counts)
    rng = np.random.default_rng(0)
    data, genes, (center, scale), _, _ = _cicl._prepare(matrix, var_names, True, 50, None, False, rng)
    reference = counts.copy()
    sc.pp.filter_genes(reference, min_counts=1)
    sc.pp.normalize_total(reference)
    sc.pp.log1p(reference)
    sc.pp.highly_variable_genes(reference, flavor="seurat", n_top_genes=50)
    reference = reference[:, reference.var["highly_variable"].to_numpy()].copy()
    assert list(genes) == list(reference.var_names)
    reference.X = reference.X.toarray()
    sc.pp.scale(reference)
    np.testing.assert_allclose((data.toarray() - center) / scale, reference.X, atol=1e-4)

    monkeypatch.setattr(_cicl, "HVG_MAX_CELLS", 150)
    _, sampled_genes, _, description, _ = _cicl._prepare(matrix, var_names, True, 50, None, False, rng)
    assert "150 sampled cells" in description
    assert len(set(sampled_genes) & set(genes)) >= 40  # a sample ranks dispersion much as all cells do


def test_cicl_reference_attention_inference():
    counts = scext.datasets.synthetic_counts(300, 60, n_types=3, n_markers=10, fold_change=10.0)
    matrix, var_names = get_matrix(counts)
    data, _, scaler, _, _ = _cicl._prepare(matrix, var_names, True, 60, None, False, np.random.default_rng(0))
    torch.manual_seed(0)
    model = Cicl(data.shape[1], 3, n_layers=2, feedforward_dim=32, projection_sizes=(32, 16))
    model.set_scaler(*scaler)
    model.fit(data, n_epochs=10, batch_size=100)
    exact = model.embed(data)
    # at or above the number of cells the reference is all of them: exact attention
    torch.testing.assert_close(model.embed(data, reference_size=300), exact)
    first = model.embed(data, reference_size=120, generator=np.random.default_rng(1))
    again = model.embed(data, chunk_size=7, reference_size=120, generator=np.random.default_rng(1))
    torch.testing.assert_close(first, again, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, exact)
    labels_exact = model.cluster(exact)[0].numpy()
    labels_reference = model.cluster(first)[0].numpy()
    assert adjusted_rand_score(labels_exact, labels_reference) > 0.9
    truth = counts.obs["cell_type"].cat.codes.to_numpy()
    assert adjusted_rand_score(truth, labels_reference) > 0.8


def test_cicl_rejects_bad_max_attention_cells():
    counts = scext.datasets.synthetic_counts(60, 40, n_types=2, n_markers=5)
    with pytest.raises(ValueError, match="max_attention_cells"):
        scext.tl.cicl(counts, 2, max_attention_cells=0, device="cpu", **CICL_FAST)
    assert "cicl" not in counts.uns
