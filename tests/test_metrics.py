"""Gene-panel metrics: SVM AUROC (discriminative power) and mean pairwise PCC (redundancy)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from scext.metrics import compare_panels, panel_auroc, panel_redundancy, svm_auroc

N_GENES = 60
GROUPS = ["a", "b", "c"]
N_MARKERS = 5
# k = round(0.05 * 60) = 3 genes: a small panel
SMALL = (0.05,)


def _with_ranking(adata: ad.AnnData, key: str, order: dict[str, list[str]], groupby: str = "group") -> None:
    """Store per-group gene orders in sc.tl.rank_genes_groups' layout (scores descending)."""
    n = len(next(iter(order.values())))
    dtype = [(g, object) for g in order]
    names = np.rec.fromarrays([np.asarray(order[g], dtype=object) for g in order], dtype=dtype)
    scores = np.rec.fromarrays([np.linspace(1, 0, n) for _ in order], dtype=[(g, "f4") for g in order])
    adata.uns[key] = {
        "names": names,
        "scores": scores,
        "params": {
            "groupby": groupby,
            "reference": "rest",
            "method": "test",
            "use_raw": False,
            "layer": None,
        },
    }


@pytest.fixture(scope="module")
def planted() -> ad.AnnData:
    """150 cells (50 per group) x 60 genes; genes 0-14 are markers, 5 per group, shifted up by 3."""
    rng = np.random.default_rng(0)
    labels = np.repeat(GROUPS, 50)
    X = rng.normal(size=(len(labels), N_GENES))
    for i, g in enumerate(GROUPS):
        X[np.ix_(labels == g, range(i * N_MARKERS, (i + 1) * N_MARKERS))] += 3.0
    adata = ad.AnnData(X.astype(np.float32))
    adata.var_names = [f"g{j}" for j in range(N_GENES)]
    adata.obs["group"] = pd.Categorical(labels)
    genes = list(adata.var_names)
    markers = {g: genes[i * N_MARKERS : (i + 1) * N_MARKERS] for i, g in enumerate(GROUPS)}
    noise = genes[len(GROUPS) * N_MARKERS :]
    _with_ranking(
        adata, "markers", {g: markers[g] + [x for x in genes if x not in markers[g]] for g in GROUPS}
    )
    # noise genes first; other groups' markers would separate part of the rest, so they come last
    _with_ranking(adata, "noise", {g: noise + [x for x in genes if x not in noise] for g in GROUPS})
    return adata


def test_markers_separate_noise_does_not(planted):
    good = panel_auroc(planted, "markers", fractions=SMALL, n_iter=3)
    bad = panel_auroc(planted, "noise", fractions=SMALL, n_iter=3)
    assert list(good.columns) == ["group", "fraction", "n_genes", "auroc", "n_cells"]
    assert sorted(good["group"]) == GROUPS
    assert (good["n_genes"] == 3).all() and (good["n_cells"] == 50).all()
    assert (good["auroc"] > 0.9).all(), good
    assert (bad["auroc"] < 0.75).all(), bad


def test_same_seed_same_result_and_sparse_equals_dense(planted):
    first = panel_auroc(planted, "noise", fractions=SMALL, n_iter=2, random_state=3)
    again = panel_auroc(planted, "noise", fractions=SMALL, n_iter=2, random_state=3)
    pd.testing.assert_frame_equal(first, again)
    sparse = planted.copy()
    sparse.X = sp.csr_matrix(sparse.X)
    pd.testing.assert_frame_equal(
        first, panel_auroc(sparse, "noise", fractions=SMALL, n_iter=2, random_state=3)
    )


def test_small_groups_are_skipped(planted):
    adata = planted[:110].copy()  # 50 a, 50 b, 10 c
    adata.uns["markers"] = planted.uns["markers"]
    res = panel_auroc(adata, "markers", fractions=SMALL, n_iter=2, min_cells=40)
    assert sorted(res["group"]) == ["a", "b"]


