from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from test_kratos import assert_untouched, snapshot

import scext
from scext._utils._graph import knn_graph

SMALL = {
    "hidden_sizes": (16, 16),
    "heads": 2,
    "latent_size": 8,
    "lr": 1e-2,
    "n_epochs": 100,
    "device": "cpu",
    "progress_bar": False,
}


@pytest.fixture(scope="module")
def toy():
    """Three log-normalised types with 10 planted markers each among 60 genes: a 5-NN graph ~97 % pure."""
    adata = scext.datasets.synthetic_counts(
        n_cells=240, n_genes=60, n_types=3, n_markers=10, fold_change=10.0, random_state=0
    )
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


@pytest.fixture(scope="module")
def trained(toy):
    adata = toy.copy()
    scext.tl.cellvgae(adata, attention_heads=True, **SMALL)
    return adata


def test_separates_planted_communities(trained):
    truth = trained.obs["cell_type"]
    embedded = KMeans(3, n_init=10, random_state=0).fit_predict(trained.obsm["X_cellvgae"])
    assert adjusted_rand_score(truth, embedded) > 0.9
    clustered = trained.obs["cellvgae"]
    assigned = np.asarray(clustered != "noise")
    assert assigned.mean() > 0.8
    assert adjusted_rand_score(truth[assigned], clustered[assigned]) > 0.8


def test_slots(trained):
    n_cells, n_genes = trained.shape
    assert trained.obsm["X_cellvgae"].shape == (n_cells, 8)
    assert isinstance(trained.obs["cellvgae"].dtype, type(trained.obs["cell_type"].dtype))
    assert trained.varm["cellvgae_loadings"].shape == (n_genes, 8)
    assert trained.var["cellvgae_feature"].all()
    params = trained.uns["cellvgae"]["params"]
    assert params["conv"] == "gat" and params["device"] == "cpu"
    assert params["training"] == "full" and params["batch_size"] == 8192  # "auto" on 240 cells
    assert params["n_parts"] == 1
    markers = trained.uns["cellvgae"]["marker_genes"]
    assert set(markers.columns) >= {"cluster", "gene", "appearances"}
    # each cluster's top genes include its planted markers
    for cluster in trained.obs["cellvgae"].cat.categories.drop("noise", errors="ignore"):
        cells = trained.obs["cellvgae"] == cluster
        planted_type = trained.obs.loc[cells, "cell_type"].mode()[0]
        planted = set(trained.var_names[trained.var["marker_of"] == planted_type])
        top = set(markers.loc[markers["cluster"] == cluster, "gene"].head(10))
        assert planted & top, f"cluster {cluster}: no planted marker of {planted_type} in {top}"


def assert_attention_is_softmax_over_incoming_edges(toy, trained):
    attention = trained.obsp["cellvgae_attention"]
    graph = knn_graph(toy.X.toarray(), 5)
    # one coefficient per graph edge plus the self-loop GAT adds to every cell
    assert attention.nnz == graph.nnz + toy.n_obs
    pattern = (attention - sp.diags(attention.diagonal())).astype(bool).astype(int)
    pattern.eliminate_zeros()
    assert (pattern != graph.astype(int)).nnz == 0
    per_head = trained.uns["cellvgae"]["attention_heads"]
    assert per_head.shape == (attention.nnz, 2)
    for head in range(per_head.shape[1]):
        matrix = sp.csr_matrix(
            (per_head[:, head], attention.indices, attention.indptr), shape=attention.shape
        )
        np.testing.assert_allclose(np.asarray(matrix.sum(axis=1)).ravel(), 1.0, atol=1e-5)
    np.testing.assert_allclose(per_head.mean(axis=1), attention.data, atol=1e-6)


def test_attention_is_softmax_over_incoming_edges(toy, trained):
    assert_attention_is_softmax_over_incoming_edges(toy, trained)


