from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .._settings import settings
from .._utils._device import restore_caller_threads
from ._distributed import average_gradients, broadcast_state, optimizer_parameters, reduce_epoch_sums, world

StepFn = Callable[[tuple[torch.Tensor, ...]], Mapping[str, torch.Tensor]]


def train_loop(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: StepFn,
    batches: Callable[[], Iterable[tuple[torch.Tensor, ...]]],
    n_epochs: int,
    validate: Callable[[], Mapping[str, float]] | None = None,
    patience: int | None = None,
    converged: Callable[[], bool] | None = None,
    progress_bar: bool | None = None,
    description: str = "training",
    distributed: bool = False,
) -> dict[str, list[float]]:
    """Train `module` for up to `n_epochs` and return its history.

    Parameters
    ----------
    step
        Takes a minibatch and returns named loss terms (tensors); ``"loss"`` is the one minimised, the
        others are logged. Each term is averaged over the epoch, weighted by minibatch size.
    batches
        Called once per epoch; yields minibatches whose first element has one row per cell.
    validate
        Called after each epoch under ``torch.no_grad``; its terms are logged with a ``val_`` prefix.
    patience
        Stop when the monitored loss (``val_loss`` if `validate` is given, else ``loss``) has not improved
        for this many epochs, and restore the weights of the best epoch. ``None`` trains all epochs.
    converged
        Called after each epoch; training stops (keeping the current weights) when it returns True. A
        label-free stopping rule of the caller's, such as DEC's "assignments stopped changing".
    distributed
        Data-parallel over the `torch.distributed` process group, if one is initialised (else ignored):
        `batches` yields this rank's shard of each global minibatch (``iter_minibatches(distributed=True)``),
        `step` returns means over the shard, and gradients and epoch terms are averaged over all rows of
        all ranks, so every rank holds the same weights and history as a single process would. Shard-mean
        losses must add up to the global mean (true of per-row losses, not of in-batch contrastive ones);
        `validate` must return the same values on every rank. The progress bar shows on rank 0 only.

    Returns
    -------
    History: ``{term: [value per epoch]}``, plus ``"best_epoch"`` (0-based, one value) when early stopping.
    """
    restore_caller_threads()  # numba may have reset torch's threads during the tool's preprocessing
    show = settings.progress_bar if progress_bar is None else progress_bar
    rank, world_size = world()
    sharded = distributed and world_size > 1
    if sharded:
        broadcast_state(module)
        parameters = optimizer_parameters(optimizer)
        device = parameters[0].device
    history: dict[str, list[float]] = {}
    best_loss, best_epoch, best_state = np.inf, -1, None
    epochs = tqdm(range(n_epochs), desc=description, disable=not show or rank != 0, leave=False)
    for epoch in epochs:
        module.train()
        # accumulate on the device: one host sync per epoch, not one per step
        sums: dict[str, torch.Tensor] = {}
        n_seen = 0
        for batch in batches():
            n = batch[0].shape[0]
            optimizer.zero_grad(set_to_none=True)
            # an empty shard (last minibatch smaller than the world) has no mean loss, but its rank must
            # still join the gradient all-reduce
            if n or not sharded:
                terms = step(batch)
                terms["loss"].backward()
                n_seen += n
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.detach() * n
            if sharded:
                average_gradients(parameters, n)
            optimizer.step()
        totals, n_total = reduce_epoch_sums(sums, n_seen, device) if sharded else (sums, n_seen)
        for name, total in totals.items():
            history.setdefault(name, []).append(float(total) / max(n_total, 1))
        if validate is not None:
            module.eval()
            with torch.no_grad():
                for name, value in validate().items():
                    history.setdefault(f"val_{name}", []).append(float(value))
        monitored = history["val_loss" if validate is not None else "loss"][-1]
        epochs.set_postfix(loss=f"{history['loss'][-1]:.4f}", refresh=False)
        if converged is not None and converged():
            break
        if patience is None:
            continue
        if monitored < best_loss:
            best_loss, best_epoch = monitored, epoch
            best_state = copy.deepcopy(module.state_dict())
        elif epoch - best_epoch >= patience:
            break
    if best_state is not None:
        module.load_state_dict(best_state)
        history["best_epoch"] = [best_epoch]
    module.eval()
    return history


def adam(parameters, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with torch's fused kernel where it has one for `device` (CPU, CUDA), else the multi-tensor
    (``foreach``) one: the same update as the default single-tensor loop, one kernel over all weights."""
    if torch.device(device).type in ("cpu", "cuda"):
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    return torch.optim.Adam(parameters, lr=lr, foreach=True)


def epochs_for_steps(steps: int, steps_per_epoch: int) -> int:
    """Whole epochs of `steps_per_epoch` optimizer steps that take at least `steps` steps: the tools'
    ``n_epochs=None`` schedules count steps, so a larger data set is not trained longer for being larger."""
    return -(-int(steps) // int(steps_per_epoch))
