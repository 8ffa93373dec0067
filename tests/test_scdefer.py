from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score
from test_kratos import assert_untouched, snapshot

import scext
from scext._utils._graph import knn_graph
from scext.models import Scdefer
from scext.models._scdefer import (
    DISPERSION_RANGE,
    MEAN_RANGE,
    ScdeferNet,
    bounded_exp,
    directions,
    soft_assignments,
    target_distribution,
    zinb_nll,
)

SMALL = {
    "hidden_sizes": (64, 32, 8),
    "decoder_sizes": (32, 64),
    "n_top_genes": 60,
    "n_pretrain_epochs": 40,
    "n_epochs": 40,
    # small networks train stably at rates 10x the defaults, which suit the paper's 1024-wide layers
    "pretrain_lr": 1e-3,
    "lr": 1e-3,
    # every joint epoch runs, so that each term's course can be checked (`test_joint_training_stops_...`)
    "tol": 0.0,
    "device": "cpu",
    "progress_bar": False,
}
TINY = {**SMALL, "n_pretrain_epochs": 2, "n_epochs": 2}


def make_counts(n_cells: int = 150, random_state: int = 0) -> ad.AnnData:
    """Three planted types with 10 up-regulated markers each among 80 genes; raw NB counts in X."""
    return scext.datasets.synthetic_counts(
        n_cells=n_cells, n_genes=80, n_types=3, n_markers=10, fold_change=6.0, random_state=random_state
    )


@pytest.fixture(scope="module")
def toy():
    return make_counts()


@pytest.fixture(scope="module")
def trained(toy):
    adata = toy.copy()
    scext.tl.scdefer(adata, 3, **SMALL)
    return adata


def test_separates_planted_clusters(trained):
    assert adjusted_rand_score(trained.obs["cell_type"], trained.obs["scdefer"]) > 0.9


PRETRAINING_TERMS = ["pretrain_loss", "pretrain_graph", "pretrain_zinb"]
JOINT_TERMS = ["loss", "graph", "zinb", "kl", "bce_d", "bce_g"]


def assert_every_term_moves(history, n_epochs: int = 40):
    assert set(history) == set(PRETRAINING_TERMS + JOINT_TERMS + ["assignment_change"])
    for name in PRETRAINING_TERMS + JOINT_TERMS:
        values = history[name]
        assert len(values) == n_epochs
        assert np.all(np.isfinite(values))
        assert abs(values[-1] - values[0]) > 1e-3 * abs(values[0]), f"{name} did not move: {values[[0, -1]]}"


def test_every_loss_term_moves(trained):
    history = trained.uns["scdefer"]["history"]
    assert_every_term_moves(history)
    # pretraining fits both the counts and the graph (the decoder of the public code was stuck)
    for name in ("pretrain_loss", "pretrain_graph", "pretrain_zinb"):
        assert history[name][-1] < 0.9 * history[name][0], name
    # the targets sharpen Q: the clustering terms fall during joint training
    for name in ("kl", "bce_d", "bce_g"):
        assert history[name][-1] < history[name][0]
    # the global branch of the fusion is used: its weight left its start at 0
    assert trained.uns["scdefer"]["beta"] != 0