def test_minibatch_of_every_cell_equals_full_graph(toy):
    """One batch of all cells draws the same random numbers as the full-graph step, so training agrees."""
    runs = []
    for training in ("full", "minibatch"):
        adata = toy.copy()
        scext.tl.cellvgae(
            adata,
            training=training,
            batch_size=toy.n_obs,
            regularizer="mmd",
            feature_decoder=True,
            cluster_method="leiden",
            **{**SMALL, "n_epochs": 20},
        )
        assert adata.uns["cellvgae"]["params"]["training"] == training
        runs.append(adata)
    full, minibatch = (run.uns["cellvgae"]["history"] for run in runs)
    assert set(full) == set(minibatch) == {"loss", "reconstruction", "mmd", "feature_mse"}
    for term in full:
        np.testing.assert_allclose(minibatch[term], full[term], rtol=1e-5, err_msg=term)
    np.testing.assert_allclose(runs[1].obsm["X_cellvgae"], runs[0].obsm["X_cellvgae"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        runs[1].obsp["cellvgae_attention"].toarray(), runs[0].obsp["cellvgae_attention"].toarray(), atol=1e-5
    )


@pytest.mark.parametrize("conv", ["gat", "gatv2", "gcn"])
def test_chunked_layerwise_inference_equals_one_full_graph_pass(toy, conv):
    """Inference over chunks of target cells and their one-hop halos is the full-graph forward pass."""
    import torch

    from scext._utils._graph import edge_index
    from scext.models._cellvgae import CellVGAENet

    torch.manual_seed(0)
    x = torch.from_numpy(np.asarray(toy.X.toarray(), dtype=np.float32))
    graph = knn_graph(toy.X.toarray(), 5)
    edges = edge_index(graph)
    net = CellVGAENet(x.shape[1], conv=conv, hidden_sizes=(16, 8), heads=2, latent_size=4).eval()
    with torch.no_grad():
        whole, _ = net.encode(x, edges)
    chunks = np.array_split(np.random.default_rng(0).permutation(toy.n_obs), 7)
    layer = None if conv == "gcn" else 2
    mu, attention = net.infer(lambda rows: x[rows], graph, chunks, attention_layer=layer)
    torch.testing.assert_close(mu, whole, atol=1e-5, rtol=1e-5)
    if conv == "gcn":
        assert attention is None
        return
    _, one_pass = net.infer(lambda rows: x[rows], graph, [np.arange(toy.n_obs)], attention_layer=layer)

    def dense(pair):
        (source, target), alpha = pair[0].numpy(), pair[1].mean(dim=1).numpy()
        return sp.csr_matrix((alpha, (target, source)), shape=(toy.n_obs, toy.n_obs)).toarray()

    np.testing.assert_allclose(dense(attention), dense(one_pass), atol=1e-6)
    np.testing.assert_allclose(dense(attention).sum(axis=1), 1.0, rtol=1e-5)


def test_minibatch_training_separates_planted_communities(toy):
    adata = toy.copy()
    # 12 parts of about 20 cells, 4 per batch: 3 steps per epoch, so 30 epochs take about as many
    # optimiser steps as the full path's 100
    scext.tl.cellvgae(
        adata,
        training="minibatch",
        batch_size=80,
        feature_decoder=True,
        attention_heads=True,
        cluster_method=None,  # the embedding is scored here; clustering is skipped
        **{**SMALL, "n_epochs": 30},
    )
    assert "cellvgae" not in adata.obs
    assert not {"n_clusters", "n_noise", "marker_genes"} & set(adata.uns["cellvgae"])
    markers = scext.tl.cellvgae_marker_genes(adata, groupby="cell_type")
    assert set(markers["cluster"]) == set(adata.obs["cell_type"].astype(str))
    assert adata.uns["cellvgae"]["params"]["training"] == "minibatch"
    assert adata.uns["cellvgae"]["params"]["n_parts"] == 12
    embedded = KMeans(3, n_init=10, random_state=0).fit_predict(adata.obsm["X_cellvgae"])
    assert adjusted_rand_score(adata.obs["cell_type"], embedded) > 0.9
    history = adata.uns["cellvgae"]["history"]
    assert history["loss"][-5:].mean() < history["loss"][:5].mean()
    for term in ("reconstruction", "kl", "feature_mse"):
        values = history[term]
        assert abs(values[-1] - values[0]) > 1e-3 * max(abs(values[0]), 1e-3), term
    assert_attention_is_softmax_over_incoming_edges(toy, adata)


@pytest.mark.parametrize(
    ("options", "terms"),
    [
        ({}, ("reconstruction", "kl")),
        ({"regularizer": "mmd", "feature_decoder": True}, ("reconstruction", "mmd", "feature_mse")),
    ],
)
def test_every_loss_term_moves(toy, options, terms):
    adata = toy.copy()
    scext.tl.cellvgae(adata, cluster_method="leiden", **{**SMALL, **options})
    history = adata.uns["cellvgae"]["history"]
    assert history["loss"][-5:].mean() < history["loss"][:5].mean()
    for term in terms:
        values = history[term]
        assert len(values) == SMALL["n_epochs"]
        assert abs(values[-1] - values[0]) > 1e-3 * max(abs(values[0]), 1e-3), term


def test_same_seed_same_result(toy):
    runs = []
    for seed in (3, 3, 4):
        adata = toy.copy()
        scext.tl.cellvgae(adata, random_state=seed, **{**SMALL, "n_epochs": 10})
        runs.append(adata)
    np.testing.assert_array_equal(runs[0].obsm["X_cellvgae"], runs[1].obsm["X_cellvgae"])
    np.testing.assert_array_equal(
        runs[0].obsp["cellvgae_attention"].data, runs[1].obsp["cellvgae_attention"].data
    )
    assert (runs[0].obs["cellvgae"] == runs[1].obs["cellvgae"]).all()
    assert not np.allclose(runs[0].obsm["X_cellvgae"], runs[2].obsm["X_cellvgae"])


def test_feature_genes_graph_genes_and_loadings(toy):
    adata = toy.copy()
    scext.tl.cellvgae(adata, n_top_genes=30, graph="pknn", graph_n_top_genes=50, **{**SMALL, "n_epochs": 5})
    used = adata.var["cellvgae_feature"].to_numpy()
    assert used.sum() == 30
    loadings = adata.varm["cellvgae_loadings"]
    assert np.all(loadings[~used] == 0) and np.any(loadings[used] != 0)
    table = scext.tl.cellvgae_marker_genes(adata, groupby="cell_type", n_genes=5, n_dims=2)
    assert set(table["cluster"]) == set(adata.obs["cell_type"].astype(str))
    assert set(table["gene"]) <= set(adata.var_names[used])
    assert table.groupby("cluster")["appearances"].max().le(2).all()


def test_graph_sources(toy):
    adata = toy.copy()
    sc.pp.pca(adata, n_comps=10)
    sc.pp.neighbors(adata, n_neighbors=6, key_added="pcs")
    scext.tl.cellvgae(adata, neighbors_key="pcs", conv="gcn", **{**SMALL, "n_epochs": 5})
    expected = sp.csr_matrix(adata.obsp["pcs_connectivities"], copy=True)
    expected.setdiag(0)
    expected.eliminate_zeros()
    assert adata.uns["cellvgae"]["params"]["n_edges"] == expected.nnz
    assert "cellvgae_attention" not in adata.obsp  # GCN has no attention
    scext.tl.cellvgae(adata, graph_use_rep="X_pca", conv="gatv2", key_added="v2", **{**SMALL, "n_epochs": 5})
    assert adata.obsp["v2_attention"].shape == (adata.n_obs, adata.n_obs)
    scext.tl.cellvgae(adata, graph=sp.eye(adata.n_obs, k=1), key_added="chain", **{**SMALL, "n_epochs": 5})
    assert adata.uns["chain"]["params"]["n_edges"] == 2 * (adata.n_obs - 1)


def test_h5ad_round_trip_and_plots(trained, tmp_path):
    path = tmp_path / "cellvgae.h5ad"
    trained.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.obsm["X_cellvgae"], trained.obsm["X_cellvgae"])
    assert (back.obsp["cellvgae_attention"] != trained.obsp["cellvgae_attention"]).nnz == 0
    assert back.uns["cellvgae"]["marker_genes"].equals(trained.uns["cellvgae"]["marker_genes"])
    sc.pp.neighbors(back, use_rep="X_cellvgae")
    sc.tl.umap(back, random_state=0)
    figures = [
        scext.pl.attention_embedding(back, return_fig=True, show=False),
        scext.pl.attention_graph(back, color="cell_type", n_edges=30, return_fig=True, show=False),
        scext.pl.attention_graph(back, basis="umap", return_fig=True, show=False),
        scext.pl.learned_expression(back, list(back.var_names[:2]), return_fig=True, show=False),
        scext.pl.training_history(back, key="cellvgae", return_fig=True, show=False),
    ]
    assert all(isinstance(figure, plt.Figure) for figure in figures)


@pytest.mark.parametrize(
    ("change", "arguments", "error", "message"),
    [
        (None, {"neighbors_key": "missing"}, KeyError, "sc.pp.neighbors"),
        (None, {"graph": sp.eye(10)}, ValueError, "cells x cells"),
        ("tiny", {"n_neighbors": 5}, ValueError, "n_neighbors"),
        ("nan", {}, ValueError, "NaN"),
        (None, {"conv": "sage"}, ValueError, "conv"),
        (None, {"attention_layer": 4}, ValueError, "attention_layer"),
        (None, {"n_top_genes": 1000}, ValueError, "n_top_genes"),
        (None, {"training": "partial"}, ValueError, "training"),
        (None, {"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_input_leaves_adata_untouched(toy, change, arguments, error, message):
    adata = toy[:5].copy() if change == "tiny" else toy.copy()
    if change == "nan":
        adata.X = adata.X.toarray()
        adata.X[0, 0] = np.nan
    before = snapshot(adata)
    with pytest.raises(error, match=message):
        scext.tl.cellvgae(adata, **{**SMALL, **arguments})
    assert_untouched(adata, before)
