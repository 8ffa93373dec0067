from __future__ import annotations

import matplotlib.pyplot as plt
from anndata import AnnData
from matplotlib.ticker import MaxNLocator
from scanpy.plotting._utils import savefig_or_show

from .._docs import doc_params


@doc_params
def training_history(
    adata: AnnData,
    key: str = "kratos",
    *,
    terms: list[str] | None = None,
    ncols: int = 4,
    show: bool | None = None,
    save: str | bool | None = None,
    return_fig: bool = False,
):
    """Loss and every other logged term per epoch, training and validation side by side.

    Reads ``adata.uns[key]["history"]`` written by any scext tool; one panel per term (``loss``,
    ``accuracy``, ...), the validation curve dashed, the restored best epoch marked.

    Parameters
    ----------
    adata
        AnnData a scext tool wrote its results to.
    key
        The tool's `key_added`.
    terms
        Terms to draw, in this order; default every logged term but the validation curves.
    ncols
        Panels per row.
    {show_save}

    Returns
    -------
    The figure if `return_fig`, else None.
    """
    if key not in adata.uns or "history" not in adata.uns[key]:
        raise KeyError(
            f"adata.uns[{key!r}]['history'] is missing; run the scext tool with key_added={key!r}."
        )
    history = adata.uns[key]["history"]
    names = terms or [name for name in history if not name.startswith("val_") and name != "best_epoch"]
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}.")
    missing = [name for name in names if name not in history]
    if missing:
        raise KeyError(f"{missing} not in adata.uns[{key!r}]['history'], which has {list(history)}.")
    ncols = min(ncols, len(names))
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.remove()
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(range(1, len(history[name]) + 1), history[name], label="train")
        if f"val_{name}" in history:
            ax.plot(
                range(1, len(history[f"val_{name}"]) + 1), history[f"val_{name}"], "--", label="validation"
            )
        if "best_epoch" in history:
            ax.axvline(int(history["best_epoch"][0]) + 1, color="grey", lw=0.8, label="best epoch")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
    axes[0][0].legend(frameon=False)
    fig.tight_layout()
    savefig_or_show(f"{key}_history", show=show, save=save)
    if return_fig:
        return fig
    return None
