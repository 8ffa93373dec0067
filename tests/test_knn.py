from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scext._utils import _graph
from scext._utils._graph import exact_neighbor_distances, knn_graph, knn_indices


def _blobs(n_cells: int, n_dims: int, n_clusters: int = 10, seed: int = 0) -> np.ndarray:
    # continuous random data: distance ties have probability zero, so exact methods must agree edge for edge
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(n_clusters, n_dims))
    labels = rng.integers(n_clusters, size=n_cells)
    return (centres[labels] + rng.normal(size=(n_cells, n_dims))).astype(np.float32)


def _edges(graph: sp.csr_matrix) -> set[tuple[int, int]]:
    coo = graph.tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist(), strict=True))


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist(), strict=True))
    return hits / truth.size


def test_torch_equals_exact(monkeypatch):
    data = _blobs(500, 20)
    exact = knn_indices(data, 10, method="exact")
    assert np.array_equal(knn_indices(data, 10, method="torch"), exact)
    # many ragged chunks instead of one block: the chunking must not change a single neighbour
    monkeypatch.setattr(_graph, "TORCH_KNN_BLOCK_ELEMENTS", 500 * 7)
    assert np.array_equal(knn_indices(data, 10, method="torch"), exact)
    assert _edges(knn_graph(data, 10, method="torch")) == _edges(knn_graph(data, 10, method="exact"))


def test_exact_neighbor_distances_match_brute_force_with_self_first(monkeypatch):
    from scipy.spatial.distance import cdist
    from threadpoolctl import threadpool_limits

    # far from the origin, where a float32 expansion would already swap near-tied neighbours
    data = _blobs(400, 50) + 1000.0
    data[7] = data[3]  # an exact duplicate must not displace the cell itself
    indices, distances = exact_neighbor_distances(data, 30)
    assert indices.shape == distances.shape == (400, 30)
    assert np.array_equal(indices[:, 0], np.arange(400))
    assert indices[3, 1] == 7 and indices[7, 1] == 3 and distances[3, 1] == 0.0
    # direct differences as reference (scikit-learn's expansion is off by 2e-4 this far out, even in float64)
    full = cdist(data.astype(np.float64), data.astype(np.float64))
    np.fill_diagonal(full, -1.0)
    truth = np.argsort(full, axis=1, kind="stable")[:, :30]
    assert np.array_equal(indices[:, 2:], truth[:, 2:])
    np.testing.assert_allclose(distances, np.take_along_axis(np.maximum(full, 0.0), indices, 1), rtol=1e-12)
    # same bits under any BLAS thread count and any chunking: UMAP turns a last-bit change into another layout
    with threadpool_limits(limits=1):
        one_thread = exact_neighbor_distances(data, 30)
    monkeypatch.setattr(_graph, "TORCH_KNN_BLOCK_ELEMENTS", 8 * 400 * 60 * 7)
    chunked = exact_neighbor_distances(data, 30)
    for other in (one_thread, chunked):
        assert np.array_equal(other[0], indices) and np.array_equal(other[1], distances)


def test_torch_exact_despite_large_norms():
    # float32 ||a||^2 - 2ab + ||b||^2 cancels when the norms dwarf the neighbour distances; a common offset
    # and two far-apart halves both swap neighbours unless the search centres and re-ranks
    data = _blobs(500, 20) + np.float32(1000)
    assert np.array_equal(knn_indices(data, 10, method="torch"), knn_indices(data, 10, method="exact"))
    data = _blobs(500, 20)
    data[:, 0] += np.where(np.arange(500) % 2, 300, -300).astype(np.float32)
    assert np.array_equal(knn_indices(data, 10, method="torch"), knn_indices(data, 10, method="exact"))


def test_correlation_agrees_across_methods():
    data = np.abs(_blobs(500, 20, seed=1))
    pearson = np.corrcoef(data)
    np.fill_diagonal(pearson, -np.inf)
    truth = np.argsort(-pearson, axis=1, kind="stable")[:, :8]
    exact = knn_indices(data, 8, metric="correlation", method="exact")
    assert np.array_equal(np.sort(exact, axis=1), np.sort(truth, axis=1))
    torch_graph = knn_graph(data, 8, metric="correlation", method="torch")
    assert _edges(torch_graph) == _edges(knn_graph(data, 8, metric="correlation", method="exact"))


# pynndescent's first call in a process compiles its numba kernels (20-80 s); the tests below share that cost
@pytest.mark.slow
def test_pynndescent_recall():
    data = _blobs(5000, 20, n_clusters=20, seed=2)
    truth = knn_indices(data, 15, method="torch")
    assert _recall(knn_indices(data, 15, method="pynndescent"), truth) >= 0.95
    correlated = np.abs(_blobs(500, 20, seed=1))
    assert (
        _recall(
            knn_indices(correlated, 8, metric="correlation", method="pynndescent"),
            knn_indices(correlated, 8, metric="correlation", method="exact"),
        )
        >= 0.95
    )
    # on the CPU "auto" is exact torch search up to 20,000 cells, pynndescent above
    assert np.array_equal(knn_indices(data, 15), truth)
    many = _blobs(20_001, 5, n_clusters=20, seed=4)
    assert np.array_equal(knn_indices(many, 5), knn_indices(many, 5, method="pynndescent"))


@pytest.mark.parametrize("method", ["exact", pytest.param("pynndescent", marks=pytest.mark.slow), "torch"])
def test_graph_symmetric_without_self_loops(method):
    data = _blobs(300, 5, seed=3)
    # an exact duplicate can outrank a cell's own entry; the cell must still lose itself, not a neighbour
    data[1] = data[0]
    graph = knn_graph(data, 6, method=method)
    assert graph.shape == (300, 300)
    assert (graph != graph.T).nnz == 0
    assert graph.diagonal().sum() == 0
    assert (np.diff(graph.indptr) >= 6).all()
    indices = knn_indices(data, 6, method=method)
    assert indices.shape == (300, 6)
    assert not (indices == np.arange(300)[:, None]).any()


def test_invalid_method_and_device():
    data = _blobs(50, 3)
    with pytest.raises(ValueError, match="method='faiss' is unknown"):
        knn_graph(data, 5, method="faiss")
    with pytest.raises(ValueError, match="metric="):
        knn_graph(data, 5, metric="cosine", method="torch")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            knn_graph(data, 5, method="torch", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_on_cuda_equals_exact():
    data = _blobs(2000, 20, seed=4)
    assert _edges(knn_graph(data, 15, method="torch", device="cuda")) == _edges(
        knn_graph(data, 15, method="exact")
    )
