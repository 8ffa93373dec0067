"""The shared model interface (`scext.models.Model`): train on 80 % of a data set, save, load in a fresh
object, apply to the other 20 % with the genes shuffled and extra genes; safe and checked model files."""

from __future__ import annotations

import json
import pickle
import time
import warnings

import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from test_kratos import assert_untouched, snapshot

import scext
from scext.models import CellVGAE, Cicl, Kratos, Scdefer

PAYLOAD_RAN = []


def run_payload():
    PAYLOAD_RAN.append("ran")  # a crafted file would call os.system here


class Payload:
    """Unpickling this calls run_payload: a stand-in for code a crafted model file would run."""

    def __reduce__(self):
        return (run_payload, ())


def counts_toy(n_cells=300, random_state=0):
    adata = scext.datasets.synthetic_counts(
        n_cells=n_cells, n_genes=60, n_types=3, n_markers=10, fold_change=10.0, random_state=random_state
    )
    return adata


def split_80_20(adata, random_state=0):
    """Reference (80 %) and query (20 %, genes shuffled, two extra genes) of one data set."""
    rng = np.random.default_rng(random_state)
    is_query = np.zeros(adata.n_obs, dtype=bool)
    is_query[rng.choice(adata.n_obs, adata.n_obs // 5, replace=False)] = True
    reference = adata[~is_query].copy()
    query = adata[is_query].copy()
    extra = ad.AnnData(
        X=rng.poisson(2.0, size=(query.n_obs, 2)).astype(np.float32),
        obs=query.obs[[]],
        var={"marker_of": ["none", "none"]},
    )
    extra.var_names = ["extra_gene_1", "extra_gene_2"]
    query = ad.concat([query, extra], axis=1, merge="first")
    query.obs = adata.obs.loc[query.obs_names].copy()
    query = query[:, rng.permutation(query.n_vars)].copy()
    return reference, query


# ------------------------------------------------------------------ one fixture per tool
def train_kratos(adata):
    import scanpy as sc

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    scext.tl.kratos(
        adata, groupby="cell_type", n_epochs=20, batch_size=32, hidden_sizes=(32, 16), device="cpu"
    )
    return Kratos.from_adata(adata)


def train_cicl(adata):
    scext.tl.cicl(
        adata,
        n_clusters=3,
        n_layers=1,
        n_heads=2,
        feedforward_dim=32,
        projection_sizes=(32, 16),
        n_top_genes=40,
        n_epochs=5,
        batch_size=120,
        kmeans_n_init=3,
        device="cpu",
    )
    return Cicl.from_adata(adata)


@pytest.fixture(scope="module")
def cicl_split():
    reference, query = split_80_20(counts_toy())
    model = train_cicl(reference)
    return reference, query, model


def test_cicl_saved_model_places_new_cells(cicl_split, tmp_path):
    reference, query, model = cicl_split
    model.save(tmp_path / "cicl")
    loaded = Cicl.load(tmp_path / "cicl", adata=query)
    assert loaded is not model
    before = query.copy()
    scext.tl.cicl_predict(query, loaded, device="cpu")
    assert query.obsm["X_cicl"].shape == (query.n_obs, model.n_genes)
    assert query.obsm["cicl_proba"].shape == (query.n_obs, 3)
    assert list(query.obs["cicl"].cat.categories) == ["0", "1", "2"]
    assert adjusted_rand_score(query.obs["cell_type"], query.obs["cicl"]) >= 0.8
    # the reloaded model embeds exactly as the model that was saved
    np.testing.assert_array_equal(query.obsm["X_cicl"], model.transform(before, device=torch.device("cpu")))
    # a new cell's embedding does not depend on the other new cells
    alone = model.transform(before[:5].copy())
    np.testing.assert_allclose(alone, query.obsm["X_cicl"][:5], rtol=1e-5, atol=1e-5)


def test_cicl_model_reproduces_its_training_clusters(cicl_split):
    reference, _, model = cicl_split
    h, labels, proba = model.embed_and_predict(reference)
    assert adjusted_rand_score(reference.obs["cicl"], labels) >= 0.95
    np.testing.assert_allclose(h, reference.obsm["X_cicl"], rtol=1e-4, atol=1e-4)


def test_cicl_predict_from_h5ad(cicl_split, tmp_path):
    reference, query, _ = cicl_split
    reference.write_h5ad(tmp_path / "reference.h5ad")
    reread = ad.read_h5ad(tmp_path / "reference.h5ad")
    placed = scext.tl.cicl_predict(query, reread, key_added="from_file", copy=True)
    direct = scext.tl.cicl_predict(query, Cicl.from_adata(reference), key_added="from_file", copy=True)
    np.testing.assert_array_equal(placed.obsm["X_from_file"], direct.obsm["X_from_file"])
    assert "from_file" not in query.obs


@pytest.mark.parametrize(
    "bad",
    ["missing_genes", "nan", "negative", "no_counts", "no_cells"],
)
def test_cicl_predict_rejects_bad_input_untouched(cicl_split, bad):
    _, query, model = cicl_split
    query = query.copy()
    X = query.X.toarray()
    if bad == "missing_genes":
        query = query[:, query.var_names != model.var_names[0]].copy()
    elif bad == "nan":
        X[0, 0] = np.nan
        query.X = X
    elif bad == "negative":
        X[0, 0] = -1
        query.X = X
    elif bad == "no_counts":
        X[0] = 0
        query.X = X
    else:
        query = query[:0].copy()
    before = snapshot(query)
    message = {
        "missing_genes": "lacks 1 of",
        "nan": "NaN",
        "negative": "negative",
        "no_counts": "no counts",
        "no_cells": "no cells",
    }[bad]
    with pytest.raises(ValueError, match=message):
        scext.tl.cicl_predict(query, model, device="cpu")
    assert_untouched(query, before)


def test_renamed_cicl_argument_warns_and_matches():
    adata = counts_toy(n_cells=90)
    kwargs = {
        "n_clusters": 3,
        "n_layers": 1,
        "n_heads": 2,
        "feedforward_dim": 16,
        "projection_sizes": (16, 8),
        "n_top_genes": 20,
        "n_epochs": 2,
        "kmeans_n_init": 1,
        "device": "cpu",
        "keep_model": False,
    }
    new = scext.tl.cicl(adata, student_t_dof=2.0, copy=True, **kwargs)
    with pytest.warns(FutureWarning, match="'alpha' is renamed 'student_t_dof'"):
        old = scext.tl.cicl(adata, alpha=2.0, copy=True, **kwargs)
    np.testing.assert_array_equal(new.obsm["cicl_proba"], old.obsm["cicl_proba"])
    assert new.uns["cicl"]["params"]["student_t_dof"] == 2.0
    with pytest.raises(TypeError, match="both 'alpha' and its new name"):
        scext.tl.cicl(adata, alpha=2.0, student_t_dof=2.0, **kwargs)


# ------------------------------------------------------------------ KRATOS through the same interface
def test_kratos_saved_model_places_new_cells(tmp_path):
    reference, query = split_80_20(counts_toy())
    model = train_kratos(reference)
    import scanpy as sc

    sc.pp.normalize_total(query, target_sum=1e4)
    sc.pp.log1p(query)
    model.save(tmp_path / "kratos")
    loaded = Kratos.load(tmp_path / "kratos", adata=query)
    labels, proba = loaded.predict(query)
    assert adjusted_rand_score(query.obs["cell_type"], labels) >= 0.8
    np.testing.assert_array_equal(loaded.transform(query), model.transform(query))
    np.testing.assert_array_equal(proba, model.predict(query)[1])
    # the functional form writes the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scext.tl.kratos_predict(query, loaded, device="cpu", chunk_size=17)
    # another chunk size rounds matrix products differently, nothing more
    np.testing.assert_allclose(query.obsm["kratos_proba"], proba, rtol=1e-5, atol=1e-7)
    with pytest.warns(FutureWarning, match="'batch_size' is renamed 'chunk_size'"):
        scext.tl.kratos_predict(query, loaded, device="cpu", batch_size=17, key_added="old")


# ------------------------------------------------------------------ files: every model class
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, cicl_split):
    """One small trained model of every class, saved to its own folder."""
    import scanpy as sc

    folder = tmp_path_factory.mktemp("models")
    reference, _ = split_80_20(counts_toy(n_cells=150))
    train_kratos(reference.copy()).save(folder / "kratos")
    cicl_split[2].save(folder / "cicl")
    small = {"n_epochs": 2, "device": "cpu", "progress_bar": False}
    counts = reference.copy()
    scext.tl.scdefer(
        counts, n_clusters=3, n_pretrain_epochs=2, hidden_sizes=(16, 8, 4), decoder_sizes=(8, 16), **small
    )
    Scdefer.from_adata(counts).save(folder / "scdefer")
    log = reference.copy()
    sc.pp.normalize_total(log)
    sc.pp.log1p(log)
    scext.tl.cellvgae(log, hidden_sizes=(8, 4), n_heads=1, cluster_method="leiden", **small)
    CellVGAE.from_adata(log).save(folder / "cellvgae")
    return {model_class: folder / model_class.name for model_class in MODEL_CLASSES}


MODEL_CLASSES = [Kratos, Cicl, CellVGAE, Scdefer]


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_model_file_with_pickle_payload_is_not_executed(model_class, tmp_path):
    pickle.loads(pickle.dumps(Payload()))  # the payload is real: plain unpickling runs it
    assert PAYLOAD_RAN == ["ran"]
    PAYLOAD_RAN.clear()
    torch.save({"header": Payload()}, tmp_path / model_class.file_name())
    with pytest.raises(ValueError, match="cannot be read safely|not a scext model"):
        model_class.load(tmp_path)
    assert PAYLOAD_RAN == []


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_file_of_another_model_class_names_both(model_class, saved_models, tmp_path):
    other = next(c for c in MODEL_CLASSES if c is not model_class)
    target = tmp_path / model_class.file_name()
    target.write_bytes((saved_models[other] / other.file_name()).read_bytes())
    with pytest.raises(ValueError, match=f"holds a {other.__name__} model, not a {model_class.__name__}"):
        model_class.load(tmp_path)


def edited(saved_models, model_class, tmp_path, change):
    saved = torch.load(saved_models[model_class] / model_class.file_name(), weights_only=True)
    header = json.loads(saved["header"])
    change(header)
    saved["header"] = json.dumps(header)
    torch.save(saved, tmp_path / model_class.file_name())
    return tmp_path


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_other_major_version_names_both_versions(model_class, saved_models, tmp_path):
    folder = edited(saved_models, model_class, tmp_path, lambda h: h.update(scext_version="7.0.0"))
    with pytest.raises(ValueError, match=r"written by scext 7\.0\.0; this is scext"):
        model_class.load(folder)


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_huge_header_is_refused_before_allocation(model_class, saved_models, tmp_path):
    def widen(header):
        config = header["config"]
        if "hidden_sizes" in config:
            config["hidden_sizes"] = [10**6] * len(config["hidden_sizes"])
        else:
            config["feedforward_dim"] = 10**6
            config["projection_sizes"] = [10**6, 10**6]

    folder = edited(saved_models, model_class, tmp_path, widen)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="do not match its header"):
        model_class.load(folder)
    # a real 10^6-wide layer would take gigabytes and many seconds to allocate
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_nan_weights_are_refused(model_class, saved_models, tmp_path):
    saved = torch.load(saved_models[model_class] / model_class.file_name(), weights_only=True)
    name = next(k for k, v in saved["state_dict"].items() if v.is_floating_point() and v.numel())
    saved["state_dict"][name][...] = float("nan")
    torch.save(saved, tmp_path / model_class.file_name())
    with pytest.raises(ValueError, match="NaN or infinite"):
        model_class.load(tmp_path)


