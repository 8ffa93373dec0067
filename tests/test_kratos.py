from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
from conftest import FAST, make_toy

import scext
from scext.models import Kratos


def snapshot(adata):
    """What a failed call must leave exactly as it was."""
    return (
        list(adata.obs.columns),
        list(adata.obsm.keys()),
        list(adata.uns.keys()),
        list(adata.varm.keys()),
        list(adata.var.columns),
        list(adata.obsp.keys()),
        list(adata.layers.keys()),
        adata.X.copy(),
    )


def assert_untouched(adata, before):
    after = snapshot(adata)
    assert after[:-1] == before[:-1]
    if sp.issparse(before[-1]):
        assert (after[-1] != before[-1]).nnz == 0
    else:
        np.testing.assert_array_equal(after[-1], before[-1])


def test_learns_separable_toy_and_writes_slots(trained_toy):
    adata = trained_toy
    result = adata.uns["kratos"]
    assert result["test_accuracy"] > 0.95
    assert result["test_macro_f1"] > 0.95
    assert result["test_ari"] > 0.85 and result["test_ami"] > 0.8
    assert result["silhouette"] > 0.2
    assert adata.obsm["X_kratos"].shape == (adata.n_obs, 16)
    assert adata.obsm["kratos_proba"].shape == (adata.n_obs, 3)
    np.testing.assert_allclose(adata.obsm["kratos_proba"].sum(1), 1, atol=1e-5)
    assert list(adata.obs["kratos_pred"].cat.categories) == ["type_0", "type_1", "type_2"]
    split = adata.obs["kratos_split"].value_counts()
    assert split["test"] == pytest.approx(0.3 * adata.n_obs, abs=3)
    assert split["validation"] == pytest.approx(0.1 * 0.7 * adata.n_obs, abs=3)
    history = result["history"]
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert history["val_accuracy"][-1] > 0.9
    assert result["params"]["device"] == "cpu"
    assert result["params"]["groupby"] == "cell_type"


def test_split_is_stratified_and_test_cells_are_not_trained_on(trained_toy):
    obs = trained_toy.obs
    shares = obs.groupby("cell_type", observed=True)["kratos_split"].apply(lambda s: (s == "test").mean())
    assert ((shares > 0.25) & (shares < 0.35)).all()


def test_same_seed_same_numbers_other_seed_other_numbers():
    runs = []
    for seed in (3, 3, 4):
        adata = make_toy(n_cells=150)
        scext.tl.kratos(
            adata, groupby="cell_type", random_state=seed, device="cpu", **{**FAST, "n_epochs": 5}
        )
        runs.append(adata)
    np.testing.assert_array_equal(runs[0].obsm["X_kratos"], runs[1].obsm["X_kratos"])
    assert (runs[0].obs["kratos_split"] == runs[1].obs["kratos_split"]).all()
    assert not np.allclose(runs[0].obsm["X_kratos"], runs[2].obsm["X_kratos"])


def test_sparse_and_dense_input_agree():
    sparse = make_toy(n_cells=150)
    dense = sparse.copy()
    dense.X = dense.X.toarray()
    for adata in (sparse, dense):
        scext.tl.kratos(adata, groupby="cell_type", random_state=0, device="cpu", **{**FAST, "n_epochs": 5})
    np.testing.assert_allclose(sparse.obsm["X_kratos"], dense.obsm["X_kratos"], atol=1e-5)


def test_copy_leaves_input_untouched():
    adata = make_toy(n_cells=150)
    before = snapshot(adata)
    trained = scext.tl.kratos(adata, groupby="cell_type", copy=True, device="cpu", **{**FAST, "n_epochs": 2})
    assert_untouched(adata, before)
    assert "X_kratos" in trained.obsm


def test_predictions_take_the_label_colours_in_fit_and_predict():
    adata = make_toy(n_cells=150)
    adata.uns["cell_type_colors"] = ["#aa0000", "#00aa00", "#0000aa"]
    scext.tl.kratos(adata, groupby="cell_type", device="cpu", **{**FAST, "n_epochs": 2})
    colour_of = dict(zip(adata.obs["cell_type"].cat.categories, adata.uns["cell_type_colors"], strict=True))
    expected = [colour_of[name] for name in adata.obs["kratos_pred"].cat.categories]
    assert list(adata.uns["kratos_pred_colors"]) == expected
    new = make_toy(random_state=1, n_cells=60)
    scext.tl.kratos_predict(new, adata)
    assert list(new.uns["kratos_pred_colors"]) == expected


def test_test_size_zero_trains_on_every_labelled_cell():
    adata = make_toy(n_cells=150)
    scext.tl.kratos(adata, groupby="cell_type", test_size=0, device="cpu", **{**FAST, "n_epochs": 2})
    assert "test" not in set(adata.obs["kratos_split"])
    assert "test_accuracy" not in adata.uns["kratos"]


def test_unlabelled_cells_are_classified_not_trained_on():
    adata = make_toy(n_cells=150)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[:10, adata.obs.columns.get_loc("cell_type")] = np.nan
    scext.tl.kratos(adata, groupby="cell_type", device="cpu", **{**FAST, "n_epochs": 2})
    assert (adata.obs["kratos_split"].iloc[:10] == "unlabeled").all()
    assert adata.obs["kratos_pred"].notna().all()


