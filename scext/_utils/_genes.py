"""The decisions every tool makes about its input, made in one place: which genes, and whether values are counts.

Genes. Every tool takes `n_top_genes`: an int selects that many highly variable genes with Scanpy's
``seurat`` flavour on log-normalised values (the tool normalises counts first where it models counts);
``None`` honours ``adata.var["highly_variable"]`` when the AnnData has that column (from
``sc.pp.highly_variable_genes``), else takes every gene. The column is honoured by every tool, and only
when `n_top_genes` is None: a number always means the tool's own selection.
"""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from ._anndata import is_integer_valued, row_blocks, stored_values


def highly_variable_column(adata: AnnData, use_raw: bool) -> np.ndarray | None:
    """Positions of the genes ``var["highly_variable"]`` flags, or None without that column (or with
    `use_raw`, whose genes are not ``adata.var``'s)."""
    if use_raw or "highly_variable" not in adata.var:
        return None
    selected = np.flatnonzero(adata.var["highly_variable"].to_numpy(bool))
    if len(selected) == 0:
        raise ValueError("var['highly_variable'] selects no gene; pass n_top_genes instead.")
    return selected


def highly_variable_genes(log_matrix, n_top_genes: int) -> np.ndarray:
    """Positions of the `n_top_genes` genes of highest normalised dispersion (Scanpy, ``flavor="seurat"``)
    in a log-normalised cells x genes matrix; every gene when there are no more than that."""
    import scanpy as sc

    n_genes = log_matrix.shape[1]
    if n_top_genes >= n_genes:
        return np.arange(n_genes)
    variable = sc.pp.highly_variable_genes(
        AnnData(log_matrix), n_top_genes=n_top_genes, flavor="seurat", inplace=False
    )
    return np.flatnonzero(variable["highly_variable"].to_numpy(bool))


def is_counts(matrix) -> bool:
    """Whether every stored value is a non-negative whole number (raw counts), streamed in row blocks."""
    for _, block in row_blocks(matrix):
        values = stored_values(block)
        if values.size and (values.min() < 0 or not is_integer_valued(values)):
            return False
    return True


def check_counts(
    matrix, source: str, tool: str, *, allow_noninteger: bool = False, genes: bool = False
) -> np.ndarray | None:
    """Raw counts only, for count models: no negative values, whole numbers (unless `allow_noninteger`)
    and counts in every cell (a size factor divides by its total).

    Streamed in row blocks, so a backed matrix is never loaded whole; raises a `ValueError` naming `source`
    and the fix. With `genes`, also returns which genes have counts in some cell (bool per column), from
    the same pass, for a tool that leaves the others out; else None.
    """
    low, whole = np.inf, True
    empty_cells = 0
    gene_totals = np.zeros(matrix.shape[1])
    for _, block in row_blocks(matrix):
        values = stored_values(block)
        if values.size:
            low = min(low, float(values.min()))
            whole = whole and (allow_noninteger or is_integer_valued(values))
        cell_totals = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        empty_cells += int((cell_totals == 0).sum())
        if genes:
            gene_totals += np.asarray(block.sum(axis=0, dtype=np.float64)).ravel()
    if low < 0:
        raise ValueError(
            f"{source} holds negative values; {tool} needs raw counts. Pass the raw-count layer "
            "(layer='counts') or use_raw=True if adata.raw holds the counts."
        )
    if not whole:
        raise ValueError(
            f"{source} holds non-integer values (normalised or log data?); {tool} needs raw counts. Pass "
            "the raw-count layer (layer='counts'), or allow_noninteger=True if these are corrected counts."
        )
    if empty_cells:
        raise ValueError(
            f"{empty_cells} cell(s) of {source} have no counts; their size factor is 0. "
            "Remove them first: sc.pp.filter_cells(adata, min_counts=1)."
        )
    return gene_totals > 0 if genes else None
