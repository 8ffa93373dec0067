"""Checks on the shared labelled data sets (marked `data`; skipped when ../shared/datasets is absent)."""

from __future__ import annotations

import pytest
import scanpy as sc

import scext

pytestmark = pytest.mark.data


def test_kratos_sim_140_cw_recovers_causal_genes():
    """KRATOS Table 1: the top-20 CW genes of each cluster are mostly causal or dependent, rarely noise."""
    adata = scext.datasets.load("kratos_sim_140")
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    scext.tl.kratos(adata, groupby="cell_type", device="cpu", random_state=0)
    assert adata.uns["kratos"]["test_accuracy"] > 0.95
    scext.tl.rank_genes_perturbation(adata, method="cw", score="magnitude", device="cpu")
    frame = sc.get.rank_genes_groups_df(adata, group=None, key="kratos_cw")
    roles = (
        frame.groupby("group", observed=True)
        .head(20)
        .merge(adata.var[["gene_role"]], left_on="names", right_index=True)
    )
    per_cluster = roles.groupby("group", observed=True)["gene_role"].value_counts().unstack(fill_value=0)
    assert per_cluster["causal"].mean() >= 8
    assert per_cluster["noise"].mean() <= 3
    assert (per_cluster["noise"] <= 1).sum() >= 3


def test_load_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown data set"):
        scext.datasets.load("not_a_data_set")


def test_cellvgae_separates_cellbench_cell_lines():
    """Three cell lines: CellVGAE with default arguments (2,000 HVG features) embeds them apart.

    Its HDBSCAN clusters are pure but may split a line (the 5-NN graph of 80 cells per line has sub-groups).
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, homogeneity_score

    adata = scext.datasets.load("cellbench_celseq2_3cl")
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=2000)
    scext.tl.cellvgae(adata, device="cpu", random_state=0)
    truth = adata.obs["cell_type"]
    embedded = KMeans(3, n_init=10, random_state=0).fit_predict(adata.obsm["X_cellvgae"])
    assert adjusted_rand_score(truth, embedded) > 0.95
    assigned = adata.obs["cellvgae"] != "noise"
    assert assigned.mean() > 0.9
    assert homogeneity_score(truth[assigned], adata.obs["cellvgae"][assigned]) > 0.9
