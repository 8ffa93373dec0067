"""Plots of panel AUROC and redundancy against panel size."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from scext.pl._panels import discriminative_power, redundancy  # noqa: E402


def _table(column: str, methods=("kratos", "wilcoxon")) -> pd.DataFrame:
    rows = [
        {"method": m, "group": g, "fraction": f, column: 0.5 + 0.1 * i + 0.01 * j}
        for i, m in enumerate(methods)
        for j, g in enumerate(["a", "b", "c"])
        for f in (0.001, 0.01, 0.05)
    ]
    return pd.DataFrame(rows)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.mark.parametrize(("plot", "column"), [(discriminative_power, "auroc"), (redundancy, "pcc")])
def test_one_line_per_method(plot, column):
    fig = plot(_table(column), return_fig=True, show=False)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.containers) == 2  # one errorbar line per method
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["kratos", "wilcoxon"]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1%", "1%", "5%"]


@pytest.mark.parametrize(("plot", "column"), [(discriminative_power, "auroc"), (redundancy, "pcc")])
def test_no_method_column_and_given_axes(plot, column):
    _, ax = plt.subplots()
    out = plot(_table(column, methods=("x",)).drop(columns="method"), ax=ax, show=False)
    assert out is ax
    assert len(ax.containers) == 1 and ax.get_legend() is None
    # the mean over the three groups at each fraction
    assert list(ax.containers[0].lines[0].get_ydata()) == pytest.approx([0.51] * 3)


def test_bad_input():
    with pytest.raises(KeyError, match="auroc"):
        discriminative_power(_table("pcc"), show=False)
