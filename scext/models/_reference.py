"""Reference cells that a graph model keeps, so it can place new cells into its graph from the file alone.

A graph encoder's output for a cell depends on its neighbours. For a new cell there is no training graph,
so the graph models (`CellVGAE`, `Scdefer`) keep a seeded sample of their training cells: their model
input (the scaled node features) and the training graph's edges among them. A new cell is attached to its
`n_neighbors` nearest reference cells, as a receiver only. The search runs in the input space (scDEFER's
z-scored genes) or in the space the training graph was built in (CellVGAE's genes before min-max scaling,
which would weigh noise genes like markers): messages flow from the
reference cells to the new cell, never back, so the reference cells' outputs do not depend on which new
cells are placed, and a batch of new cells gives each cell the same output as placing it alone.

With at most `max_cells` training cells every cell is kept and the reference graph is the training
graph itself, so the reference embedding equals the training embedding. The cost on disk is
``cells x features x 4`` bytes plus the edges (e.g. 5,000 cells x 2,000 genes: 40 MB).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from ..train import dense_rows

#: training cells a graph model keeps by default to place new cells
MAX_REFERENCE_CELLS = 5000


class ReferenceCells:
    """Input features, graph and (optionally) cluster codes of the reference cells of a graph model.

    Parameters
    ----------
    features
        Reference cells x model input features (float32), in the model's input space (scaled as in training).
    graph
        Reference cells x reference cells adjacency (CSR, the training graph's edges among them).
    rows
        Positions of the reference cells among the training cells.
    """

    def __init__(self, features: np.ndarray, graph: sp.csr_matrix, rows: np.ndarray):
        self.features = np.ascontiguousarray(features, dtype=np.float32)
        self.graph = sp.csr_matrix(graph, dtype=np.float32)
        self.graph.sort_indices()
        self.rows = np.asarray(rows, dtype=np.int64)

    @property
    def n_cells(self) -> int:
        return self.features.shape[0]

    @classmethod
    def sample(
        cls, node_features, graph: sp.csr_matrix, max_cells: int, rng: np.random.Generator
    ) -> ReferenceCells:
        """All training cells when there are at most `max_cells`, else a seeded sample of `max_cells`.

        `node_features` is the training input read by rows (dense, CSR, or a lazy reader such as
        `scext._utils.ScaledColumns`); `graph` the training graph.
        """
        n_cells = graph.shape[0]
        if max_cells < 1:
            raise ValueError(f"max_reference_cells must be at least 1, got {max_cells}.")
        rows = (
            np.arange(n_cells)
            if n_cells <= max_cells
            else np.sort(rng.choice(n_cells, max_cells, replace=False))
        )
        features = dense_rows(node_features, rows, torch.device("cpu")).numpy()
        return cls(features, graph[rows][:, rows], rows)

    # ------------------------------------------------------------------ placement
    def neighbours(self, new_features: np.ndarray, n_neighbors: int, metric: str = "euclidean") -> np.ndarray:
        """Indices (new cells x k) of each new cell's nearest reference cells in the input space, nearest first."""
        return nearest_rows(self.features, new_features, n_neighbors, metric)

    def placement_graph(self, neighbours: np.ndarray) -> sp.csr_matrix:
        """Adjacency over ``[reference cells; new cells]`` whose row i lists the cells that send to cell i.

        Reference rows hold the reference graph; new cell rows hold their reference neighbours. No edge
        leads into a reference cell from a new cell. Graph layers that read row i as the in-neighbours of i
        (`scext.train._graph_batches.halo_edges`) then compute the reference cells as in training.
        """
        n_reference, n_new = self.n_cells, neighbours.shape[0]
        n_total = n_reference + n_new
        new_rows = np.repeat(np.arange(n_reference, n_total), neighbours.shape[1])
        attach = sp.csr_matrix(
            (np.ones(new_rows.size, dtype=np.float32), (new_rows, neighbours.ravel())),
            shape=(n_total, n_total),
        )
        within = self.graph.copy()
        within.resize((n_total, n_total))  # the reference graph, padded with the new cells' empty rows
        combined = (within + attach).tocsr()
        combined.data[:] = 1.0
        combined.sort_indices()
        return combined

    # ------------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        coo = self.graph.tocoo()
        return {
            "features": self.features,
            "graph_row": coo.row.astype(np.int64),
            "graph_col": coo.col.astype(np.int64),
            "rows": self.rows,
        }

    @classmethod
    def from_arrays(cls, arrays: dict) -> ReferenceCells:
        features = np.asarray(arrays["features"], dtype=np.float32)
        n_cells = features.shape[0]
        row, col = np.asarray(arrays["graph_row"]), np.asarray(arrays["graph_col"])
        if row.size and (max(row.max(), col.max()) >= n_cells or min(row.min(), col.min()) < 0):
            raise ValueError("The stored reference graph names cells that the reference does not hold.")
        graph = sp.csr_matrix((np.ones(row.size, dtype=np.float32), (row, col)), shape=(n_cells, n_cells))
        return cls(features, graph, np.asarray(arrays["rows"]))


def nearest_rows(
    points: np.ndarray, queries: np.ndarray, n_neighbors: int, metric: str = "euclidean"
) -> np.ndarray:
    """Indices (queries x k) of each query's nearest rows of `points`, nearest first (exact search).

    ``metric="correlation"`` ranks by Pearson correlation (rows centred and scaled to unit norm). A model
    whose training graph was built in another space than its stored input (CellVGAE's min-max scaling)
    passes the reference points in that space.
    """
    from sklearn.neighbors import NearestNeighbors

    k = min(int(n_neighbors), points.shape[0])
    points, queries = np.asarray(points, dtype=np.float32), np.asarray(queries, dtype=np.float32)
    if metric == "correlation":
        points, queries = _unit_rows(points), _unit_rows(queries)
    search = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(points)
    return search.kneighbors(queries, return_distance=False).astype(np.int64)


def _unit_rows(data: np.ndarray) -> np.ndarray:
    centred = data - data.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.where(norms > 0, norms, 1.0)


def vote(
    reference_embedding: np.ndarray,
    reference_codes: np.ndarray,
    new_embedding: np.ndarray,
    n_neighbors: int = 15,
):
    """Cluster codes of new cells by majority among their `n_neighbors` nearest reference cells in the embedding.

    Returns the winning code per new cell and the vote fractions (new cells x clusters); ties go to the
    lowest code. Codes are 0 .. C-1 (a "noise" category counts as a code like any other).
    """
    from sklearn.neighbors import NearestNeighbors

    k = min(int(n_neighbors), reference_embedding.shape[0])
    search = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(reference_embedding)
    neighbours = search.kneighbors(new_embedding, return_distance=False)
    n_codes = int(reference_codes.max()) + 1
    votes = np.zeros((len(new_embedding), n_codes))
    np.add.at(votes, (np.repeat(np.arange(len(new_embedding)), k), reference_codes[neighbours].ravel()), 1.0)
    fractions = votes / k
    return fractions.argmax(axis=1), fractions