@pytest.mark.parametrize(
    ("change", "kwargs", "error", "message"),
    [
        (None, {"groupby": "missing"}, KeyError, "not a column"),
        ("singleton", {}, ValueError, "single cell"),
        ("nan", {}, ValueError, "NaN"),
        ("negative_counts", {"layer": "counts"}, ValueError, "negative"),
        (None, {"layer": "absent"}, KeyError, "not in adata.layers"),
        (None, {"device": "cuda:7"}, ValueError, "CUDA"),
        (None, {"device": "tpu"}, ValueError, "device"),
        (None, {"test_size": 1.5}, ValueError, "test_size"),
        (None, {"random_state": "x"}, ValueError, "random_state"),
    ],
)
def test_bad_input_raises_before_training_and_leaves_adata_untouched(change, kwargs, error, message):
    adata = make_toy(n_cells=120)
    if change == "singleton":
        adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories("lonely")
        adata.obs.iloc[0, adata.obs.columns.get_loc("cell_type")] = "lonely"
    elif change == "nan":
        adata.X = adata.X.toarray()
        adata.X[3, 4] = np.nan
    elif change == "negative_counts":
        adata.layers["counts"] = adata.layers["counts"].toarray()
        adata.layers["counts"][0, 0] = -1
    before = snapshot(adata)
    arguments = {"groupby": "cell_type", "device": "cpu", **FAST, **kwargs}
    with pytest.raises(error, match=message):
        scext.tl.kratos(adata, **arguments)
    assert_untouched(adata, before)


def test_model_survives_h5ad_and_classifies_a_second_anndata(trained_toy, toy_cells, tmp_path):
    path = tmp_path / "trained.h5ad"
    trained_toy.write_h5ad(path)
    reread = sc.read_h5ad(path)
    model = Kratos.from_adata(reread)
    assert model.classes == ["type_0", "type_1", "type_2"]

    # new cells of the same kind, genes in another order: the model realigns them
    new = toy_cells[300:].copy()
    new = new[:, new.var_names[::-1]].copy()
    scext.tl.kratos_predict(new, reread, key_added="transfer")
    accuracy = (new.obs["transfer_pred"].astype(str) == new.obs["cell_type"].astype(str)).mean()
    assert accuracy > 0.9
    assert new.obsm["X_transfer"].shape == (200, 16)

    # predictions from the reread model equal the original ones
    again = trained_toy.copy()
    scext.tl.kratos_predict(again, reread, key_added="again")
    np.testing.assert_allclose(again.obsm["again_proba"], trained_toy.obsm["kratos_proba"], atol=1e-6)


def test_save_load_and_gene_mismatch(trained_toy, tmp_path):
    model = Kratos.from_adata(trained_toy)
    model.save(tmp_path / "model")
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "model")
    loaded = Kratos.load(tmp_path / "model", adata=trained_toy)
    x = np.asarray(trained_toy.X[:5].toarray(), dtype=np.float32)
    import torch

    np.testing.assert_allclose(
        loaded.net(torch.from_numpy(x)).detach(), model.net(torch.from_numpy(x)).detach()
    )
    fewer = trained_toy[:, :50].copy()
    before = snapshot(fewer)
    with pytest.raises(ValueError, match="lacks 10"):
        Kratos.load(tmp_path / "model", adata=fewer)
    with pytest.raises(ValueError, match="lacks 10"):
        scext.tl.kratos_predict(fewer, model)
    assert_untouched(fewer, before)


def test_pbmc68k_reduced_bulk_labels():
    adata = sc.datasets.pbmc68k_reduced()
    scext.tl.kratos(adata, groupby="bulk_labels", n_epochs=15, device="cpu", random_state=0)
    assert adata.uns["kratos"]["test_accuracy"] > 0.6
    # the category order of the user's labels is kept
    assert list(adata.obs["kratos_pred"].cat.categories) == list(adata.obs["bulk_labels"].cat.categories)


def test_training_history_plot(trained_toy):
    fig = scext.pl.training_history(trained_toy, return_fig=True, show=False)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "accuracy"]
    assert len(fig.axes[0].lines) == 3  # train, validation, best epoch
    with pytest.raises(KeyError):
        scext.pl.training_history(trained_toy, key="absent")
    with pytest.raises(KeyError, match="lost"):
        scext.pl.training_history(trained_toy, terms=["loss", "lost"])


def test_training_history_wraps_many_terms_into_rows():
    history = {f"term{i}": np.linspace(1, 0, 5) for i in range(9)}
    adata = ad.AnnData(np.zeros((2, 2), dtype=np.float32), uns={"tool": {"history": history}})
    fig = scext.pl.training_history(adata, "tool", ncols=4, return_fig=True, show=False)
    assert [ax.get_title() for ax in fig.axes] == list(history)  # the 3 unused cells of the 3 x 4 grid go
    assert {ax.get_subplotspec().get_gridspec().get_geometry() for ax in fig.axes} == {(3, 4)}
    with pytest.raises(ValueError, match="ncols"):
        scext.pl.training_history(adata, "tool", ncols=0)


def test_settings_device_is_the_auto_default(monkeypatch):
    from scext._utils import resolve_device

    monkeypatch.setattr(scext.settings, "device", "cpu")
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(scext.settings, "device", "cuda:9")
    with pytest.raises(ValueError, match="CUDA"):
        resolve_device("auto")


def test_quickstart_writes_figures_and_tables(tmp_path):
    from scext import quickstart

    outdir = quickstart.main(
        ["--outdir", str(tmp_path), "--n-epochs", "3", "--svm-iter", "1", "--device", "cpu"]
    )
    written = {p.name for p in outdir.iterdir()}
    for name in (
        "umap_kratos.png",
        "kratos_history_quickstart.png",
        "panel_auroc.csv",
        "panels_cw.csv",
        "pbmc68k_kratos.h5ad",
    ):
        assert name in written, f"{name} missing from {sorted(written)}"
