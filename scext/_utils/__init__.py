"""Shared plumbing: device, seeds, AnnData access, input checks. Every tool uses these, none re-implements them."""

from ._anndata import (
    ScaledColumns,
    SelectedColumns,
    check_finite,
    column_mean_var,
    column_min_max,
    dense_columns,
    get_matrix,
    is_backed,
    is_integer_valued,
    matrix_source,
    min_value,
    row_blocks,
    stored_values,
)
from ._device import resolve_device
from ._random import seed_everything
from ._split import stratified_split

__all__ = [
    "ScaledColumns",
    "SelectedColumns",
    "check_finite",
    "column_mean_var",
    "column_min_max",
    "dense_columns",
    "get_matrix",
    "is_backed",
    "is_integer_valued",
    "matrix_source",
    "min_value",
    "resolve_device",
    "row_blocks",
    "seed_everything",
    "stored_values",
    "stratified_split",
]
