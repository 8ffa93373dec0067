from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

# Scanpy's own threshold: exact search below it, approximate (pynndescent) above
EXACT_KNN_MAX_CELLS = 4096


def knn_graph(
    data: np.ndarray, n_neighbors: int, *, metric: str = "euclidean", random_state: int = 0
) -> sp.csr_matrix:
    """Undirected, unweighted kNN graph of the rows of `data`, without self-loops.

    Edges come from neighbour indices (each cell to its `n_neighbors` nearest other cells), then the graph
    is symmetrised. ``metric="correlation"`` (Pearson, the PKNN graph) is Euclidean search on rows centred
    and scaled to unit norm, whose distance ``2 - 2 r`` orders neighbours exactly as Pearson's ``r`` does.
    Exact search below 4,096 cells, pynndescent above, as Scanpy does.
    """
    data = np.asarray(data, dtype=np.float32)
    n_cells = data.shape[0]
    if n_neighbors < 1 or n_neighbors >= n_cells:
        raise ValueError(
            f"n_neighbors={n_neighbors} must be at least 1 and below the number of cells ({n_cells})."
        )
    if metric == "correlation":
        data = data - data.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(data, axis=1, keepdims=True)
        data = data / np.where(norms > 0, norms, 1.0)
    elif metric != "euclidean":
        raise ValueError(f"metric={metric!r} is unknown; choose 'euclidean' or 'correlation'.")
    if n_cells <= EXACT_KNN_MAX_CELLS:
        from sklearn.neighbors import NearestNeighbors

        search = NearestNeighbors(n_neighbors=n_neighbors + 1, algorithm="brute").fit(data)
        _, indices = search.kneighbors(data)
    else:
        from pynndescent import NNDescent

        index = NNDescent(data, n_neighbors=n_neighbors + 1, random_state=random_state, n_jobs=None)
        indices, _ = index.neighbor_graph
    return _symmetric_graph(indices, n_neighbors)


def _symmetric_graph(indices: np.ndarray, n_neighbors: int) -> sp.csr_matrix:
    n_cells = indices.shape[0]
    rows = np.repeat(np.arange(n_cells), indices.shape[1])
    cols = indices.ravel()
    # drop each cell itself (and any duplicate among ties), keep the first n_neighbors others
    keep = rows != cols
    rows, cols = rows[keep], cols[keep]
    per_row = np.bincount(rows, minlength=n_cells)
    rank = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    keep = rank < n_neighbors
    graph = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], cols[keep])), shape=(n_cells, n_cells)
    )
    graph = graph.maximum(graph.T).tocsr()
    graph.sort_indices()
    return graph


def neighbors_graph(adata: AnnData, neighbors_key: str) -> sp.csr_matrix:
    """The edge set of a Scanpy neighbors graph (``sc.pp.neighbors(key_added=...)``), unweighted.

    The edges are the non-zeros of the connectivities, i.e. neighbour indices, never thresholded weights.
    """
    if neighbors_key not in adata.uns or "connectivities_key" not in adata.uns[neighbors_key]:
        have = [
            key
            for key, value in adata.uns.items()
            if isinstance(value, dict) and "connectivities_key" in value
        ]
        raise KeyError(
            f"neighbors_key={neighbors_key!r} names no neighbors graph in adata.uns (have: {have}); run "
            f"sc.pp.neighbors(adata, key_added={neighbors_key!r}) first, or leave neighbors_key=None to "
            "build a kNN graph here."
        )
    obsp_key = adata.uns[neighbors_key]["connectivities_key"]
    if obsp_key not in adata.obsp:
        raise KeyError(f"adata.obsp[{obsp_key!r}] named by adata.uns[{neighbors_key!r}] is missing.")
    connectivities = adata.obsp[obsp_key]
    if connectivities.shape != (adata.n_obs, adata.n_obs):
        raise ValueError(
            f"adata.obsp[{obsp_key!r}] is {connectivities.shape}, not cells x cells ({adata.n_obs}); "
            "recompute sc.pp.neighbors on this AnnData."
        )
    return undirected_edges(connectivities)


def undirected_edges(adjacency, name: str = "graph") -> sp.csr_matrix:
    """The non-zero pattern of a square (sparse or dense) adjacency matrix, symmetrised, without self-loops."""
    if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"{name} must be a square cells x cells matrix, got shape {adjacency.shape}.")
    graph = sp.csr_matrix(adjacency, dtype=np.float32, copy=True)
    graph.setdiag(0)
    graph.eliminate_zeros()
    graph.data[:] = 1.0
    graph = graph.maximum(graph.T).tocsr()
    graph.sort_indices()
    return graph


def edge_index(graph: sp.spmatrix, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch-geometric's ``2 x E`` (source, target) index of a sparse adjacency matrix."""
    coo = sp.coo_matrix(graph)
    index = np.vstack([coo.row, coo.col]).astype(np.int64)
    return torch.from_numpy(index).to(device)
