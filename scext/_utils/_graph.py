from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData

from ._device import resolve_device

# Scanpy's own threshold: exact search below it, approximate (pynndescent) above
EXACT_KNN_MAX_CELLS = 4096
# on the CPU, exact torch search up to this many cells: seconds, where pynndescent's first call in a process
# spends 20-80 s compiling its numba kernels (benchmarks/knn_scale.py)
TORCH_CPU_KNN_MAX_CELLS = 20_000
# Elements of one query-chunk x cells distance block in the torch search (512 MiB of float32): large enough
# for full-speed matmul and topk, small enough that a million cells never need an n x n matrix
TORCH_KNN_BLOCK_ELEMENTS = 2**27
KNN_METHODS = ("auto", "exact", "pynndescent", "torch")


def knn_graph(
    data: np.ndarray,
    n_neighbors: int,
    *,
    metric: str = "euclidean",
    random_state: int = 0,
    method: str = "auto",
    device: str | torch.device = "cpu",
) -> sp.csr_matrix:
    """Undirected, unweighted kNN graph of the rows of `data`, without self-loops.

    Edges come from neighbour indices (each cell to its `n_neighbors` nearest other cells, `knn_indices`),
    then the graph is symmetrised. See `knn_indices` for `metric`, `method` and `device`.
    """
    indices = knn_indices(
        data, n_neighbors, metric=metric, random_state=random_state, method=method, device=device
    )
    return _symmetric_graph(indices, n_neighbors)


