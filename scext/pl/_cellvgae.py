from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData
from scanpy.plotting._utils import savefig_or_show

from .._docs import doc_params


@doc_params
def attention_embedding(
    adata: AnnData,
    *,
    basis: str = "umap",
    key: str = "cellvgae",
    show: bool | None = None,
    save: str | bool | None = None,
    return_fig: bool = False,
    **kwargs,
):
    """Each cell's mean attention to its neighbours, overlaid on an embedding (CellVGAE Fig. 6a).

    A cell's value is the mean of the coefficients its neighbours give its messages (its column of
    ``obsp["<key>_attention"]``, self-loop excluded): high values mark the cells that contribute most.

    Parameters
    ----------
    adata
        AnnData on which `scext.tl.cellvgae` ran with a GAT or GATv2 encoder.
    basis
        Embedding to draw on: ``obsm["X_<basis>"]``.
    key
        The tool's `key_added`.
    {show_save}
    **kwargs
        Passed to `scanpy.pl.embedding`.

    Returns
    -------
    What `scanpy.pl.embedding` returns for these arguments.
    """
    attention = _attention(adata, key)
    off_diagonal = attention - sp.diags(attention.diagonal())
    off_diagonal.eliminate_zeros()
    given = np.asarray(off_diagonal.sum(axis=0)).ravel()
    count = np.diff(off_diagonal.tocsc().indptr)
    values = pd.DataFrame({"mean attention": given / np.maximum(count, 1)}, index=adata.obs_names)
    return _embedding(adata, basis, values, show=show, save=save, return_fig=return_fig, **kwargs)


