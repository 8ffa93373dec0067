from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from .._settings import settings

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
    progress_bar: bool | None = None,
    description: str = "training",
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

    Returns
    -------
    History: ``{term: [value per epoch]}``, plus ``"best_epoch"`` (0-based, one value) when early stopping.
    """
    show = settings.progress_bar if progress_bar is None else progress_bar
    history: dict[str, list[float]] = {}
    best_loss, best_epoch, best_state = np.inf, -1, None
    epochs = tqdm(range(n_epochs), desc=description, disable=not show, leave=False)
    for epoch in epochs:
        module.train()
        # accumulate on the device: one host sync per epoch, not one per step
        sums: dict[str, torch.Tensor] = {}
        n_seen = 0
        for batch in batches():
            terms = step(batch)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            n = batch[0].shape[0]
            n_seen += n
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach() * n
        for name, total in sums.items():
            history.setdefault(name, []).append(float(total) / max(n_seen, 1))
        if validate is not None:
            module.eval()
            with torch.no_grad():
                for name, value in validate().items():
                    history.setdefault(f"val_{name}", []).append(float(value))
        monitored = history["val_loss" if validate is not None else "loss"][-1]
        epochs.set_postfix(loss=f"{history['loss'][-1]:.4f}", refresh=False)
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