def knn_indices(
    data: np.ndarray,
    n_neighbors: int,
    *,
    metric: str = "euclidean",
    random_state: int = 0,
    method: str = "auto",
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Indices (``n_cells x n_neighbors``, int64) of each row's nearest other rows, nearest first.

    ``metric="correlation"`` (Pearson, the PKNN graph) is Euclidean search on rows centred and scaled to
    unit norm, whose distance ``2 - 2 r`` orders neighbours exactly as Pearson's ``r`` does.

    `method`:

    - ``"exact"``: scikit-learn brute force on the CPU; quadratic work, fine up to a few thousand cells.
    - ``"pynndescent"``: approximate, sub-quadratic, the only CPU option at a million cells. Recall falls
      with cells and dimension (0.96 at 100,000 and 0.85 at a million cells of 50-d Gaussian blobs,
      ``benchmarks/knn_scale.py``).
    - ``"torch"``: exact brute force with torch on `device`, in query chunks so memory stays bounded
      (float32 on centred data, candidates re-ranked by direct differences: in practice the neighbours of
      float64 search). Quadratic work, which suits a GPU; on a CPU it takes minutes from ~100,000 cells.
    - ``"auto"``: exact up to 4,096 cells (as Scanpy), then ``"torch"`` on CUDA, or on the CPU up to 20,000
      cells, else ``"pynndescent"``.

    `device` is used by ``"torch"`` only.
    """
    if method not in KNN_METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {', '.join(map(repr, KNN_METHODS))}.")
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
    torch_device = resolve_device(device)
    if method == "auto":
        if n_cells <= EXACT_KNN_MAX_CELLS:
            method = "exact"
        else:
            on_gpu = torch_device.type == "cuda"
            method = "torch" if on_gpu or n_cells <= TORCH_CPU_KNN_MAX_CELLS else "pynndescent"
    # each search asks for one extra neighbour, because a cell is (nearly always) its own nearest
    if method == "exact":
        from sklearn.neighbors import NearestNeighbors

        search = NearestNeighbors(n_neighbors=n_neighbors + 1, algorithm="brute").fit(data)
        _, indices = search.kneighbors(data)
    elif method == "pynndescent":
        from pynndescent import NNDescent

        index = NNDescent(data, n_neighbors=n_neighbors + 1, random_state=random_state, n_jobs=None)
        indices, _ = index.neighbor_graph
    else:
        indices = _torch_knn(data, n_neighbors + 1, torch_device)
    return _drop_self(np.asarray(indices, dtype=np.int64), n_neighbors)


def _torch_knn(data: np.ndarray, k: int, device: torch.device) -> np.ndarray:
    n_cells = data.shape[0]
    x = torch.from_numpy(data).to(device)
    # distances do not change under translation, but the float32 expansion below loses precision with the
    # norms: centring removes any common offset (raw expression, uncentred embeddings)
    x = x - x.mean(dim=0)
    # ||q||^2 is constant along a query row, so ||x||^2 - 2 q.x ranks neighbours as the full squared
    # distance does, with one pass fewer
    squared_norms = x.square().sum(dim=1).unsqueeze(0)
    # the expansion still cancels when neighbours are close relative to the norms (far-apart clusters, many
    # cells), which swaps near-tied neighbours; re-ranking a few spare candidates by direct differences
    # undoes it
    n_candidates = min(n_cells, 2 * k)
    # the candidates' coordinates (chunk x n_candidates x dims) must fit the budget too, for wide data
    chunk = max(1, TORCH_KNN_BLOCK_ELEMENTS // max(n_cells, n_candidates * data.shape[1]))
    indices = np.empty((n_cells, k), dtype=np.int64)
    chunk_rows = torch.arange(chunk, device=device)
    with torch.inference_mode():
        for start in range(0, n_cells, chunk):
            stop = min(start + chunk, n_cells)
            queries = x[start:stop]
            block = torch.addmm(squared_norms, queries, x.T, beta=1.0, alpha=-2.0)
            # a duplicate of a cell is as near as the cell itself; pinning each cell first (in both rankings)
            # makes the self-drop exact, so exactly k - 1 others remain
            rows = chunk_rows[: stop - start]
            block[rows, rows + start] = -torch.inf
            candidates = torch.topk(block, n_candidates, dim=1, largest=False, sorted=False).indices
            distances = (x[candidates] - queries.unsqueeze(1)).square().sum(dim=2)
            distances[candidates == (rows + start).unsqueeze(1)] = -torch.inf
            order = torch.topk(distances, k, dim=1, largest=False, sorted=True).indices
            indices[start:stop] = candidates.gather(1, order).cpu().numpy()
    return indices


def exact_neighbor_distances(data: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `n_neighbors` nearest rows, itself first, and their Euclidean distances (UMAP's
    ``precomputed_knn``), exact and the same bits under any thread count.

    Candidates come from a float64 matrix-product expansion; the kept distances are then computed from direct
    float64 differences and ranked, so neither the thread count's BLAS blocking nor the expansion's
    cancellation reaches the neighbours or their distances. Quadratic work: for data up to a few thousand
    rows.
    """
    x = np.asarray(data, dtype=np.float64)
    n_cells = x.shape[0]
    if not 1 <= n_neighbors <= n_cells:
        raise ValueError(f"n_neighbors={n_neighbors} must be between 1 and the number of rows ({n_cells}).")
    x = x - x.mean(axis=0)
    squared_norms = np.einsum("ij,ij->i", x, x)
    n_candidates = min(n_cells, 2 * n_neighbors)
    # float64 blocks of an eighth of the torch search's element budget (128 MiB)
    block_elements = TORCH_KNN_BLOCK_ELEMENTS // 8
    chunk = max(1, block_elements // max(n_cells, n_candidates * x.shape[1]))
    indices = np.empty((n_cells, n_neighbors), dtype=np.int64)
    distances = np.empty((n_cells, n_neighbors), dtype=np.float64)
    for start in range(0, n_cells, chunk):
        stop = min(start + chunk, n_cells)
        rows = np.arange(stop - start)
        block = squared_norms[None, :] - 2.0 * (x[start:stop] @ x.T)
        # each cell pinned first, so that an exact duplicate never displaces it
        block[rows, rows + start] = -np.inf
        candidates = np.argpartition(block, n_candidates - 1, axis=1)[:, :n_candidates]
        direct = np.square(x[candidates] - x[start:stop, None, :]).sum(axis=2)
        direct[candidates == (rows + start)[:, None]] = -1.0
        order = np.lexsort((candidates, direct), axis=1)[:, :n_neighbors]
        indices[start:stop] = np.take_along_axis(candidates, order, axis=1)
        distances[start:stop] = np.sqrt(np.maximum(np.take_along_axis(direct, order, axis=1), 0.0))
    return indices, distances


def _drop_self(indices: np.ndarray, n_neighbors: int) -> np.ndarray:
    n_cells = indices.shape[0]
    is_self = indices == np.arange(n_cells)[:, None]
    # a cell missing from its own list (beaten by exact duplicates of it) keeps its first n_neighbors
    is_self[~is_self.any(axis=1), -1] = True
    if not (is_self.sum(axis=1) == 1).all():
        raise RuntimeError("the neighbour search returned a cell more than once in its own neighbour list.")
    return indices[~is_self].reshape(n_cells, n_neighbors)


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


def leiden_codes(
    embedding: np.ndarray, *, resolution: float = 1.0, n_neighbors: int = 15, random_state: int = 0
) -> np.ndarray:
    """Leiden clusters (codes 0 .. C-1) of an embedding: the one way scext clusters a latent space by graph.

    The graph is the unweighted, symmetrised `n_neighbors`-NN graph of `knn_graph` (exact search up to
    20,000 cells); Leiden is Scanpy's igraph implementation, two iterations, at `resolution`.
    """
    import pandas as pd
    import scanpy as sc

    embedding = np.asarray(embedding, dtype=np.float32)
    n_cells = embedding.shape[0]
    graph = knn_graph(embedding, min(n_neighbors, n_cells - 1), random_state=random_state)
    work = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(n_cells)]))
    sc.tl.leiden(
        work,
        adjacency=graph,
        resolution=resolution,
        random_state=random_state,
        flavor="igraph",
        n_iterations=2,
        directed=False,
    )
    return work.obs["leiden"].astype(int).to_numpy()
