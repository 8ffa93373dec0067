from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from test_kratos import assert_untouched, snapshot

import scext
from scext._utils import seed_everything
from scext._utils._graph import knn_graph
from scext.models import CellVGAE

SMALL = {
    "hidden_sizes": (16, 16, 8),
    "n_heads": 2,
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
    assert params["training"] == "full" and params["batch_size"] == 1024  # "auto" on 240 cells
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

    from scext._utils._graph import edge_index
    from scext.models._cellvgae import CellVGAENet

    torch.manual_seed(0)
    x = torch.from_numpy(np.asarray(toy.X.toarray(), dtype=np.float32))
    graph = knn_graph(toy.X.toarray(), 5)
    edges = edge_index(graph)
    net = CellVGAENet(x.shape[1], conv=conv, hidden_sizes=(16, 8, 4), n_heads=2).eval()
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


def test_default_schedule_counts_optimizer_steps(toy):
    """``n_epochs=None``: about 50 optimizer steps in whole epochs, one per epoch on the full graph, one per
    minibatch above `batch_size` cells (``training="auto"``)."""
    schedule = {**SMALL, "n_epochs": None, "cluster_method": None}
    whole, parts = toy.copy(), toy.copy()
    scext.tl.cellvgae(whole, **schedule)
    # 240 cells in batches of about 80: 12 parts, 4 per batch, so 3 steps per epoch
    scext.tl.cellvgae(parts, batch_size=80, **schedule)
    for adata, mode, n_epochs in ((whole, "full", 50), (parts, "minibatch", 17)):
        params = adata.uns["cellvgae"]["params"]
        assert params["training"] == mode and params["n_epochs"] == n_epochs
        assert len(adata.uns["cellvgae"]["history"]["loss"]) == n_epochs


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


def test_n_clusters_gives_exactly_k_clusters_and_no_noise(toy):
    adata = toy.copy()
    scext.tl.cellvgae(adata, n_clusters=4, **SMALL)
    labels = adata.obs["cellvgae"]
    assert list(labels.cat.categories) == ["0", "1", "2", "3"] and labels.value_counts().min() > 0
    assert adata.uns["cellvgae"]["n_clusters"] == 4 and adata.uns["cellvgae"]["n_noise"] == 0
    assert adata.uns["cellvgae"]["params"]["n_clusters"] == 4
    # K = the planted types: K-means on mu finds them
    three = toy.copy()
    scext.tl.cellvgae(three, n_clusters=3, **SMALL)
    assert adjusted_rand_score(three.obs["cell_type"], three.obs["cellvgae"]) > 0.9


def test_clusters_do_not_depend_on_the_thread_count(toy):
    threads = torch.get_num_threads()
    runs = []
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            adata = toy.copy()
            scext.tl.cellvgae(adata, **SMALL)
            runs.append(adata.obs["cellvgae"].to_numpy())
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_hdbscan_reads_mu_itself_so_last_bit_changes_keep_the_clusters():
    from scext.tl._cellvgae import _cluster

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=2.0, size=(6, 16))
    planted = rng.integers(6, size=600)
    mu = (centres[planted] + rng.normal(size=(600, 16))).astype(np.float32)
    # what another thread count does to mu: most entries change in their last bits
    nudged = (mu * (1 + 1e-6 * rng.standard_normal(mu.shape))).astype(np.float32)
    assert (nudged != mu).mean() > 0.9
    default = np.asarray(_cluster(mu, "hdbscan", None, 1.0, 0))
    np.testing.assert_array_equal(np.asarray(_cluster(nudged, "hdbscan", None, 1.0, 0)), default)
    assert adjusted_rand_score(planted, default) > 0.8
    # the former read-out finds the same partition here, but through a UMAP layout that the nudge redraws
    # (its cluster numbers change); it stays available
    layout = np.asarray(_cluster(mu, "umap_hdbscan", None, 1.0, 0))
    assert adjusted_rand_score(planted, layout) > 0.8


