"""Discriminative power and redundancy of gene panels against panel size (KRATOS Fig. 4 and 5)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from scanpy import settings
from scanpy.plotting._utils import savefig_or_show

from .._docs import doc_params


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _panel_plot(
    results: pd.DataFrame,
    column: str,
    *,
    ylabel: str,
    writekey: str,
    metric_function: str,
    ax: Axes | None,
    show: bool | None,
    save: bool | str | None,
    return_fig: bool,
) -> Figure | Axes | None:
    """Mean of `column` over groups, error bars = std over groups, against fraction; one line per method."""
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"results must be a pandas DataFrame from scext.metrics.{metric_function}.")
    missing = {"fraction", column} - set(results.columns)
    if missing:
        raise KeyError(
            f"results lack column(s) {sorted(missing)}; pass the table of scext.metrics.{metric_function} "
            "or scext.metrics.compare_panels."
        )
    data = results.dropna(subset=[column])
    if data.empty:
        raise ValueError(f"results hold no non-missing {column!r} values to plot.")
    has_method = "method" in data.columns
    data = data.assign(method=data["method"].astype(str) if has_method else "")

    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
    else:
        fig = ax.figure
    # keep the order in which methods appear (compare_panels' order), not alphabetical
    for method in pd.unique(data["method"]):
        # std over groups with ddof=0: the spread of the groups, defined also for a single group
        summary = (
            data[data["method"] == method]
            .groupby("fraction")[column]
            .agg(mean="mean", std=lambda v: v.std(ddof=0))
            .sort_index()
        )
        ax.errorbar(
            summary.index.to_numpy(),
            summary["mean"].to_numpy(),
            yerr=summary["std"].to_numpy(),
            marker="o",
            capsize=3,
            label=method if has_method else None,
        )
    fractions = np.sort(data["fraction"].unique())
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([_percent(f) for f in fractions])
    # log axes add their own minor labels (2x10^-2, ...) between the percent ticks
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("top-k genes (% of all genes)")
    ax.set_ylabel(ylabel)
    if has_method:
        ax.legend(frameon=False)

    savefig_or_show(writekey, show=show, save=save)
    if return_fig:
        return fig
    show = settings.autoshow if show is None else show
    return None if show else ax


@doc_params
def discriminative_power(
    results: pd.DataFrame,
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """AUROC of gene panels against panel size, one line per method (KRATOS Fig. 5).

    Parameters
    ----------
    results
        Table of :func:`scext.metrics.panel_auroc` or :func:`scext.metrics.compare_panels` (`metric="auroc"`):
        columns `fraction`, `auroc`, and optionally `method`.
    ax
        Draw into these axes instead of a new figure.
    {show_save}

    Returns
    -------
    The figure if `return_fig`, else the axes if `show=False`, else None. Points are the mean over groups,
    error bars the standard deviation over groups.
    """
    return _panel_plot(
        results,
        "auroc",
        ylabel="AUROC (SVM, group vs rest)",
        writekey="discriminative_power",
        metric_function="panel_auroc",
        ax=ax,
        show=show,
        save=save,
        return_fig=return_fig,
    )


@doc_params
def redundancy(
    results: pd.DataFrame,
    *,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Mean pairwise Pearson correlation of gene panels against panel size, one line per method (KRATOS Fig. 4).

    Parameters
    ----------
    results
        Table of :func:`scext.metrics.panel_redundancy` or :func:`scext.metrics.compare_panels`
        (`metric="pcc"`): columns `fraction`, `pcc`, and optionally `method`.
    ax
        Draw into these axes instead of a new figure.
    {show_save}

    Returns
    -------
    The figure if `return_fig`, else the axes if `show=False`, else None. Points are the mean over groups,
    error bars the standard deviation over groups.
    """
    return _panel_plot(
        results,
        "pcc",
        ylabel="mean pairwise PCC",
        writekey="redundancy",
        metric_function="panel_redundancy",
        ax=ax,
        show=show,
        save=save,
        return_fig=return_fig,
    )