@doc_params
def attention_graph(
    adata: AnnData,
    *,
    key: str = "cellvgae",
    color: str | None = None,
    n_edges: int = 100,
    self_loops: bool = False,
    basis: str | None = None,
    ax: plt.Axes | None = None,
    show: bool | None = None,
    save: str | bool | None = None,
    return_fig: bool = False,
):
    """Graph of the `n_edges` strongest attention coefficients between cells (CellVGAE Fig. 6c).

    Nodes are the cells those edges touch, coloured by ``obs[color]`` (categorical) when given; arrows go
    from the cell whose message is weighted to the cell that weighs it, wider for larger coefficients.
    Nodes sit at a spring layout, or at their coordinates in ``obsm["X_<basis>"]`` when `basis` is given.

    Parameters
    ----------
    adata
        AnnData on which `scext.tl.cellvgae` ran with a GAT or GATv2 encoder.
    key
        The tool's `key_added`; the coefficients are read from ``obsp["<key>_attention"]``.
    color
        Categorical column of ``adata.obs`` that colours the nodes.
    n_edges
        Number of strongest edges drawn.
    self_loops
        Include the weight a cell gives its own message.
    basis
        Place the nodes at ``obsm["X_<basis>"]`` instead of a spring layout.
    ax
        Draw into these axes instead of a new figure.
    {show_save}

    Returns
    -------
    The figure if `return_fig`, else None.
    """
    import networkx as nx

    attention = sp.coo_matrix(_attention(adata, key))
    keep = np.ones(attention.nnz, dtype=bool) if self_loops else attention.row != attention.col
    target, source, weight = attention.row[keep], attention.col[keep], attention.data[keep]
    top = np.argsort(-weight, kind="stable")[:n_edges]
    graph = nx.DiGraph()
    for i, j, w in zip(source[top], target[top], weight[top], strict=True):
        graph.add_edge(int(i), int(j), weight=float(w))
    nodes = list(graph.nodes)
    if basis is not None:
        coordinates = np.asarray(adata.obsm[f"X_{basis}"])[:, :2]
        layout = {node: coordinates[node] for node in nodes}
    else:
        layout = nx.spring_layout(graph, seed=0)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 5))
    node_colors = "lightgrey"
    if color is not None:
        if color not in adata.obs:
            raise KeyError(f"color={color!r} is not a column of adata.obs.")
        groups = adata.obs[color].astype("category")
        palette = _palette(adata, color, groups.cat.categories)
        node_colors = [palette[groups.iloc[node]] for node in nodes]
        for name in groups.iloc[nodes].unique():
            ax.scatter([], [], color=palette[name], label=str(name))
        ax.legend(frameon=False, fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
    widths = np.array([graph.edges[edge]["weight"] for edge in graph.edges])
    nx.draw_networkx(
        graph,
        pos=layout,
        ax=ax,
        nodelist=nodes,
        node_color=node_colors,
        node_size=40,
        with_labels=False,
        width=0.5 + 3 * widths / max(widths.max(), 1e-12),
        edge_color="grey",
        arrowsize=6,
    )
    ax.set_title(f"top {graph.number_of_edges()} attention edges")
    ax.set_axis_off()
    savefig_or_show(f"{key}_attention_graph", show=show, save=save)
    return fig if return_fig else None


@doc_params
def learned_expression(
    adata: AnnData,
    genes: str | Sequence[str],
    *,
    basis: str = "umap",
    key: str = "cellvgae",
    show: bool | None = None,
    save: str | bool | None = None,
    return_fig: bool = False,
    **kwargs,
):
    """The model's learned expression of genes, E . g, on an embedding (CellVGAE sec. 3.5, Fig. 7).

    E is the latent embedding ``obsm["X_<key>"]`` and g a gene's row of ``varm["<key>_loadings"]`` (P_mu);
    positive values read as high expression.

    Parameters
    ----------
    adata
        AnnData on which `scext.tl.cellvgae` ran.
    genes
        One gene or several, among the model's node features (``var["<key>_feature"]``).
    basis
        Embedding to draw on: ``obsm["X_<basis>"]``.
    key
        The tool's `key_added`.
    {show_save}
    **kwargs
        Passed to `scanpy.pl.embedding` (default colour map ``RdBu_r`` centred at 0).

    Returns
    -------
    What `scanpy.pl.embedding` returns for these arguments.
    """
    genes = [genes] if isinstance(genes, str) else list(genes)
    loadings_key = f"{key}_loadings"
    if loadings_key not in adata.varm or f"X_{key}" not in adata.obsm:
        raise KeyError(
            f"'{loadings_key}' or 'X_{key}' is missing; run scext.tl.cellvgae(adata, key_added={key!r})."
        )
    missing = [gene for gene in genes if gene not in adata.var_names]
    if missing:
        raise KeyError(f"genes {missing} are not in adata.var_names.")
    feature_flag = f"{key}_feature"
    if feature_flag in adata.var:
        unused = [gene for gene in genes if not adata.var.loc[gene, feature_flag]]
        if unused:
            raise ValueError(f"genes {unused} were not node features of the model; their loadings are zero.")
    rows = adata.var_names.get_indexer(genes)
    values = np.asarray(adata.obsm[f"X_{key}"]) @ np.asarray(adata.varm[loadings_key])[rows].T
    table = pd.DataFrame(values, index=adata.obs_names, columns=genes)
    kwargs = {"cmap": "RdBu_r", "vcenter": 0, **kwargs}
    return _embedding(adata, basis, table, show=show, save=save, return_fig=return_fig, **kwargs)


def _attention(adata: AnnData, key: str) -> sp.csr_matrix:
    slot = f"{key}_attention"
    if slot not in adata.obsp:
        raise KeyError(
            f"adata.obsp[{slot!r}] is missing; run scext.tl.cellvgae(adata, key_added={key!r}) with a GAT or "
            "GATv2 encoder (GCN has no attention)."
        )
    return sp.csr_matrix(adata.obsp[slot])


def _embedding(adata: AnnData, basis: str, values: pd.DataFrame, **kwargs):
    """Scanpy's embedding plot of per-cell values that live outside the AnnData."""
    if f"X_{basis}" not in adata.obsm:
        raise KeyError(f"obsm['X_{basis}'] is missing; compute it first (e.g. sc.tl.{basis}).")
    view = AnnData(obs=values, obsm={f"X_{basis}": np.asarray(adata.obsm[f"X_{basis}"])})
    return sc.pl.embedding(view, basis=basis, color=list(values.columns), **kwargs)


def _palette(adata: AnnData, color: str, categories) -> dict:
    colors = adata.uns.get(f"{color}_colors")
    if colors is None or len(colors) < len(categories):
        cmap = plt.get_cmap("tab20")
        colors = [cmap(i % 20) for i in range(len(categories))]
    return dict(zip(categories, colors, strict=False))