def test_panel_size_and_short_ranking(planted):
    adata = planted.copy()
    order = {g: list(planted.uns["markers"]["names"][g][:2]) for g in GROUPS}
    _with_ranking(adata, "short", order)
    # 0.001 * 60 rounds to 0 genes, which becomes 1; 0.1 asks for 6 but the ranking holds 2
    res = panel_auroc(adata, "short", fractions=(0.001, 0.1), n_iter=2)
    assert res.groupby("fraction")["n_genes"].unique().map(list).to_dict() == {0.001: [1], 0.1: [2]}


def test_runs_on_scanpy_wilcoxon(planted):
    adata = planted.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(adata, "group", method="wilcoxon")
    res = panel_auroc(adata, "rank_genes_groups", fractions=SMALL, n_iter=2)
    assert sorted(res["group"]) == GROUPS
    assert (res["auroc"] > 0.9).all(), res


def test_one_vs_one_ranking_is_scored_against_its_reference_only(planted):
    adata = planted.copy()
    genes = list(adata.var_names)
    b_markers = genes[N_MARKERS : 2 * N_MARKERS]
    # a one-vs-one ranking "a vs b" that leads with b's markers: they tell a from b, but not a from c
    order = b_markers + [g for g in genes if g not in b_markers]
    _with_ranking(adata, "a_vs_b", {"a": order, "b": order})
    adata.uns["a_vs_b"]["params"]["reference"] = "b"
    pair = panel_auroc(adata, "a_vs_b", fractions=SMALL, n_iter=3)
    assert list(pair["group"]) == ["a"]  # the reference's own entry is skipped
    assert pair["auroc"].item() > 0.95, pair
    assert pair["n_cells"].item() == 50
    rest = panel_auroc(adata, "a_vs_b", reference="rest", fractions=SMALL, n_iter=3)
    assert set(rest["group"]) == {"a", "b"}
    # against b and c together half of the negatives look like a
    assert rest.set_index("group").loc["a", "auroc"] < 0.9, rest
    # only the two groups enter the problem: c's cells can be dropped without changing anything
    without_c = adata[adata.obs["group"] != "c"].copy()
    pd.testing.assert_frame_equal(pair, panel_auroc(without_c, "a_vs_b", fractions=SMALL, n_iter=3))
    with pytest.raises(KeyError, match="reference"):
        panel_auroc(adata, "a_vs_b", reference="d", fractions=SMALL, n_iter=3)


def test_compare_panels_labels(planted):
    res = compare_panels(planted, {"good": "markers", "bad": "noise"}, metric="pcc", fractions=(0.05, 0.1))
    assert list(res.columns) == ["method", "group", "fraction", "n_genes", "pcc"]
    assert list(pd.unique(res["method"])) == ["good", "bad"]
    assert list(pd.unique(compare_panels(planted, ["noise"], metric="pcc")["method"])) == ["noise"]


