"""The one training loop and the one minibatch reader that every scext model uses."""

from ._data import dense_rows, iter_minibatches, map_minibatches
from ._loop import train_loop

__all__ = ["dense_rows", "iter_minibatches", "map_minibatches", "train_loop"]