def test_slots_and_shapes(trained):
    n_cells, n_genes = trained.shape
    assert trained.obsm["X_scdefer"].shape == (n_cells, 8)
    proba = trained.obsm["scdefer_proba"]
    assert proba.shape == (n_cells, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    labels = trained.obs["scdefer"]
    assert labels.dtype == "category"
    assert all(isinstance(name, str) for name in labels.cat.categories)
    np.testing.assert_array_equal(labels.astype(int).to_numpy(), proba.argmax(axis=1))
    modelled = trained.var["scdefer_modelled"].to_numpy()
    assert modelled.dtype == bool and modelled.sum() == 60
    denoised = trained.layers["scdefer_denoised"]
    assert denoised.shape == (n_cells, n_genes)
    assert np.isnan(denoised[:, ~modelled]).all()
    assert np.isfinite(denoised[:, modelled]).all() and (denoised[:, modelled] > 0).all()
    # the denoised means follow the counts: higher for genes with higher mean counts
    observed = np.asarray(trained.X[:, modelled].mean(axis=0)).ravel()
    assert np.corrcoef(np.log1p(observed), np.log1p(denoised[:, modelled].mean(axis=0)))[0, 1] > 0.9
    params = trained.uns["scdefer"]["params"]
    assert params["device"] == "cpu" and params["random_state"] == 0
    assert params["scext_version"] == scext.__version__
    assert params["n_genes"] == 60 and params["center_init"] == "kmeans" and params["fusion_weight"] == 0.1
    # "auto" trains a graph this small whole
    assert params["training"] == "full" and params["n_parts"] == 1 and params["batch_size"] == 1024
    assert trained.uns["scdefer"]["n_clusters"] == len(labels.cat.categories)


def test_same_random_state_same_output(toy):
    first, second, other = toy.copy(), toy.copy(), toy.copy()
    for adata, seed, denoised in ((first, 3, True), (second, 3, False), (other, 4, True)):
        scext.tl.scdefer(adata, 3, random_state=seed, denoised=denoised, **TINY)
    for key in ("X_scdefer", "scdefer_proba"):
        np.testing.assert_array_equal(first.obsm[key], second.obsm[key])
    # denoised=False only skips writing the cells x genes layer
    assert "scdefer_denoised" not in second.layers
    second = toy.copy()
    scext.tl.scdefer(second, 3, random_state=3, **TINY)
    np.testing.assert_array_equal(first.layers["scdefer_denoised"], second.layers["scdefer_denoised"])
    for name, values in first.uns["scdefer"]["history"].items():
        np.testing.assert_array_equal(values, second.uns["scdefer"]["history"][name])
    assert not np.array_equal(first.obsm["X_scdefer"], other.obsm["X_scdefer"])


def test_one_minibatch_of_all_cells_trains_as_the_full_graph(toy):
    full, minibatch = toy.copy(), toy.copy()
    scext.tl.scdefer(full, 3, training="full", random_state=2, **TINY)
    scext.tl.scdefer(minibatch, 3, training="minibatch", batch_size=toy.n_obs, random_state=2, **TINY)
    params = minibatch.uns["scdefer"]["params"]
    assert params["training"] == "minibatch" and params["n_parts"] == 1
    for key in ("X_scdefer", "scdefer_proba"):
        np.testing.assert_allclose(minibatch.obsm[key], full.obsm[key], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        minibatch.layers["scdefer_denoised"], full.layers["scdefer_denoised"], rtol=1e-5, atol=1e-6
    )
    history = full.uns["scdefer"]["history"]
    assert set(minibatch.uns["scdefer"]["history"]) == set(history)
    for name, values in history.items():
        np.testing.assert_allclose(minibatch.uns["scdefer"]["history"][name], values, rtol=1e-5)


def test_partitioned_minibatches_separate_planted_clusters(toy):
    adata = toy.copy()
    # 150 cells in minibatches of about 75: 8 K-means parts, 4 per batch
    scext.tl.scdefer(adata, 3, training="minibatch", batch_size=75, **SMALL)
    params = adata.uns["scdefer"]["params"]
    assert params["training"] == "minibatch" and params["n_parts"] == 8 and params["batch_size"] == 75
    assert adjusted_rand_score(adata.obs["cell_type"], adata.obs["scdefer"]) > 0.9
    history = adata.uns["scdefer"]["history"]
    assert_every_term_moves(history)
    for name in PRETRAINING_TERMS:
        assert history[name][-1] < 0.9 * history[name][0], name
    # the random pairings of parts make the epoch means of joint training noisy; these still fall
    for name in ("zinb", "bce_d", "bce_g"):
        assert history[name][-1] < history[name][0], name
    # outputs are assembled from the inference batches in cell order (the ARI above checks Q's rows):
    # the denoised means carry each cell's size factor, so their totals follow the cells' counts
    assert np.isfinite(adata.obsm["X_scdefer"]).all()
    modelled = adata.var["scdefer_modelled"].to_numpy()
    observed = np.asarray(adata.X[:, modelled].sum(axis=1)).ravel()
    denoised = adata.layers["scdefer_denoised"][:, modelled].sum(axis=1)
    assert np.corrcoef(observed, denoised)[0, 1] > 0.8


def test_without_zinb_and_existing_graph(toy):
    adata = toy.copy()
    # a neighbors graph in Scanpy's layout (sc.pp.neighbors itself would spend a minute compiling numba)
    adata.obsp["my_connectivities"] = 0.5 * knn_graph(np.log1p(toy.X.toarray()), 8)
    adata.uns["my_neighbors"] = {"connectivities_key": "my_connectivities"}
    scext.tl.scdefer(adata, 3, zinb=False, neighbors_key="my_neighbors", key_added="nz", **TINY)
    assert "nz_denoised" not in adata.layers
    assert not any("zinb" in name for name in adata.uns["nz"]["history"])
    assert adata.uns["nz"]["params"]["graph_source"] == "sc.pp.neighbors graph 'my_neighbors'"
    assert adata.uns["nz"]["params"]["n_edges"] == adata.obsp["my_connectivities"].nnz


def test_leiden_picks_k_when_n_clusters_is_none(toy):
    adata = toy.copy()
    scext.tl.scdefer(adata, **TINY)
    params = adata.uns["scdefer"]["params"]
    assert params["center_init"] == "leiden" and params["n_clusters"] >= 2
    assert adata.obsm["scdefer_proba"].shape == (adata.n_obs, params["n_clusters"])


def test_spectral_init_separates_planted_clusters(toy):
    adata = toy.copy()
    scext.tl.scdefer(adata, 3, center_init="spectral", **{**SMALL, "n_epochs": 5})
    assert adata.uns["scdefer"]["params"]["center_init"] == "spectral"
    assert adjusted_rand_score(adata.obs["cell_type"], adata.obs["scdefer"]) > 0.9


def test_layer_and_copy(toy):
    adata = toy.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    before = snapshot(adata)
    result = scext.tl.scdefer(adata, 3, layer="counts", copy=True, **TINY)
    assert_untouched(adata, before)
    assert "X_scdefer" in result.obsm and result.uns["scdefer"]["params"]["input"] == "adata.layers['counts']"


def _with_x(adata, matrix):
    adata = adata.copy()
    adata.X = matrix
    return adata


BAD_INPUTS = {
    "normalised": (lambda a: _with_x(a, a.X.multiply(1 / a.X.sum(axis=1)).tocsr()), {}, "non-integer"),
    "negative": (lambda a: _with_x(a, a.X.toarray() - 1), {}, "negative"),
    "negative_even_if_allowed": (
        lambda a: _with_x(a, a.X.toarray() - 1),
        {"allow_noninteger": True},
        "negative",
    ),
    "zero_cell": (
        lambda a: _with_x(a, sp.csr_matrix(np.vstack([np.zeros(80), a.X.toarray()[1:]]))),
        {},
        "filter_cells",
    ),
    "one_cluster": (lambda a: a.copy(), {"n_clusters": 1}, "n_clusters"),
    "float_clusters": (lambda a: a.copy(), {"n_clusters": 2.5}, "n_clusters"),
    "bool_clusters": (lambda a: a.copy(), {"n_clusters": True}, "n_clusters"),
    "too_many_clusters": (lambda a: a.copy(), {"n_clusters": 150}, "n_clusters"),
    "fusion_weight": (lambda a: a.copy(), {"fusion_weight": 1.5}, "fusion_weight"),
    "center_init": (lambda a: a.copy(), {"center_init": "random"}, "center_init"),
    "gammas": (lambda a: a.copy(), {"gammas": (0.3, -0.1, 0.5, 0.1)}, "gammas"),
    "tol": (lambda a: a.copy(), {"tol": 1.0}, "tol"),
    "encoders": (lambda a: a.copy(), {"encoders": ("dense", "attention")}, "encoders"),
    "no_encoder": (lambda a: a.copy(), {"encoders": ()}, "encoders"),
    "graph_n_pcs": (lambda a: a.copy(), {"graph_n_pcs": 0}, "graph_n_pcs"),
    "layer": (lambda a: a.copy(), {"layer": "missing"}, "layer"),
    "neighbors_key": (lambda a: a.copy(), {"neighbors_key": "missing"}, "sc.pp.neighbors"),
    "training": (lambda a: a.copy(), {"training": "sampled"}, "training"),
    "batch_size": (lambda a: a.copy(), {"training": "minibatch", "batch_size": 0}, "batch_size"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_before_work_and_leaves_adata_untouched(toy, case):
    make, arguments, message = BAD_INPUTS[case]
    adata = make(toy)
    arguments = {"n_clusters": 3, **arguments}
    before = snapshot(adata)
    with pytest.raises((ValueError, KeyError), match=message):
        scext.tl.scdefer(adata, **{**TINY, **arguments})
    assert_untouched(adata, before)


def _with_genes_without_counts(adata, positions=(0, 40, 80)):
    """`adata` with all-zero genes ``"empty_<position>"`` inserted before these positions of its genes."""
    X = np.insert(adata.X.toarray(), positions, 0, axis=1)
    names = np.insert(adata.var_names.to_numpy(dtype=object), positions, [f"empty_{p}" for p in positions])
    padded = ad.AnnData(sp.csr_matrix(X), obs=adata.obs.copy())
    padded.var_names = names.astype(str)
    return padded


@pytest.mark.parametrize("n_top_genes", [None, 60])
def test_genes_without_counts_are_left_out_and_flagged(toy, n_top_genes):
    """The paper's preprocessing drops genes without counts first: they change nothing but the flags."""
    padded = _with_genes_without_counts(toy)
    empty = padded.var_names.str.startswith("empty_")
    plain = toy.copy()
    arguments = {**TINY, "n_top_genes": n_top_genes, "random_state": 1}
    scext.tl.scdefer(padded, 3, **arguments)
    scext.tl.scdefer(plain, 3, **arguments)
    modelled = padded.var["scdefer_modelled"].to_numpy()
    assert modelled.dtype == bool and not modelled[empty].any()
    np.testing.assert_array_equal(modelled[~empty], plain.var["scdefer_modelled"].to_numpy())
    params = padded.uns["scdefer"]["params"]
    assert (
        params["n_genes_without_counts"] == 3
        and plain.uns["scdefer"]["params"]["n_genes_without_counts"] == 0
    )
    assert params["n_genes"] == (80 if n_top_genes is None else 60)
    assert list(Scdefer.from_adata(padded).var_names) == list(Scdefer.from_adata(plain).var_names)
    for key in ("X_scdefer", "scdefer_proba"):
        np.testing.assert_array_equal(padded.obsm[key], plain.obsm[key])
    denoised = padded.layers["scdefer_denoised"]
    assert np.isnan(denoised[:, empty]).all()
    np.testing.assert_array_equal(denoised[:, ~empty], plain.layers["scdefer_denoised"])


def test_var_highly_variable_flagging_only_genes_without_counts_is_refused(toy):
    adata = _with_genes_without_counts(toy)
    adata.var["highly_variable"] = adata.var_names.str.startswith("empty_")
    before = snapshot(adata)
    with pytest.raises(ValueError, match="only genes without counts"):
        scext.tl.scdefer(adata, 3, **{**TINY, "n_top_genes": None})
    assert_untouched(adata, before)


def test_denoised_layer_is_the_zinb_mean(trained):
    """``layers["scdefer_denoised"]`` is (1 - pi) mu of the trained decoder at each cell's Z and size factor."""
    model = Scdefer.from_adata(trained)
    totals = np.asarray(trained.X.sum(axis=1), dtype=np.float64).ravel()
    size_factors = torch.from_numpy((totals / np.median(totals)).astype(np.float32))
    with torch.no_grad():
        pi, mean, _ = model.net.decode(torch.from_numpy(trained.obsm["X_scdefer"]), size_factors)
    expected, mean = ((1 - pi) * mean).numpy(), mean.numpy()
    columns = trained.var_names.get_indexer(model.var_names)
    denoised = trained.layers["scdefer_denoised"][:, columns]
    np.testing.assert_allclose(denoised, expected, rtol=1e-4, atol=1e-6)
    # the dropout probability is not negligible: the NB mean alone would overstate every entry
    assert (denoised < mean).all() and np.median(denoised / mean) < 0.99


def test_bounded_means_and_dispersions_keep_their_gradient():
    """The ZINB heads are clamped in value, but a head driven past a bound is still pulled back by the loss."""
    logits = torch.tensor([-40.0, -3.0, 0.0, 5.0, 40.0], requires_grad=True)
    value = bounded_exp(logits, *MEAN_RANGE)
    np.testing.assert_allclose(value.detach(), torch.exp(logits.detach()).clamp(*MEAN_RANGE), rtol=1e-6)
    value.sum().backward()
    np.testing.assert_allclose(logits.grad, value.detach(), rtol=1e-6)

    torch.manual_seed(0)
    net = ScdeferNet(6, hidden_sizes=(8, 4), decoder_sizes=(8,), n_clusters=2)
    with torch.no_grad():  # means of genes 0-1 far above the bound, 2-3 below; dispersions out of range
        net.mean.bias[:2], net.mean.bias[2:4] = 40.0, -40.0
        net.dispersion.bias[:2], net.dispersion.bias[2:4] = 40.0, -40.0
    z, size_factors = torch.randn(5, 4), torch.ones(5)
    pi, mean, theta = net.decode(z, size_factors)
    assert torch.equal(mean[:, :2], torch.full((5, 2), MEAN_RANGE[1]))
    assert torch.allclose(mean[:, 2:4], torch.full((5, 2), MEAN_RANGE[0]))
    assert torch.allclose(theta[:, :2], torch.full((5, 2), DISPERSION_RANGE[1]))
    counts = torch.full((5, 6), 3.0)
    zinb_nll(counts, pi, mean, theta).backward()
    for head in (net.mean, net.dispersion):
        gradient = head.bias.grad
        assert torch.isfinite(gradient).all() and (gradient[:4] != 0).all()
    # the gradient pulls the means towards the counts: down from 1e6, up from 1e-5
    assert (net.mean.bias.grad[:2] > 0).all() and (net.mean.bias.grad[2:4] < 0).all()


def test_zinb_gradient_is_exact():
    """The closed-form gradient of the ZINB loss agrees with finite differences (float64, zeros and counts)."""
    generator = torch.Generator().manual_seed(0)
    shape = (7, 11)
    counts = torch.poisson(
        torch.rand(shape, generator=generator, dtype=torch.float64) * 3, generator=generator
    )
    assert 0 < (counts == 0).double().mean() < 1
    pi, mean, theta = (
        (torch.rand(shape, generator=generator, dtype=torch.float64) * width + low).requires_grad_()
        for width, low in ((0.8, 0.05), (5.0, 0.1), (5.0, 0.1))
    )
    assert torch.autograd.gradcheck(lambda p, m, t: zinb_nll(counts, p, m, t), (pi, mean, theta))


def test_clusters_depend_on_the_direction_of_z_only():
    """Q reads each cell's Z as a direction at the pretrained radius: rescaling a cell's Z leaves it unchanged."""
    net = ScdeferNet(6, hidden_sizes=(8, 4), decoder_sizes=(8,), n_clusters=3)
    net.radius.fill_(5.0)
    with torch.no_grad():
        net.centers.copy_(directions(torch.randn(3, 4), net.radius))
    z = torch.randn(10, 4)
    rescaled = z * torch.linspace(0.1, 20, 10)[:, None]
    np.testing.assert_allclose(directions(z, net.radius).norm(dim=1), 5.0, rtol=1e-6)
    with torch.no_grad():
        pairs = zip(
            soft_assignments(net, z, z, z), soft_assignments(net, rescaled, rescaled, rescaled), strict=True
        )
        for before, after in pairs:
            np.testing.assert_allclose(before, after, rtol=1e-5)


def test_default_schedule_counts_optimizer_steps(toy):
    """``None`` epochs: about 30 pretraining and 100 joint steps, whole epochs, however many minibatches an
    epoch has; the targets are refreshed every `update_interval` (5) steps, on minibatches at epoch starts."""
    whole, parts = toy.copy(), toy.copy()
    schedule = {**TINY, "n_pretrain_epochs": None, "n_epochs": None}
    scext.tl.scdefer(whole, 3, **schedule)  # 150 cells, at most 1,024 per batch: the full graph
    # 150 cells in batches of about 40: 16 parts, 4 per batch, so 4 steps per epoch
    scext.tl.scdefer(parts, 3, batch_size=40, **schedule)
    for adata, mode, n_pretrain, n_joint, n_refreshes in (
        (whole, "full", 30, 100, 20),  # steps 0, 5, ..., 95
        (parts, "minibatch", 8, 25, 13),  # epoch starts at steps 0, 8, ..., 96
    ):
        params, history = adata.uns["scdefer"]["params"], adata.uns["scdefer"]["history"]
        assert params["training"] == mode
        assert (params["n_pretrain_epochs"], params["n_epochs"]) == (n_pretrain, n_joint)
        assert len(history["pretrain_loss"]) == n_pretrain and len(history["loss"]) == n_joint
        # the first refresh has nothing to compare with
        assert len(history["assignment_change"]) == n_refreshes - 1


def test_joint_training_stops_when_assignments_settle(toy):
    """DEC's rule: joint training ends at the first target refresh where fewer than `tol` of the cells moved."""
    adata = toy.copy()
    scext.tl.scdefer(adata, 3, **{**SMALL, "tol": 0.01, "n_epochs": 200})
    history = adata.uns["scdefer"]["history"]
    changes = history["assignment_change"]
    n_joint = len(history["loss"])
    assert n_joint < 200 and changes[-1] < 0.01 and (np.asarray(changes[:-1]) >= 0.01).all()
    # refreshes every update_interval (5) epochs; the first has nothing to compare with
    assert n_joint == 5 * len(changes) + 1
    assert adjusted_rand_score(adata.obs["cell_type"], adata.obs["scdefer"]) > 0.9


@pytest.mark.parametrize(
    ("encoders", "kept", "dropped"), [(("dense",), "bce_d", "bce_g"), (("graph",), "bce_g", "bce_d")]
)
def test_single_encoder_ablations(toy, encoders, kept, dropped):
    """The paper's ablations without one encoder: its layers are not built and its cross-entropy not trained."""
    adata = toy.copy()
    scext.tl.scdefer(adata, 3, encoders=encoders, **{**SMALL, "n_epochs": 10})
    history = adata.uns["scdefer"]["history"]
    assert kept in history and dropped not in history
    model = Scdefer.from_adata(adata)
    assert model.encoders == encoders
    assert (model.net.dense is None) == (encoders == ("graph",))
    assert (model.net.graph is None) == (encoders == ("dense",))
    assert adjusted_rand_score(adata.obs["cell_type"], adata.obs["scdefer"]) > 0.9


def test_graph_is_built_on_principal_components_by_default(toy):
    on_pcs, on_genes = toy.copy(), toy.copy()
    scext.tl.scdefer(on_pcs, 3, **TINY)
    scext.tl.scdefer(on_genes, 3, graph_n_pcs=None, **TINY)
    assert "50 principal components" in on_pcs.uns["scdefer"]["params"]["graph_source"]
    assert "log-normalised" in on_genes.uns["scdefer"]["params"]["graph_source"]
    assert on_pcs.uns["scdefer"]["params"]["n_edges"] != on_genes.uns["scdefer"]["params"]["n_edges"] or not (
        np.array_equal(on_pcs.obsm["X_scdefer"], on_genes.obsm["X_scdefer"])
    )


def test_model_saved_before_direction_clustering_is_refused(trained):
    state = Scdefer.from_adata(trained).to_dict()
    del state["state_dict"]["radius"]
    with pytest.raises(ValueError, match="train it again"):
        Scdefer.from_dict(state)


def test_allow_noninteger_proceeds_on_corrected_counts(toy):
    adata = _with_x(toy, toy.X * 1.5)
    scext.tl.scdefer(adata, 3, allow_noninteger=True, **{**TINY, "n_pretrain_epochs": 1, "n_epochs": 1})
    assert adata.uns["scdefer"]["params"]["allow_noninteger"]
    assert np.isfinite(adata.obsm["X_scdefer"]).all()


def test_h5ad_round_trip(trained, tmp_path):
    path = tmp_path / "scdefer.h5ad"
    trained.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.obsm["X_scdefer"], trained.obsm["X_scdefer"])
    np.testing.assert_array_equal(back.obsm["scdefer_proba"], trained.obsm["scdefer_proba"])
    np.testing.assert_array_equal(back.layers["scdefer_denoised"], trained.layers["scdefer_denoised"])
    assert list(back.obs["scdefer"]) == list(trained.obs["scdefer"])
    np.testing.assert_array_equal(back.var["scdefer_modelled"], trained.var["scdefer_modelled"])
    for name, values in trained.uns["scdefer"]["history"].items():
        np.testing.assert_array_equal(back.uns["scdefer"]["history"][name], values)
    assert back.uns["scdefer"]["params"]["device"] == "cpu"


def test_zinb_nll_matches_scipy_and_target_sharpens():
    from scipy import stats

    counts = torch.tensor([[0.0, 3.0, 10.0]])
    pi, mean, theta = (
        torch.tensor([[0.2, 0.1, 0.3]]),
        torch.tensor([[1.5, 2.0, 8.0]]),
        torch.tensor([[2.0, 0.5, 5.0]]),
    )
    nb = stats.nbinom(theta.numpy(), (theta / (theta + mean)).numpy())
    likelihood = pi.numpy() * (counts.numpy() == 0) + (1 - pi.numpy()) * nb.pmf(counts.numpy())
    expected = -np.log(likelihood).mean()
    assert float(zinb_nll(counts, pi, mean, theta)) == pytest.approx(expected, rel=1e-5)
    q = torch.tensor([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
    p = target_distribution(q)
    np.testing.assert_allclose(p.sum(dim=1), 1, atol=1e-6)
    assert p[0, 0] > q[0, 0] and p[1, 1] > q[1, 1]


# ------------------------------------------------------------------ the model: save, load, new cells
def split_80_20(adata, random_state=0):
    """Reference (80 %) and query (20 %, genes shuffled, two extra genes of counts) of one data set."""
    rng = np.random.default_rng(random_state)
    is_query = np.zeros(adata.n_obs, dtype=bool)
    is_query[rng.choice(adata.n_obs, adata.n_obs // 5, replace=False)] = True
    reference, query = adata[~is_query].copy(), adata[is_query].copy()
    extra = rng.poisson(2.0, size=(query.n_obs, 2)).astype(np.float32)
    names = [*query.var_names, "extra_gene_1", "extra_gene_2"]
    order = rng.permutation(len(names))
    matrix = sp.hstack([query.X, sp.csr_matrix(extra)]).tocsr()[:, order]
    query = ad.AnnData(matrix, obs=query.obs.copy(), var={"gene": np.asarray(names)[order]})
    query.var_names = np.asarray(names)[order]
    return reference, query


@pytest.fixture(scope="module")
def split():
    reference, query = split_80_20(make_counts())
    # 10 + 10 epochs separate these planted types already (ARI 1 on both parts)
    scext.tl.scdefer(reference, 3, **{**SMALL, "n_pretrain_epochs": 10, "n_epochs": 10})
    return reference, query, Scdefer.from_adata(reference)


def test_saved_model_places_new_cells(split, tmp_path):
    reference, query, model = split
    assert model.reference.n_cells == reference.n_obs and model.categories == ["0", "1", "2"]
    model.save(tmp_path)
    loaded = Scdefer.load(tmp_path, adata=query)
    assert loaded is not model and list(loaded.var_names) == list(model.var_names)
    # the reloaded model embeds new cells exactly as the object that was trained
    z = model.transform(query)
    np.testing.assert_array_equal(loaded.transform(query), z)
    new = query.copy()
    scext.tl.scdefer_predict(new, loaded, device="cpu")
    np.testing.assert_array_equal(new.obsm["X_scdefer"], z)
    assert new.obsm["scdefer_proba"].shape == (new.n_obs, 3)
    np.testing.assert_allclose(new.obsm["scdefer_proba"].sum(axis=1), 1, atol=1e-5)
    labels = new.obs["scdefer"]
    assert list(labels.cat.categories) == list(reference.obs["scdefer"].cat.categories)
    assert adjusted_rand_score(new.obs["cell_type"], labels) >= 0.8
    record = new.uns["scdefer_predict"]
    assert list(record["categories"]) == ["0", "1", "2"]
    assert record["params"]["n_reference_cells"] == reference.n_obs and record["params"]["device"] == "cpu"
    # a new cell's Z does not depend on the other new cells, nor on how many are placed at once
    np.testing.assert_allclose(model.transform(query[:5]), z[:5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.transform(query, chunk_size=7), z, rtol=1e-5, atol=1e-5)


def test_model_reproduces_its_training_clusters(split):
    reference, _, model = split
    reference_z, z = model.embed_reference_and_new(reference)
    # every training cell is a reference cell: their Z is the training embedding
    np.testing.assert_allclose(reference_z, reference.obsm["X_scdefer"], rtol=1e-5, atol=1e-6)
    # and the training input is reproduced from the counts (normalisation, log1p, scaling)
    matrix, columns = model.read_counts(reference)
    np.testing.assert_array_equal(
        model.input_rows(matrix, columns, 0, reference.n_obs), model.reference.features
    )
    labels, proba = model.predict(reference)
    assert adjusted_rand_score(reference.obs["scdefer"], labels) >= 0.95
    assert (
        proba.shape == reference.obsm["scdefer_proba"].shape and z.shape == reference.obsm["X_scdefer"].shape
    )


def test_predict_with_the_model_of_a_read_h5ad(split, tmp_path):
    reference, query, model = split
    path = tmp_path / "reference.h5ad"
    reference.write_h5ad(path)
    reread = ad.read_h5ad(path)
    new = query.copy()
    scext.tl.scdefer_predict(new, reread, device="cpu", key_added="transfer")
    np.testing.assert_array_equal(new.obsm["X_transfer"], model.transform(query))
    assert "transfer" in new.obs and "transfer_proba" in new.obsm and "transfer_predict" in new.uns
    # a copy leaves the input as it was
    before = snapshot(query)
    result = scext.tl.scdefer_predict(query, reread, device="cpu", copy=True)
    assert_untouched(query, before)
    assert "X_scdefer" in result.obsm


def _with_nan(adata):
    adata = adata.copy()
    adata.X = adata.X.toarray()
    adata.X[2, 3] = np.nan
    return adata


PREDICT_BAD_INPUTS = {
    "missing_genes": (lambda a: a[:, 10:].copy(), {}, "lacks"),
    "nan": (_with_nan, {}, "NaN"),
    "negative": (lambda a: _with_x(a, a.X.toarray() - 1), {}, "negative"),
    "negative_even_if_allowed": (
        lambda a: _with_x(a, a.X.toarray() - 1),
        {"allow_noninteger": True},
        "negative",
    ),
    "non_integer": (lambda a: _with_x(a, a.X * 0.5), {}, "non-integer"),
    "cell_without_counts": (
        lambda a: _with_x(a, sp.csr_matrix(np.vstack([np.zeros(a.n_vars), a.X.toarray()[1:]]))),
        {},
        "filter_cells",
    ),
    "no_cells": (lambda a: a[:0].copy(), {}, "no cells"),
}


@pytest.mark.parametrize("case", list(PREDICT_BAD_INPUTS))
def test_predict_rejects_bad_input_untouched(split, case):
    make, arguments, message = PREDICT_BAD_INPUTS[case]
    adata = make(split[1])
    before = snapshot(adata)
    with pytest.raises(ValueError, match=message):
        scext.tl.scdefer_predict(adata, split[2], device="cpu", **arguments)
    assert_untouched(adata, before)


def test_predict_accepts_corrected_counts_when_allowed(split):
    adata = _with_x(split[1], split[1].X * 1.5)
    scext.tl.scdefer_predict(adata, split[2], device="cpu", allow_noninteger=True)
    assert np.isfinite(adata.obsm["X_scdefer"]).all()


def test_renamed_arguments_warn_and_give_identical_results(toy):
    new, old = toy.copy(), toy.copy()
    scext.tl.scdefer(new, 3, fusion_weight=0.2, center_init="kmeans", keep_model=False, **TINY)
    with pytest.warns(FutureWarning, match="'alpha' is renamed 'fusion_weight'"):
        with pytest.warns(FutureWarning, match="'init' is renamed 'center_init'"):
            scext.tl.scdefer(old, 3, alpha=0.2, init="kmeans", keep_model=False, **TINY)
    for key in ("X_scdefer", "scdefer_proba"):
        np.testing.assert_array_equal(old.obsm[key], new.obsm[key])
    assert old.uns["scdefer"]["params"]["fusion_weight"] == 0.2
    assert "model" not in old.uns["scdefer"] and "alpha" not in old.uns["scdefer"]["params"]
    with pytest.raises(TypeError, match="both 'alpha' and its new name"):
        scext.tl.scdefer(toy.copy(), 3, alpha=0.2, fusion_weight=0.2, **TINY)


def test_placement_keeps_the_reference_cells_training_normalisation():
    """New cells only receive: the reference rows of both normalised adjacencies are the training ones."""
    from scext._utils._graph import edge_index
    from scext.models._reference import ReferenceCells
    from scext.models._scdefer import graph_operators

    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 4)).astype(np.float32)
    graph = knn_graph(features, 5)
    reference = ReferenceCells(features, graph, np.arange(30))
    placement = reference.placement_graph(reference.neighbours(rng.normal(size=(6, 4)), 5))
    assert placement[30:].sum(axis=1).min() == 5 and placement[:30, 30:].nnz == 0
    for trained, placed in zip(
        graph_operators(edge_index(graph), 30), graph_operators(edge_index(placement), 36), strict=True
    ):
        placed = placed.to_dense()
        np.testing.assert_array_equal(placed[:30, :30], trained.to_dense())
        assert (placed[:30, 30:] == 0).all() and (placed[30:, :30].sum(dim=1) > 0).all()