def _redundancy_data() -> ad.AnnData:
    rng = np.random.default_rng(1)
    n = 400
    base = rng.normal(size=n)
    correlated = np.column_stack([a * base + b for a, b in [(1, 0), (2, 1), (0.5, -3), (3, 2), (1.5, 5)]])
    independent = rng.normal(size=(n, 55))
    adata = ad.AnnData(np.hstack([correlated, independent]))
    adata.var_names = [f"g{j}" for j in range(60)]
    adata.obs["group"] = pd.Categorical(np.repeat(["a", "b"], n // 2))
    genes = list(adata.var_names)
    _with_ranking(adata, "corr", {"a": genes, "b": genes[5:] + genes[:5]})
    return adata


def test_redundancy_correlated_vs_independent():
    adata = _redundancy_data()
    # k = 5 (0.08 * 60 = 4.8), 1 (0.01 * 60 rounds to 1) and 30
    res = panel_redundancy(adata, "corr", fractions=(0.01, 0.08, 0.5)).set_index(["group", "fraction"])
    assert list(res.columns) == ["n_genes", "pcc"]
    assert res.loc[("a", 0.08), "pcc"] == pytest.approx(1.0, abs=1e-8)
    assert abs(res.loc[("b", 0.08), "pcc"]) < 0.1
    assert abs(res.loc[("b", 0.5), "pcc"]) < 0.05
    assert np.isnan(res.loc[("a", 0.01), "pcc"])


def test_redundancy_matches_nanmean_of_corrcoef_and_sparse():
    adata = _redundancy_data()
    X = adata.X.copy()
    X[:, 7] = 2.5  # a constant gene: NaN correlations, left out
    X[:, 8:20] = np.maximum(X[:, 8:20], 0)  # zeros, as in sparse counts
    adata.X = X
    genes = list(adata.var_names)
    _with_ranking(adata, "mixed", {"a": genes[3:] + genes[:3]})
    k = 30
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = np.corrcoef(X[:, 3 : 3 + k], rowvar=False)
    expected = np.nanmean(r[np.triu_indices(k, 1)])
    dense = panel_redundancy(adata, "mixed", fractions=(0.5,))
    assert dense["n_genes"].item() == k
    assert dense["pcc"].item() == pytest.approx(expected, abs=1e-10)
    adata.X = sp.csr_matrix(X)
    assert panel_redundancy(adata, "mixed", fractions=(0.5,))["pcc"].item() == pytest.approx(
        expected, abs=1e-10
    )


def test_layer_and_raw_follow_params(planted):
    adata = planted.copy()
    adata.layers["expr"] = adata.X.copy()
    adata.X = np.zeros_like(adata.X)
    adata.uns["markers"]["params"] = {**adata.uns["markers"]["params"], "layer": "expr"}
    res = panel_redundancy(adata, "markers", fractions=(0.05,))
    assert res["pcc"].notna().all()  # read from the layer, not the all-zero X
    assert (
        panel_redundancy(adata, "markers", fractions=(0.05,), layer=None, use_raw=False)["pcc"].notna().all()
    )


def test_errors(planted):
    with pytest.raises(KeyError, match="rank_genes_groups first"):
        panel_auroc(planted, "absent")
    with pytest.raises(KeyError, match="rank_genes_groups first"):
        panel_redundancy(planted, "absent")
    adata = planted.copy()
    _with_ranking(adata, "bad_gene", {g: ["not_a_gene", *adata.var_names[:3]] for g in GROUPS})
    with pytest.raises(KeyError, match="not_a_gene"):
        panel_auroc(adata, "bad_gene", fractions=SMALL, n_iter=2)
    with pytest.raises(KeyError, match="groupby"):
        panel_auroc(planted, "markers", groupby="nope")
    with pytest.raises(ValueError, match="fractions"):
        panel_redundancy(planted, "markers", fractions=(0.0,))
    with pytest.raises(ValueError, match="metric"):
        compare_panels(planted, ["markers"], metric="f1")


def test_svm_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="at least"):
        svm_auroc(np.zeros((20, 2)), np.r_[np.ones(3), np.zeros(17)].astype(bool))


def test_clustering_scores():
    from scext.metrics import clustering_scores

    rng = np.random.default_rng(0)
    truth = np.repeat(["a", "b", "c"], 50)
    embedding = rng.normal(size=(150, 2)) + np.repeat([[0, 0], [8, 0], [0, 8]], 50, axis=0)
    perfect = clustering_scores(truth, np.repeat(["x", "y", "z"], 50), embedding)
    assert perfect["ari"] == pytest.approx(1) and perfect["ami"] == pytest.approx(1)
    assert perfect["nmi"] == pytest.approx(1) and perfect["silhouette"] > 0.7
    shuffled = clustering_scores(truth, rng.permutation(truth))
    assert abs(shuffled["ari"]) < 0.05 and "silhouette" not in shuffled
