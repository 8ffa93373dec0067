"""The one training loop and the one minibatch reader that every scext model uses."""

from ._data import dense_rows, iter_minibatches, map_minibatches
from ._distributed import all_reduce_sum, average_gradients, broadcast_state, reduce_epoch_sums, shard, world
from ._loop import adam, train_loop

__all__ = [
    "adam",
    "all_reduce_sum",
    "average_gradients",
    "broadcast_state",
    "dense_rows",
    "iter_minibatches",
    "map_minibatches",
    "reduce_epoch_sums",
    "shard",
    "train_loop",
    "world",
]
