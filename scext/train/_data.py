from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from ._distributed import shard


def dense_rows(matrix, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows of a dense or CSR matrix as a float32 tensor on `device`; only these rows are densified."""
    if len(rows) == 0:
        # an empty distributed shard; backed (h5py) matrices reject empty selections
        return torch.zeros((0, matrix.shape[1]), device=device)
    block = matrix[rows]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    tensor = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def iter_minibatches(
    matrix,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    extras: Sequence[torch.Tensor] = (),
    distributed: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield ``(x, *extras)`` minibatches over `rows` of `matrix`.

    `extras` are per-cell tensors indexed like the matrix (labels, weights) and already on `device`. The
    order is drawn from `generator` so that a seeded run visits the same batches. With `distributed` and
    an initialised `torch.distributed` process group, each rank gets its contiguous shard of every global
    minibatch of `batch_size` rows (possibly empty; see `scext.train.train_loop`); every rank must pass
    the same `rows` and an identically seeded `generator`. Only the shard's rows are read.
    """
    rows = np.asarray(rows)
    order = torch.randperm(len(rows), generator=generator).numpy() if shuffle else np.arange(len(rows))
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[order[start : start + batch_size]]
        # sorted rows make CSR slicing sequential; the extras follow the same order
        batch_rows = np.sort(batch_rows)
        if distributed:
            batch_rows = shard(batch_rows)
        x = dense_rows(matrix, batch_rows, device)
        if not extras:  # no index to move to the device
            yield (x,)
            continue
        index = torch.from_numpy(batch_rows).to(device)
        yield (x, *(extra[index] for extra in extras))


@torch.inference_mode()
def map_minibatches(
    function: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]],
    matrix,
    device: torch.device,
    batch_size: int = 1024,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Apply `function` to every row of `matrix` in minibatches; return CPU numpy arrays in row order."""
    rows = np.arange(matrix.shape[0]) if rows is None else np.asarray(rows)
    outputs: list[list[torch.Tensor]] = []
    for start in range(0, len(rows), batch_size):
        result = function(dense_rows(matrix, rows[start : start + batch_size], device))
        result = result if isinstance(result, tuple) else (result,)
        if not outputs:
            outputs = [[] for _ in result]
        for store, value in zip(outputs, result, strict=True):
            store.append(value.detach())
    return tuple(torch.cat(store).cpu().numpy() for store in outputs)
