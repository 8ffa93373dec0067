from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import make_toy
from sklearn.metrics import adjusted_rand_score
from test_kratos import assert_untouched, snapshot

import scext
from scext.models import Cicl, kmeans
from scext.models._cicl import cluster_loss, gaussian_view, instance_loss
from scext.models._kmeans import student_t

# a small network keeps every test to a few seconds on two cores; the equations are those of the defaults
SMALL = {
    "n_layers": 2,
    "n_heads": 2,
    "feedforward_dim": 64,
    "projection_sizes": (64, 32),
    "batch_size": 100,
    "lr": 1e-3,
    "kmeans_n_init": 3,
    "device": "cpu",
}


def blobs(
    n_per: int = 40, centers=((0, 0), (6, 0), (0, 6)), seed: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    points = np.concatenate([rng.normal(c, 0.5, size=(n_per, 2)) for c in centers])
    return torch.tensor(points, dtype=torch.float32), np.repeat(np.arange(len(centers)), n_per)


# ------------------------------------------------------------------ K-means


def test_kmeans_finds_blobs_and_repeats_under_a_seed():
    x, truth = blobs()
    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(5)
        runs.append(kmeans(x, 3, n_init=3, generator=generator))
    centers, labels = runs[0]
    assert centers.shape == (3, 2) and labels.dtype == torch.int64
    assert adjusted_rand_score(truth, labels.numpy()) == 1.0
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    # each point sits with its nearest centre, and each centre is its points' mean
    assert torch.equal(torch.cdist(x, centers).argmin(1), labels)
    for k in range(3):
        torch.testing.assert_close(centers[k], x[labels == k].mean(0))


def test_kmeans_init_reseeds_empty_clusters_and_rejects_bad_k():
    x, truth = blobs()
    # both starting centres far from the data on one side: one cluster would stay empty without re-seeding
    centers, labels = kmeans(x, 3, init=torch.tensor([[100.0, 100.0], [101.0, 100.0], [0.0, 0.0]]))
    assert len(torch.unique(labels)) == 3
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(x, len(x) + 1)
    with pytest.raises(ValueError, match="init"):
        kmeans(x, 3, init=torch.zeros(2, 2))


# ------------------------------------------------------------------ equations


def test_losses_match_the_paper_equations_term_by_term():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    t = 0.5

    def sim(a, b):
        return torch.dot(a, b) / (a.norm() * b.norm()) / t

    ins, clu = 0.0, 0.0
    for same_view, other_view in ((z1, z2), (z2, z1)):
        for i in range(6):
            anchor = same_view[i]
            # eq. 12
            denominator = sum(torch.exp(sim(anchor, same_view[m])) for m in range(6) if m != i)
            denominator += sum(torch.exp(sim(anchor, other_view[m])) for m in range(6))
            ins += -torch.log(torch.exp(sim(anchor, other_view[i])) / denominator)
            # eq. 15
            positive = sum(torch.exp(sim(anchor, other_view[j])) for j in range(6) if labels[j] == labels[i])
            positive += sum(
                torch.exp(sim(anchor, same_view[j])) for j in range(6) if labels[j] == labels[i] and j != i
            )
            negative = sum(torch.exp(sim(anchor, other_view[j])) for j in range(6) if labels[j] != labels[i])
            negative += sum(torch.exp(sim(anchor, same_view[j])) for j in range(6) if labels[j] != labels[i])
            clu += -torch.log(positive / negative)
    torch.testing.assert_close(instance_loss(z1, z2, t), ins / 12)  # eq. 14
    torch.testing.assert_close(cluster_loss(z1, z2, labels, t), clu / 12)  # eq. 16


def test_student_t_and_noise_views():
    h, centers = torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    q = student_t(h, centers, alpha=1.0)
    # alpha = 1: kernel 1 / (1 + d^2), d^2 = 25 between the two
    torch.testing.assert_close(q[0], torch.tensor([1.0, 1 / 26]) / (1 + 1 / 26))
    x = torch.zeros(50, 20)
    generator = torch.Generator().manual_seed(0)
    first, second = gaussian_view(x, generator), gaussian_view(x, generator)
    assert first.min() == 0 and first.max() == 1  # N(0, 1) mapped linearly onto [0, 1]
    assert not torch.equal(first, second)  # a fresh draw for every view


# ------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def clustered_toy():
    adata = make_toy(n_cells=300)
    scext.tl.cicl(adata, n_clusters=3, n_epochs=12, random_state=0, **SMALL)
    return adata


def test_separates_planted_clusters_and_writes_slots(clustered_toy):
    adata = clustered_toy
    assert adjusted_rand_score(adata.obs["cell_type"], adata.obs["cicl"]) > 0.9
    # 60 genes > n_pcs=50: the input is 50 principal components and the constant coordinate, and H keeps
    # the input's width (eq. 3-7)
    assert adata.obsm["X_cicl"].shape == (300, 51)
    assert adata.uns["cicl"]["params"]["n_pcs"] == 50 and adata.uns["cicl"]["params"]["width"] == 51
    assert adata.obsm["cicl_proba"].shape == (300, 3)
    np.testing.assert_allclose(adata.obsm["cicl_proba"].sum(1), 1, atol=1e-5)
    assert list(adata.obs["cicl"].cat.categories) == ["0", "1", "2"]
    # the labels are the argmax of q to the final centres
    assert (adata.obsm["cicl_proba"].argmax(1) == adata.obs["cicl"].cat.codes.to_numpy()).mean() == 1
    params = adata.uns["cicl"]["params"]
    assert params["device"] == "cpu" and params["random_state"] == 0
    assert params["preprocessing"].startswith("none") and params["input"] == "adata.X"
    assert params["scext_version"] == scext.__version__
    assert list(adata.uns["cicl"]["genes"]) == list(adata.var_names)


def test_default_schedule_trains_about_100_steps():
    # n_epochs=None: whole epochs until at least 100 optimizer steps (300 cells in minibatches of 100: 34 x 3)
    adata = make_toy(n_cells=300)
    result = scext.tl.cicl(adata, n_clusters=3, random_state=0, copy=True, **SMALL)
    params = result.uns["cicl"]["params"]
    assert (params["n_epochs"], params["n_steps"]) == (34, 102)
    assert len(result.uns["cicl"]["history"]["loss"]) == 34


def test_result_survives_h5ad(clustered_toy, tmp_path):
    clustered_toy.write_h5ad(tmp_path / "cicl.h5ad")
    reread = ad.read_h5ad(tmp_path / "cicl.h5ad")
    np.testing.assert_array_equal(reread.obsm["X_cicl"], clustered_toy.obsm["X_cicl"])
    assert reread.uns["cicl"]["params"]["n_clusters"] == 3
    np.testing.assert_array_equal(
        reread.uns["cicl"]["history"]["loss"], clustered_toy.uns["cicl"]["history"]["loss"]
    )


def test_both_loss_terms_move(clustered_toy):
    history = clustered_toy.uns["cicl"]["history"]
    assert set(history) == {"loss", "instance", "cluster"}
    assert all(isinstance(v, np.ndarray) and len(v) == 12 for v in history.values())
    assert history["instance"][-1] < 0.95 * history["instance"][0]
    assert history["cluster"][-1] < 0.8 * history["cluster"][0]
    np.testing.assert_allclose(history["loss"], history["instance"] + 0.1 * history["cluster"], rtol=1e-5)


def test_cluster_loss_reaches_the_encoder():
    model = Cicl(20, 3, n_layers=1, n_heads=2, feedforward_dim=16, projection_sizes=(16, 8))
    x = torch.randn(30, 20, generator=torch.Generator().manual_seed(0))
    model.training_step(x, torch.Generator().manual_seed(1))["cluster"].backward()
    first_layer = model.net.layers[0].attention.query.weight
    assert first_layer.grad is not None and first_layer.grad.abs().sum() > 0


def test_pseudo_labels_are_recomputed_every_step():
    # no planted structure: the K-means partition of H is arbitrary and must follow the encoder as it trains
    x = torch.randn(120, 20, generator=torch.Generator().manual_seed(0))
    model = Cicl(20, 4, n_layers=1, n_heads=2, feedforward_dim=32, projection_sizes=(32, 16))
    optimizer = torch.optim.Adam(model.net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    labels, centers = [], []
    for _ in range(15):
        terms = model.training_step(x, generator)
        labels.append(model.last_pseudo_labels.clone())
        centers.append(model.last_centers.clone())
        # the pseudo-labels are those of eq. 8-9 for this step's encoder and centres
        with torch.no_grad():
            h = model.net.encode(x)
        assert torch.equal(student_t(h, centers[-1]).argmax(1), labels[-1])
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
    assert not torch.allclose(centers[0], centers[-1])
    assert adjusted_rand_score(labels[0].numpy(), labels[-1].numpy()) < 0.9
    assert len({tuple(lab.tolist()) for lab in labels}) > 3


def test_same_seed_same_numbers_other_seed_other_numbers():
    runs = []
    for seed in (3, 3, 4):
        adata = make_toy(n_cells=120)
        scext.tl.cicl(adata, n_clusters=3, n_epochs=2, random_state=seed, **SMALL)
        runs.append(adata)
    np.testing.assert_array_equal(runs[0].obsm["X_cicl"], runs[1].obsm["X_cicl"])
    np.testing.assert_array_equal(runs[0].obsm["cicl_proba"], runs[1].obsm["cicl_proba"])
    assert (runs[0].obs["cicl"] == runs[1].obs["cicl"]).all()
    np.testing.assert_array_equal(
        runs[0].uns["cicl"]["history"]["loss"], runs[1].uns["cicl"]["history"]["loss"]
    )
    assert not np.allclose(runs[0].obsm["X_cicl"], runs[2].obsm["X_cicl"])


def test_inference_embedding_is_independent_of_chunks_and_order():
    # documented: every cell attends to all cells (the data set is one batch), computed in query chunks
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(90, 24)).astype(np.float32)
    model = Cicl(24, 3, n_layers=2, n_heads=2, feedforward_dim=32, projection_sizes=(32, 16))
    whole = model.embed(matrix)
    # inference writes the attention product out on the CPU; training uses torch's fused kernel: same numbers
    with torch.enable_grad():
        trained_path = model.net.encode(torch.from_numpy(matrix)).detach()
    torch.testing.assert_close(whole, trained_path, atol=1e-5, rtol=1e-5)
    for chunk in (1, 7, 64):
        torch.testing.assert_close(model.embed(matrix, chunk_size=chunk), whole, atol=1e-5, rtol=1e-5)
    order = rng.permutation(90)
    torch.testing.assert_close(model.embed(matrix[order], chunk_size=16), whole[order], atol=1e-5, rtol=1e-5)
    # sparse input gives the same cells the same embedding
    torch.testing.assert_close(model.embed(sp.csr_matrix(matrix)), whole, atol=1e-6, rtol=1e-6)


def test_counts_get_the_papers_preprocessing():
    adata = scext.datasets.synthetic_counts(n_cells=150, n_genes=80, n_types=3, n_markers=5, fold_change=10)
    before = snapshot(adata)
    result = scext.tl.cicl(adata, n_clusters=3, n_top_genes=30, n_epochs=8, copy=True, **SMALL)
    assert_untouched(adata, before)
    params = result.uns["cicl"]["params"]
    assert params["preprocessing"].startswith("sec. 2.1") and params["n_genes"] == 30
    assert result.obsm["X_cicl"].shape == (150, 30)
    assert len(result.uns["cicl"]["genes"]) == 30 and set(result.uns["cicl"]["genes"]) <= set(adata.var_names)
    assert adjusted_rand_score(adata.obs["cell_type"], result.obs["cicl"]) > 0.8
    # preprocess=False feeds the raw counts as given
    raw = scext.tl.cicl(adata, n_clusters=3, preprocess=False, n_epochs=1, copy=True, **SMALL)
    assert raw.obsm["X_cicl"].shape == (150, 51)  # 80 genes: 50 principal components and the constant
    assert raw.uns["cicl"]["params"]["preprocessing"].startswith("none")


@pytest.mark.parametrize(
    ("change", "kwargs", "error", "message"),
    [
        (None, {"n_clusters": None}, ValueError, "n_clusters is required"),
        (None, {"n_clusters": 1}, ValueError, "at least 2"),
        (None, {"n_clusters": 121}, ValueError, "number of cells"),
        (None, {"n_clusters": 2.5}, ValueError, "n_clusters must be an int"),
        ("nan", {}, ValueError, "NaN"),
        ("few_genes", {}, ValueError, "at least 10"),
        ("empty_cell", {"layer": "counts"}, ValueError, "filter_cells"),
        ("negative", {"preprocess": True}, ValueError, "non-negative"),
        (None, {"layer": "absent"}, KeyError, "not in adata.layers"),
        (None, {"batch_size": 2}, ValueError, "batch_size"),
        (None, {"preprocess": "yes"}, ValueError, "preprocess"),
        (None, {"device": "cuda:7"}, ValueError, "CUDA"),
        (None, {"random_state": "x"}, ValueError, "random_state"),
    ],
)
def test_bad_input_raises_before_training_and_leaves_adata_untouched(
    change, kwargs, error, message, monkeypatch
):
    adata = make_toy(n_cells=120)
    if change == "nan":
        adata.X = adata.X.toarray()
        adata.X[3, 4] = np.nan
    elif change == "few_genes":
        adata = adata[:, :5].copy()
    elif change == "empty_cell":
        counts = adata.layers["counts"].toarray()
        counts[7] = 0
        adata.layers["counts"] = sp.csr_matrix(counts)
    elif change == "negative":
        adata.X = adata.X.toarray()
        adata.X[0, 0] = -1.0
    # training must not start: fail loudly if it does
    monkeypatch.setattr(Cicl, "fit", lambda *a, **k: pytest.fail("training started before validation"))
    before = snapshot(adata)
    arguments = {"n_clusters": 3, **SMALL, "n_epochs": 1, **kwargs}
    with pytest.raises(error, match=message):
        scext.tl.cicl(adata, **arguments)
    assert_untouched(adata, before)


def test_training_sharpens_the_clusters_by_a_label_free_criterion(clustered_toy):
    # the untrained encoder (same seed, same initial weights) against the trained one, scored on H with the
    # model's own clusters: no label is read
    from sklearn.metrics import calinski_harabasz_score, silhouette_score

    untrained = scext.tl.cicl(
        make_toy(n_cells=300), n_clusters=3, n_epochs=0, random_state=0, copy=True, **SMALL
    )

    def criteria(adata):
        h, labels = adata.obsm["X_cicl"], adata.obs["cicl"].to_numpy()
        return silhouette_score(h, labels), calinski_harabasz_score(h, labels)

    (silhouette_before, ch_before), (silhouette_after, ch_after) = (
        criteria(untrained),
        criteria(clustered_toy),
    )
    assert silhouette_after > silhouette_before + 0.004
    assert ch_after > 1.05 * ch_before


def test_principal_component_input_is_saved_and_applied_to_new_cells(clustered_toy, tmp_path):
    # 60 genes > n_pcs: the model carries its principal axes and constant coordinate, and a reloaded model
    # (h5ad or files) projects cells exactly as in training
    model = Cicl.from_adata(clustered_toy)
    axes = model.net.components.numpy()
    assert axes.shape == (60, 50) and model.width == 51
    np.testing.assert_allclose(axes.T @ axes, np.eye(50), atol=1e-4)
    assert float(model.net.homogeneous) > 0
    clustered_toy.write_h5ad(tmp_path / "cicl.h5ad")
    reread = Cicl.from_adata(ad.read_h5ad(tmp_path / "cicl.h5ad"))
    model.save(tmp_path / "model")
    loaded = Cicl.load(tmp_path / "model", adata=clustered_toy)
    for other in (reread, loaded):
        np.testing.assert_array_equal(other.net.components.numpy(), axes)
        np.testing.assert_allclose(other.transform(clustered_toy), clustered_toy.obsm["X_cicl"], atol=1e-4)
