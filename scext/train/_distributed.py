"""Data-parallel training over a `torch.distributed` process group (torchrun, one process per device).

Every rank runs the same code on the same data with the same seed, so splits, scalers, initial weights and
the minibatch order agree without communication. Each global minibatch is split into one contiguous shard
per rank; after the backward pass the gradients are summed across ranks, weighted by shard size, so the
update equals the one a single process takes on the whole minibatch. Without a process group every helper
here is a no-op and training is unchanged.

Gradients are all-reduced explicitly after ``backward`` rather than by `DistributedDataParallel`: DDP
only reduces what flows through its wrapper's ``forward``, while scext's step functions call submodule
methods (``standardize``, ``embed_standardized``, a separate decoder) and would silently go unreduced.
One flat all-reduce per step costs little for these small networks; it forgoes DDP's overlap of
communication with the backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_zero_logging(function: Callable) -> Callable:
    """Run `function` with Scanpy's logging silenced on every rank but 0, so a torchrun job logs once."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if world()[0] == 0:
            return function(*args, **kwargs)
        from scanpy import settings

        previous = settings.verbosity
        settings.verbosity = 0  # errors only
        try:
            return function(*args, **kwargs)
        finally:
            settings.verbosity = previous

    return wrapper


def shard(rows: np.ndarray) -> np.ndarray:
    """This rank's contiguous share of `rows` (`numpy.array_split`); may be empty, never overlaps."""
    rank, size = world()
    if size == 1:
        return rows
    return np.array_split(rows, size)[rank]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (gloo and NCCL hand every rank the same result)."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_state(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank, as `DistributedDataParallel` does at start.

    Seeded runs already start identical; this keeps ranks in lockstep if a caller's initialisation is not.
    """
    if world()[1] == 1:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def average_gradients(parameters: Sequence[torch.nn.Parameter], n_rows: int) -> None:
    """Replace each gradient by the row-weighted mean of the ranks' gradients.

    `n_rows` is this rank's shard size and each rank's gradient is that of its mean loss over the shard,
    so the result is the gradient of the mean loss over the global minibatch, uneven shards included. A
    rank with an empty shard calls this without a backward pass: its missing gradients count as zeros, and
    so do those of parameters no rank used (they then get a zero gradient rather than none).
    """
    if world()[1] == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    dtype = grads[0].dtype
    # one flat buffer: a single collective per step, and the global row count rides along for free
    flat = torch.cat([*(g.reshape(-1).to(dtype) for g in grads), grads[0].new_zeros(1, dtype=dtype)])
    flat[:-1] *= n_rows
    flat[-1] = n_rows
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    # divide on the device: no host synchronisation per step
    flat = flat[:-1] / flat[-1].clamp(min=1)
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        parameter.grad = flat[offset : offset + size].view_as(parameter).to(parameter.dtype)
        offset += size


def reduce_epoch_sums(
    sums: Mapping[str, torch.Tensor], n_rows: int, device: torch.device
) -> tuple[dict[str, float], int]:
    """Sum per-epoch term totals and row counts over the ranks; returns ``({term: total}, rows)``.

    A rank whose shards were all empty never evaluated a term, so the term names come from rank 0, which
    always holds the largest shard of every minibatch.
    """
    names = list(sums)
    if world()[1] == 1:
        return {name: float(sums[name]) for name in names}, n_rows
    shared: list[list[str]] = [names]
    dist.broadcast_object_list(shared, src=0, device=device)
    names = shared[0]
    # float64: per-epoch row counts of large atlases exceed the integers float32 holds exactly
    zero = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.full((), n_rows, dtype=torch.float64, device=device)
    totals = torch.stack([*(sums.get(name, zero).to(device, torch.float64) for name in names), count])
    totals = all_reduce_sum(totals).tolist()
    return dict(zip(names, totals[:-1], strict=True)), int(totals[-1])


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters `optimizer` updates, in a rank-independent order."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
