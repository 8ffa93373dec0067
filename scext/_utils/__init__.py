"""Shared plumbing: device, seeds, AnnData access, input checks. Every tool uses these, none re-implements them."""

from ._anndata import check_finite, dense_columns, get_matrix, is_integer_valued, matrix_source
from ._device import resolve_device
from ._random import seed_everything
from ._split import stratified_split

__all__ = [
    "check_finite",
    "dense_columns",
    "get_matrix",
    "is_integer_valued",
    "matrix_source",
    "resolve_device",
    "seed_everything",
    "stratified_split",
]
