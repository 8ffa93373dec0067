"""Cluster-partitioned minibatches of a cell graph (Cluster-GCN), for graph models too large for one pass.

torch-geometric's own partitioned and neighbour-sampled loaders need METIS or neighbour sampling from its
optional compiled extensions (pyg-lib, torch-sparse), which have no wheels for current torch releases on
PyPI. A kNN cell graph does not need METIS: its edges join cells that are near in the space the graph was
built on, so K-means parts of that space keep most edges inside a part. Each minibatch joins a few random
parts (Cluster-GCN's stochastic multiple partitions), which restores the edges between them and varies
the batches from epoch to epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

# cells whose coordinates are used to fit the projection and the K-means of the partition
PARTITION_SAMPLE = 50_000
# beyond this many cells (or when forced) graph tools train on minibatches of parts
MAX_FULL_GRAPH_CELLS = 50_000
# parts joined per minibatch (Cluster-GCN's stochastic multiple partitions): their edges are restored in
# the batch, and the random choice of partners varies the batches from epoch to epoch
PARTS_PER_BATCH = 4


def graph_training_mode(training: str, n_cells: int) -> str:
    """``"full"`` or ``"minibatch"`` for a tool's `training` argument (``"auto"``, ``"full"``, ``"minibatch"``)."""
    if training not in ("auto", "full", "minibatch"):
        raise ValueError(f"training={training!r} is unknown; choose 'auto', 'full' or 'minibatch'.")
    if training == "auto":
        return "full" if n_cells <= MAX_FULL_GRAPH_CELLS else "minibatch"
    return training


def partition_plan(n_cells: int, batch_size: int) -> tuple[int, int]:
    """(parts, parts per batch) for minibatches of about `batch_size` cells; one part if all cells fit."""
    n_batches = -(-n_cells // batch_size)
    if n_batches == 1:
        return 1, 1
    return min(n_cells, n_batches * PARTS_PER_BATCH), PARTS_PER_BATCH


def graph_partition(
    coordinates, n_parts: int, *, n_components: int = 50, random_state: int = 0
) -> np.ndarray:
    """Part index (0 .. n_parts - 1) of every cell: K-means on the coordinates the graph was built on.

    `coordinates` is cells x features (dense or sparse). Wide inputs are first projected onto their top
    `n_components` singular directions (fitted on a sample of `PARTITION_SAMPLE` cells, like the K-means),
    which keeps the neighbourhoods and makes the partition cheap for millions of cells.
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
    if coordinates.shape[1] > n_components:
        svd = TruncatedSVD(n_components, random_state=random_state).fit(coordinates[sample])
        coordinates = np.vstack(
            [svd.transform(coordinates[start : start + 65536]) for start in range(0, n_cells, 65536)]
        )
    coordinates = coordinates.toarray() if sp.issparse(coordinates) else np.asarray(coordinates)
    kmeans = MiniBatchKMeans(n_parts, random_state=random_state, n_init=3, batch_size=4096)
    kmeans.fit(coordinates[sample])
    return kmeans.predict(coordinates).astype(np.int64)


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


def induced_edges(edge_index: torch.Tensor, cells: np.ndarray, n_cells: int) -> torch.Tensor:
    """The edges of `edge_index` among `cells` (sorted), renumbered 0 .. len(cells) - 1."""
    from torch_geometric.utils import subgraph

    subset = torch.from_numpy(np.asarray(cells, dtype=np.int64)).to(edge_index.device)
    return subgraph(subset, edge_index, relabel_nodes=True, num_nodes=n_cells)[0]
