"""Cluster-partitioned minibatches of a cell graph (Cluster-GCN), for graph models too large for one pass.

torch-geometric's own partitioned and neighbour-sampled loaders need METIS or neighbour sampling from its
optional compiled extensions (pyg-lib, torch-sparse), which have no wheels for current torch releases on
PyPI. A kNN cell graph does not need METIS: its edges join cells that are near in the space the graph was
built on, so K-means parts of that space keep most edges inside a part. Each minibatch joins a few random
parts (Cluster-GCN's stochastic multiple partitions), which restores the edges between them and varies
the batches from epoch to epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from .._utils._graph import edge_index
from ._data import dense_rows

# cells whose coordinates are used to fit the projection and the K-means of the partition
PARTITION_SAMPLE = 50_000
# beyond this many cells (or when forced) graph tools train on minibatches of parts
MAX_FULL_GRAPH_CELLS = 50_000
# parts joined per minibatch (Cluster-GCN's stochastic multiple partitions): their edges are restored in
# the batch, and the random choice of partners varies the batches from epoch to epoch
PARTS_PER_BATCH = 4


def graph_training_mode(training: str, n_cells: int, max_full_graph_cells: int = MAX_FULL_GRAPH_CELLS) -> str:
    """``"full"`` or ``"minibatch"`` for a tool's `training` argument (``"auto"``, ``"full"``, ``"minibatch"``).

    ``"auto"`` trains on the full graph up to `max_full_graph_cells` cells.
    """
    if training not in ("auto", "full", "minibatch"):
        raise ValueError(f"training={training!r} is unknown; choose 'auto', 'full' or 'minibatch'.")
    if training == "auto":
        return "full" if n_cells <= max_full_graph_cells else "minibatch"
    return training


def partition_plan(n_cells: int, batch_size: int) -> tuple[int, int]:
    """(parts, parts per batch) for minibatches of about `batch_size` cells; one part if all cells fit."""
    n_batches = -(-n_cells // batch_size)
    if n_batches == 1:
        return 1, 1
    return min(n_cells, n_batches * PARTS_PER_BATCH), PARTS_PER_BATCH


def batches_per_epoch(n_parts: int, parts_per_batch: int) -> int:
    """Minibatches (optimizer steps) of one epoch of `partition_batches` over a `partition_plan`."""
    return -(-n_parts // parts_per_batch)


def graph_partition(
    coordinates, n_parts: int, *, n_components: int = 50, random_state: int = 0
) -> np.ndarray:
    """Part index (0 .. n_parts - 1) of every cell: K-means on the coordinates the graph was built on.

    `coordinates` is cells x features (dense, sparse, or read by rows like `scext._utils.ScaledColumns`).
    Wide inputs are first projected onto their top `n_components` singular directions (fitted on a sample
    of `PARTITION_SAMPLE` cells, like the K-means), which keeps the neighbourhoods and makes the partition
    cheap for millions of cells.
    """
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import TruncatedSVD

    n_cells = coordinates.shape[0]
    if not 1 <= n_parts <= n_cells:
        raise ValueError(f"n_parts={n_parts} must be between 1 and the number of cells ({n_cells}).")
    if n_parts == 1:
        return np.zeros(n_cells, dtype=np.int64)
    rng = np.random.default_rng(random_state)
    sample = np.sort(rng.choice(n_cells, min(n_cells, PARTITION_SAMPLE), replace=False))
    blocks = range(0, n_cells, 65536)
    if coordinates.shape[1] > n_components:
        svd = TruncatedSVD(n_components, random_state=random_state).fit(coordinates[sample])
        coordinates = np.vstack([svd.transform(coordinates[start : start + 65536]) for start in blocks])
    elif not isinstance(coordinates, np.ndarray):  # sparse, or a lazy row reader such as ScaledColumns
        coordinates = np.vstack([_dense(coordinates[start : start + 65536]) for start in blocks])
    kmeans = MiniBatchKMeans(n_parts, random_state=random_state, n_init=3, batch_size=4096)
    kmeans.fit(coordinates[sample])
    return kmeans.predict(coordinates).astype(np.int64)


def _dense(block) -> np.ndarray:
    return block.toarray() if sp.issparse(block) else np.asarray(block)


def partition_batches(
    parts: np.ndarray,
    parts_per_batch: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[np.ndarray]:
    """Sorted cell indices of each minibatch: `parts_per_batch` parts at a time, every part once per epoch.

    The order of the parts is drawn from `generator`, so a seeded run visits the same batches.
    """
    part_ids = np.unique(parts)
    if shuffle:
        part_ids = part_ids[torch.randperm(len(part_ids), generator=generator).numpy()]
    order = np.argsort(parts, kind="stable")
    bounds = np.searchsorted(parts[order], np.arange(int(parts.max()) + 2))
    for start in range(0, len(part_ids), parts_per_batch):
        chosen = part_ids[start : start + parts_per_batch]
        yield np.sort(np.concatenate([order[bounds[p] : bounds[p + 1]] for p in chosen]))


def induced_edges(graph: sp.csr_matrix, cells: np.ndarray) -> torch.Tensor:
    """torch-geometric edge index of the edges of the symmetric `graph` among `cells` (sorted), renumbered.

    Row slicing of the CSR adjacency costs the batch's edges, not the whole graph's.
    """
    sub = graph[cells][:, cells].tocsr()
    sub.sort_indices()  # the order of `edge_index(graph)`, so one batch of all cells is the full graph
    sub = sub.tocoo()
    return torch.from_numpy(np.vstack([sub.row, sub.col]).astype(np.int64))


def halo_edges(graph: sp.csr_matrix, targets: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """The cells whose messages reach `targets` in one graph layer, and those edges, renumbered.

    Returns ``nodes`` (the targets first, in their order, then their other neighbours) and the edge index
    (row 0: position of the source in ``nodes``, row 1: position of the target in `targets`) of every edge
    ``j -> i`` with i a target, row i of the symmetric `graph` listing its neighbours j. With the targets first, a bipartite
    graph layer called on ``(x[nodes], x[targets])`` adds each target's self-loop where it belongs, so a
    layer's output for all cells can be computed a chunk of targets at a time (layer-wise inference).
    """
    targets = np.asarray(targets, dtype=np.int64)
    rows = graph[targets]
    sources = rows.indices.astype(np.int64)
    local_targets = np.repeat(np.arange(len(targets)), np.diff(rows.indptr))
    others = np.setdiff1d(sources, targets)
    nodes = np.concatenate([targets, others])
    order = np.argsort(nodes, kind="stable")
    local_sources = order[np.searchsorted(nodes[order], sources)]
    edges = torch.from_numpy(np.vstack([local_sources, local_targets]).astype(np.int64))
    return nodes, edges


class CellGraph:
    """A graph model's inputs for the whole cell graph, or for Cluster-GCN minibatches of its parts.

    A batch is ``(x, counts, size_factors, (edges, *graph_inputs(edges, n)), index)``: the rows of its
    cells on the device, the edges among them (renumbered; row 0 the receiving cell, row 1 the sending
    one, as the COO of an adjacency whose row i lists the cells that send to i) with whatever the model
    derives from them (`graph_inputs`, e.g. normalised adjacencies), and the cells' positions in the graph
    (``None`` for the whole graph). Without `parts` the whole graph moves to the device once; with `parts`
    the cells x genes inputs stay on the host (sparse when the input is) and move a batch at a time.

    Parameters
    ----------
    features
        Cells x input features, read by rows (dense, CSR, or a lazy reader such as
        `scext._utils.ScaledColumns`).
    counts
        Cells x genes read by rows for a count likelihood, or None.
    size_factors
        One float32 per cell.
    graph
        Cells x cells adjacency (CSR).
    parts, parts_per_batch, generator
        Part of every cell (`graph_partition`), parts joined per minibatch, and the generator that orders
        the parts of each epoch; ``parts=None`` for whole-graph training.
    graph_inputs
        ``(edges, n_cells) -> tuple`` of tensors the model needs besides the edges; none by default.
    """

    def __init__(
        self,
        features,
        counts,
        size_factors: np.ndarray,
        graph: sp.csr_matrix,
        device: torch.device,
        *,
        parts: np.ndarray | None = None,
        parts_per_batch: int = 1,
        generator: torch.Generator | None = None,
        graph_inputs: Callable[[torch.Tensor, int], tuple] | None = None,
    ):
        self.features, self.counts, self.graph, self.device = features, counts, graph, device
        self.size_factors = torch.from_numpy(size_factors).to(device)
        self.n_cells = len(size_factors)
        self.parts, self.parts_per_batch, self.generator = parts, parts_per_batch, generator
        self.graph_inputs = graph_inputs
        self.whole = None
        if parts is None:
            x = dense_rows(features, np.arange(self.n_cells), device)
            y = None if counts is None else dense_rows(counts, np.arange(self.n_cells), device)
            edges = edge_index(graph, device)
            self.whole = (x, y, self.size_factors, self._graph(edges, self.n_cells), None)
            self.features = self.counts = None

    def training_batches(self):
        """One epoch: the whole graph, or `parts_per_batch` random parts at a time (every part once)."""
        if self.whole is not None:
            return [self.whole]
        batches = partition_batches(self.parts, self.parts_per_batch, generator=self.generator)
        return (self._batch(cells, counts=True) for cells in batches)

    @torch.no_grad()
    def map(self, function, device: torch.device) -> tuple[torch.Tensor, ...]:
        """`function` of every batch (tensors with a row per batch cell), as tensors in cell order.

        Minibatches are the parts `parts_per_batch` at a time in a fixed order, every cell once.
        """
        if self.whole is not None:
            return tuple(value.to(device) for value in function(self.whole))
        outputs = None
        for cells in partition_batches(self.parts, self.parts_per_batch, shuffle=False):
            batch = self._batch(cells, counts=False)
            values = function(batch)
            if outputs is None:
                outputs = [
                    torch.empty((self.n_cells, *value.shape[1:]), dtype=value.dtype, device=device)
                    for value in values
                ]
            rows = batch[-1].to(device)
            for output, value in zip(outputs, values, strict=True):
                output[rows] = value.to(device)
        return tuple(outputs)

    def _graph(self, edges: torch.Tensor, n_cells: int) -> tuple:
        extra = () if self.graph_inputs is None else tuple(self.graph_inputs(edges, n_cells))
        return (edges, *extra)

    def _batch(self, cells: np.ndarray, *, counts: bool):
        index = torch.from_numpy(cells).to(self.device)
        edges = induced_edges(self.graph, cells).to(self.device)
        y = dense_rows(self.counts, cells, self.device) if counts and self.counts is not None else None
        x = dense_rows(self.features, cells, self.device)
        return (x, y, self.size_factors[index], self._graph(edges, len(cells)), index)