def test_kratos_reads_models_stored_before_the_shared_interface():
    """h5ad files written by earlier releases hold the flat KRATOS layout; they still load."""
    reference, _ = split_80_20(counts_toy(n_cells=120))
    model = train_kratos(reference)
    legacy = {
        **model._config(),
        "var_names": np.asarray(model.var_names, dtype=object),
        "classes": np.asarray(model.classes, dtype=object),
        "hidden_sizes": np.asarray(model.hidden_sizes),
        "state_dict": model._state_arrays(),
    }
    again = Kratos.from_dict(legacy)
    np.testing.assert_array_equal(again.transform(reference), model.transform(reference))


def test_every_tool_honours_the_highly_variable_column_when_n_top_genes_is_none():
    import scanpy as sc

    counts = counts_toy(n_cells=90)
    flagged = np.zeros(counts.n_vars, dtype=bool)
    flagged[::2] = True
    counts.var["highly_variable"] = flagged
    small = {"n_epochs": 1, "device": "cpu", "progress_bar": False, "keep_model": False, "copy": True}
    cicl = scext.tl.cicl(
        counts, n_clusters=3, n_top_genes=None, n_layers=1, n_heads=2, feedforward_dim=8,
        projection_sizes=(8, 4), kmeans_n_init=1, **small,
    )  # fmt: skip
    assert list(cicl.uns["cicl"]["genes"]) == list(counts.var_names[flagged])
    scdefer = scext.tl.scdefer(
        counts, n_clusters=3, n_top_genes=None, n_pretrain_epochs=1, hidden_sizes=(8, 4), decoder_sizes=(8,),
        **small,
    )  # fmt: skip
    np.testing.assert_array_equal(scdefer.var["scdefer_modelled"], flagged)
    log = counts.copy()
    sc.pp.normalize_total(log)
    sc.pp.log1p(log)
    cellvgae = scext.tl.cellvgae(
        log, n_top_genes=None, hidden_sizes=(8, 4), n_heads=1, cluster_method=None, **small
    )
    np.testing.assert_array_equal(cellvgae.var["cellvgae_feature"], flagged)
    # a number means the tool's own selection, whatever the column says
    own = scext.tl.scdefer(
        counts, n_clusters=3, n_top_genes=20, n_pretrain_epochs=1, hidden_sizes=(8, 4), decoder_sizes=(8,),
        **small,
    )  # fmt: skip
    assert own.var["scdefer_modelled"].sum() == 20