def test_too_few_cells_for_hdbscan_warn_with_the_way_out(toy):
    adata = toy[:30].copy()
    with pytest.warns(UserWarning, match="n_clusters=K"):
        scext.tl.cellvgae(adata, **{**SMALL, "n_epochs": 5})
    assert adata.uns["cellvgae"]["n_noise"] == 30
    # the way out works on the same cells
    scext.tl.cellvgae(adata, n_clusters=3, **{**SMALL, "n_epochs": 5})
    assert adata.obs["cellvgae"].nunique() == 3


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
        (None, {"n_top_genes": 0}, ValueError, "n_top_genes"),
        (None, {"n_clusters": 1}, ValueError, "n_clusters"),
        ("counts", {"n_top_genes": 30}, ValueError, "raw counts"),
        ("tiny", {"n_clusters": 6, "n_neighbors": 2}, ValueError, "n_clusters"),
        (None, {"training": "partial"}, ValueError, "training"),
        (None, {"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_input_leaves_adata_untouched(toy, change, arguments, error, message):
    adata = toy[:5].copy() if change == "tiny" else toy.copy()
    if change == "counts":  # gene selection needs log-normalised values
        adata = scext.datasets.synthetic_counts(n_cells=60, n_genes=60, n_types=3, random_state=0)
    if change == "nan":
        adata.X = adata.X.toarray()
        adata.X[0, 0] = np.nan
    before = snapshot(adata)
    with pytest.raises(error, match=message):
        scext.tl.cellvgae(adata, **{**SMALL, **arguments})
    assert_untouched(adata, before)


# ---------------------------------------------------------------- the model: save, load, new cells


@pytest.fixture(scope="module")
def split(toy):
    """80 % of the toy trained with the tool (HDBSCAN clusters), and the other 20 % as new cells."""
    order = np.random.default_rng(0).permutation(toy.n_obs)
    cut = int(0.8 * toy.n_obs)
    reference = toy[np.sort(order[:cut])].copy()
    scext.tl.cellvgae(reference, **SMALL)
    return reference, toy[np.sort(order[cut:])].copy()


def shuffled_with_extra_genes(adata, seed=1):
    """The same cells with the genes in another order and two genes the model never saw."""
    order = np.random.default_rng(seed).permutation(adata.n_vars)
    shuffled = adata[:, order].copy()
    extra = ad.AnnData(
        X=sp.csr_matrix(np.ones((adata.n_obs, 2), dtype=np.float32)),
        obs=adata.obs[[]],
        var=pd.DataFrame(index=["extra_1", "extra_2"]),
    )
    combined = ad.concat([shuffled, extra], axis=1, merge="first")
    combined.obs = adata.obs.copy()
    return combined


def test_model_class_reproduces_the_tool_and_survives_save_load(split, tmp_path):
    reference, held_out = split
    # the model object trained by hand, as the tool does: same graph, same seeds, same numbers
    graph = knn_graph(reference.X.toarray(), 5)
    seed_everything(0)
    original = CellVGAE(reference.var_names, hidden_sizes=(16, 16, 8), n_heads=2)
    fitted = original.fit(reference.X, graph, n_epochs=SMALL["n_epochs"], lr=SMALL["lr"], progress_bar=False)
    np.testing.assert_array_equal(fitted.embedding, reference.obsm["X_cellvgae"])
    assert fitted.mode == "full" and fitted.n_parts == 1
    assert fitted.history["loss"] == list(reference.uns["cellvgae"]["history"]["loss"])
    original.set_clusters(reference.obs["cellvgae"])

    original.save(tmp_path)
    with pytest.raises(FileExistsError):
        original.save(tmp_path)
    loaded = CellVGAE.load(tmp_path)
    assert list(loaded.var_names) == list(reference.var_names)
    assert loaded.categories == list(reference.obs["cellvgae"].cat.categories)
    assert loaded.n_heads == (2, 2, 2) and loaded.hidden_sizes == (16, 16, 8)

    new = shuffled_with_extra_genes(held_out)
    scext.tl.cellvgae_predict(new, loaded, device="cpu")
    assert new.obsm["X_cellvgae"].shape == (new.n_obs, 8)
    categories = list(reference.obs["cellvgae"].cat.categories)
    assert list(new.obs["cellvgae"].cat.categories) == categories
    proba = new.obsm["cellvgae_proba"]
    assert proba.shape == (new.n_obs, len(categories))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert (np.asarray(categories)[proba.argmax(axis=1)] == new.obs["cellvgae"].to_numpy()).all()
    assert list(new.uns["cellvgae_predict"]["categories"]) == categories
    assert adjusted_rand_score(new.obs["cell_type"], new.obs["cellvgae"]) >= 0.8
    # the reloaded model embeds exactly as the object that was saved, and as the one the tool stored
    np.testing.assert_array_equal(original.transform(new), new.obsm["X_cellvgae"])
    np.testing.assert_array_equal(CellVGAE.from_adata(reference).transform(new), new.obsm["X_cellvgae"])
    # gene order and extra genes do not matter; a cell embeds the same alone as in a batch (to rounding)
    np.testing.assert_allclose(loaded.transform(held_out), new.obsm["X_cellvgae"], atol=1e-5)
    np.testing.assert_allclose(loaded.transform(held_out[:1]), new.obsm["X_cellvgae"][:1], atol=1e-5)
    # with every training cell kept, the reference cells' mu is the training embedding
    reference_mu, _ = loaded.embed_reference_and_new(held_out[:1])
    np.testing.assert_allclose(reference_mu, reference.obsm["X_cellvgae"], atol=1e-5)


def test_applied_to_its_training_cells_the_model_reproduces_its_clusters(split):
    reference, _ = split
    again = reference.copy()
    del again.obs["cellvgae"]
    scext.tl.cellvgae_predict(again, reference, device="cpu", key_added="again")
    assert adjusted_rand_score(reference.obs["cellvgae"], again.obs["again"]) >= 0.95
    assert "again_proba" in again.obsm and "again_predict" in again.uns


def test_predict_from_a_reloaded_h5ad(split, tmp_path):
    reference, held_out = split
    path = tmp_path / "reference.h5ad"
    reference.write_h5ad(path)
    back = ad.read_h5ad(path)
    from_file, in_memory = held_out.copy(), held_out.copy()
    scext.tl.cellvgae_predict(from_file, back, device="cpu")
    scext.tl.cellvgae_predict(in_memory, reference, device="cpu")
    np.testing.assert_array_equal(from_file.obsm["X_cellvgae"], in_memory.obsm["X_cellvgae"])
    assert (from_file.obs["cellvgae"] == in_memory.obs["cellvgae"]).all()
    copied = scext.tl.cellvgae_predict(held_out, back, device="cpu", key_added="mapped", copy=True)
    assert "mapped" in copied.obs and "mapped" not in held_out.obs


@pytest.mark.parametrize("change", ["missing_gene", "nan", "duplicated_names", "no_cells", "not_a_model"])
def test_predict_bad_input_leaves_adata_untouched(split, change):
    reference, held_out = split
    adata = held_out.copy()
    model = reference
    if change == "missing_gene":
        adata = adata[:, 1:].copy()
        error, message = ValueError, "lacks 1 of"
    elif change == "nan":
        adata.X = adata.X.toarray()
        adata.X[0, 0] = np.nan
        error, message = ValueError, "NaN"
    elif change == "duplicated_names":
        adata.var_names = [adata.var_names[1], *adata.var_names[1:]]
        error, message = ValueError, "not unique"
    elif change == "no_cells":
        adata = adata[:0].copy()
        error, message = ValueError, "no cells"
    else:
        model = scext.models.Kratos(reference.var_names, ["a", "b"])
        error, message = TypeError, "CellVGAE"
    before = snapshot(adata)
    with pytest.raises(error, match=message):
        scext.tl.cellvgae_predict(adata, model, device="cpu")
    assert_untouched(adata, before)


def test_old_argument_names_warn_and_give_the_same_model(toy):
    quick = {key: value for key, value in SMALL.items() if key not in ("hidden_sizes", "n_heads")}
    quick.update(n_epochs=5, cluster_method=None)
    new = toy.copy()
    scext.tl.cellvgae(new, hidden_sizes=(16, 16, 8), n_heads=2, **quick)
    old = toy.copy()
    with pytest.warns(FutureWarning) as warned:
        scext.tl.cellvgae(old, hidden_sizes=(16, 16), heads=2, latent_size=8, **quick)
    messages = " ".join(str(w.message) for w in warned)
    assert "'heads' is renamed 'n_heads'" in messages and "latent_size" in messages
    np.testing.assert_array_equal(old.obsm["X_cellvgae"], new.obsm["X_cellvgae"])
    for params in (old.uns["cellvgae"]["params"], new.uns["cellvgae"]["params"]):
        assert list(params["hidden_sizes"]) == [16, 16, 8] and list(params["n_heads"]) == [2, 2, 2]
    with pytest.raises(TypeError, match="n_heads"):
        scext.tl.cellvgae(toy.copy(), heads=2, n_heads=2, **quick)
    # latent_size alone keeps the old default hidden widths (128, 128)
    default = toy.copy()
    with pytest.warns(FutureWarning, match="latent_size"):
        scext.tl.cellvgae(
            default, latent_size=4, n_epochs=1, cluster_method=None, device="cpu", keep_model=False
        )
    assert list(default.uns["cellvgae"]["params"]["hidden_sizes"]) == [128, 128, 4]
    assert default.obsm["X_cellvgae"].shape == (toy.n_obs, 4)
    assert "model" not in default.uns["cellvgae"]

    # a model without clusters embeds new cells but has nothing to predict
    model = CellVGAE.from_adata(new)
    assert model.categories is None
    with pytest.raises(ValueError, match="no clusters"):
        model.predict(toy[:10].copy())
    cells = toy[:10].copy()
    scext.tl.cellvgae_predict(cells, new, device="cpu")
    assert cells.obsm["X_cellvgae"].shape == (10, 8)
    assert "cellvgae" not in cells.obs and "cellvgae_proba" not in cells.obsm
    assert cells.uns["cellvgae_predict"]["categories"] is None


def test_params_record_and_stored_model(trained):
    params = trained.uns["cellvgae"]["params"]
    assert list(params["hidden_sizes"]) == [16, 16, 8] and list(params["n_heads"]) == [2, 2, 2]
    assert params["latent_size"] is None and params["keep_model"] is True
    assert params["graph"] == "knn" and params["n_edges"] > 0 and params["input"] == "adata.X"
    assert params["regularizer_weight"] == pytest.approx(1 / trained.n_obs)
    assert params["min_cluster_size"] == 10 and params["scext_version"] == scext.__version__
    model = CellVGAE.from_adata(trained)
    assert model.reference.n_cells == trained.n_obs
    assert model.categories == list(trained.obs["cellvgae"].cat.categories)


@pytest.mark.parametrize(
    "options",
    [
        {"conv": "gcn", "graph": "pknn", "max_reference_cells": 100},
        {"conv": "gatv2", "training": "minibatch", "batch_size": 80, "feature_decoder": True},
    ],
)
def test_every_variant_places_new_cells(toy, options):
    adata = toy[:200].copy()
    scext.tl.cellvgae(adata, cluster_method=None, **{**SMALL, "n_epochs": 3, **options})
    model = CellVGAE.from_adata(adata)
    expected_reference = min(options.get("max_reference_cells", 5000), adata.n_obs)
    assert model.reference.n_cells == expected_reference
    assert model.metric == ("correlation" if options.get("graph") == "pknn" else "euclidean")
    # clusters may come from anywhere, one label per training cell; the sampled reference keeps its own
    model.set_clusters(adata.obs["cell_type"])
    new = toy[200:].copy()
    labels, proba = model.predict(new)
    assert list(labels.categories) == list(adata.obs["cell_type"].cat.categories)
    assert proba.shape == (new.n_obs, 3) and np.allclose(proba.sum(axis=1), 1)
    together = model.transform(new, chunk_size=7)
    assert together.shape == (new.n_obs, 8) and np.isfinite(together).all()
    np.testing.assert_allclose(model.transform(new[3:4]), together[3:4], atol=1e-5)
