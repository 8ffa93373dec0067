"""One input contract for every tool: bad input fails before any work, clearly, and leaves the AnnData as it was.

Each tool is one row of TOOLS (how to call it on tiny data); each bad input is one case that changes the
AnnData or the arguments. Training is patched to fail if it is entered, so an error raised only after
training fails the test. A new tool joins by adding one row.
"""

from __future__ import annotations

import random

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

import scext
from scext.models import CellVGAE, Cicl, Kratos, Scdefer

TRAINING_MODULES = ("_kratos", "_cicl", "_cellvgae", "_scdefer")
QUIET = {"device": "cpu"}


# ------------------------------------------------------------------ data and trained models
def counts_toy(n_cells: int = 90) -> ad.AnnData:
    adata = scext.datasets.synthetic_counts(
        n_cells=n_cells, n_genes=40, n_types=3, n_markers=8, fold_change=10.0, random_state=0
    )
    adata.X = adata.X.toarray()
    del adata.layers["counts"]
    return adata


def log_toy(n_cells: int = 90) -> ad.AnnData:
    adata = counts_toy(n_cells)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


TINY = {
    "kratos": {"groupby": "cell_type", "n_epochs": 1, "hidden_sizes": (8,), **QUIET},
    "cicl": {
        "n_clusters": 3,
        "n_epochs": 1,
        "n_layers": 1,
        "n_heads": 2,
        "feedforward_dim": 8,
        "projection_sizes": (8, 4),
        "n_top_genes": 20,
        "kmeans_n_init": 1,
        **QUIET,
    },
    "cellvgae": {"n_epochs": 2, "hidden_sizes": (8, 4), "n_heads": 1, "cluster_method": "leiden", **QUIET},
    "scdefer": {
        "n_clusters": 3,
        "n_pretrain_epochs": 1,
        "n_epochs": 1,
        "hidden_sizes": (8, 4),
        "decoder_sizes": (8,),
        **QUIET,
    },
}


@pytest.fixture(scope="module")
def trained():
    """A reference AnnData per tool, trained for real once (tiny), with its model."""
    references = {}
    kratos = log_toy()
    scext.tl.kratos(kratos, **TINY["kratos"])
    references["kratos"] = kratos
    for tool, data in (("cicl", counts_toy()), ("cellvgae", log_toy()), ("scdefer", counts_toy())):
        getattr(scext.tl, tool)(data, **TINY[tool])
        references[tool] = data
    return references


# ------------------------------------------------------------------ the tools
def run(tool: str, adata: ad.AnnData, trained: dict, **overrides):
    if tool in TINY:
        return getattr(scext.tl, tool)(adata, **{**TINY[tool], **overrides})
    if tool == "rank_genes_perturbation":
        kwargs = {"method": "smoothgrad", "sg_n_samples": 2, **QUIET, **overrides}
        return scext.tl.rank_genes_perturbation(adata, **kwargs)
    base = tool.removesuffix("_predict")
    kwargs = {"model": trained[base], "key_added": "new", **QUIET, **overrides}
    return getattr(scext.tl, tool)(adata, **kwargs)


def fresh_input(tool: str, trained: dict) -> ad.AnnData:
    """What each tool is called on: counts for the count models, log values otherwise."""
    if tool == "rank_genes_perturbation":
        return trained["kratos"].copy()
    base = tool.removesuffix("_predict")
    return counts_toy() if base in ("cicl", "scdefer") else log_toy()


TOOLS = [
    "kratos",
    "kratos_predict",
    "rank_genes_perturbation",
    "cicl",
    "cicl_predict",
    "cellvgae",
    "cellvgae_predict",
    "scdefer",
    "scdefer_predict",
]
TRAINS = {"kratos", "cicl", "cellvgae", "scdefer"}


def written_key(tool: str) -> str:
    """The key_added namespace a case may collide with."""
    return "new" if tool.endswith("_predict") else "kratos_smoothgrad" if tool.startswith("rank") else tool


# ------------------------------------------------------------------ bad inputs shared by every tool
def set_value(value):
    def change(adata, tool):
        X = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=np.float32)
        X[0, 1] = value
        adata.X = X
        return adata, {}

    return change


def no_cells(adata, tool):
    return adata[:0].copy(), {}


def no_genes(adata, tool):
    return adata[:, :0].copy(), {}


def duplicate_genes(adata, tool):
    names = list(adata.var_names)
    names[1] = names[0]
    adata.var_names = names
    return adata, {}


def label_column_collision(adata, tool):
    """key_added names a column of labels (or, for kratos, `<key>_pred` is one)."""
    if tool == "rank_genes_perturbation":
        return adata, {"key_added": "kratos"}  # would replace the trained model
    if tool == "kratos":
        adata.obs["lab_pred"] = adata.obs["cell_type"].copy()
        return adata, {"key_added": "lab"}
    if tool == "kratos_predict":
        adata.obs["cell_type_pred"] = adata.obs["cell_type"].copy()
    return adata, {"key_added": "cell_type"}


def other_tools_record(adata, tool):
    """uns[key] (or uns[key_predict]) holds what another tool wrote."""
    key = "shared"
    record = f"{key}_predict" if tool.endswith("_predict") else key
    adata.uns[record] = {"params": {"tool": "some_other_tool"}}
    return adata, {"key_added": key}


def bad_device(adata, tool):
    return adata, {"device": "tpu"}


def empty_key_added(adata, tool):
    return adata, {"key_added": ""}


COMMON = {
    "nan": (set_value(np.nan), ValueError, "NaN"),
    "inf": (set_value(np.inf), ValueError, "infinite"),
    "no_cells": (no_cells, ValueError, "no cells"),
    "no_genes": (no_genes, ValueError, "no genes|lacks"),
    "duplicate_genes": (duplicate_genes, ValueError, "var_names_make_unique"),
    "label_column_collision": (label_column_collision, ValueError, "key_added=.*would overwrite"),
    "other_tools_record": (other_tools_record, ValueError, "written by some_other_tool"),
    "bad_device": (bad_device, ValueError, "device"),
    "empty_key_added": (empty_key_added, ValueError, "key_added"),
}

# ------------------------------------------------------------------ bad arguments of each tool
SPECIFIC = {
    "kratos": [
        ({"batch_size": 0}, "batch_size"),
        ({"hidden_sizes": (0,)}, "hidden_sizes"),
        ({"n_epochs": 0}, "n_epochs"),
        ({"lr": -1.0}, "lr"),
        ({"groupby": "missing"}, "groupby"),
        ({"layer": "missing"}, "layer"),
        ({"random_state": "0"}, "random_state"),
    ],
    "kratos_predict": [({"chunk_size": 0}, "chunk_size"), ({"model": "a file name"}, "model")],
    "rank_genes_perturbation": [
        ({"groups": []}, "groups"),
        ({"sg_n_samples": 0}, "sg_n_samples"),
        ({"ig_n_steps": 0}, "ig_n_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"cw_tradeoff": -1.0}, "cw_tradeoff"),
        ({"method": "lime"}, "method"),
        ({"key": "missing"}, "no KRATOS model"),
    ],
    "cicl": [
        ({"batch_size": 0}, "batch_size"),
        ({"n_heads": 0}, "n_heads"),
        ({"temperature": 0.0}, "temperature"),
        ({"n_clusters": 1}, "n_clusters"),
        ({"projection_sizes": (8, 0)}, "projection_sizes"),
        ({"layer": "missing"}, "layer"),
        ({"random_state": 1.5}, "random_state"),
    ],
    "cicl_predict": [({"chunk_size": 0}, "chunk_size"), ({"model": 3}, "model")],
    "cellvgae": [
        ({"batch_size": 0}, "batch_size"),
        ({"n_heads": 0}, "n_heads"),
        ({"hidden_sizes": (8, 0)}, "hidden_sizes"),
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"lr": 0.0}, "lr"),
        ({"layer": "missing"}, "layer"),
        ({"random_state": None}, "random_state"),
    ],
    "cellvgae_predict": [({"chunk_size": 0}, "chunk_size"), ({"model": None}, "model")],
    "scdefer": [
        ({"batch_size": 0}, "batch_size"),
        ({"hidden_sizes": (0, 4)}, "hidden_sizes"),
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"n_clusters": 1}, "n_clusters"),
        ({"lr": 0.0}, "lr"),
        ({"layer": "missing"}, "layer"),
        ({"gammas": (1.0, 1.0)}, "gammas"),
    ],
    "scdefer_predict": [({"chunk_size": 0}, "chunk_size"), ({"model": "scdefer"}, "model")],
}


def snapshot(adata: ad.AnnData):
    """Everything a failed call must leave as it was (X compared by value, the rest by keys)."""
    X = None if adata.isbacked else (adata.X.copy() if adata.X is not None else None)
    return (
        list(adata.obs.columns),
        list(adata.var.columns),
        list(adata.obsm.keys()),
        list(adata.obsp.keys()),
        list(adata.varm.keys()),
        list(adata.layers.keys()),
        list(adata.uns.keys()),
        X,
    )


def assert_untouched(adata: ad.AnnData, before) -> None:
    after = snapshot(adata)
    assert after[:-1] == before[:-1]
    if before[-1] is not None:
        np.testing.assert_array_equal(np.asarray(after[-1]), np.asarray(before[-1]))


@pytest.fixture
def no_training(monkeypatch):
    """Training and explaining fail if entered: every contract error must come before them."""

    def entered(*args, **kwargs):
        raise AssertionError("training started before the input was refused")

    for name in TRAINING_MODULES:
        monkeypatch.setattr(f"scext.models.{name}.train_loop", entered)
    for name in ("smoothgrad", "integrated_gradients", "cw_perturbation"):
        monkeypatch.setattr(f"scext.tl._rank_genes.{name}", entered)


CASES = [(tool, name, *COMMON[name]) for tool in TOOLS for name in COMMON] + [
    (tool, f"{next(iter(arguments))}={next(iter(arguments.values()))!r}", None, Exception, message, arguments)
    for tool, cases in SPECIFIC.items()
    for arguments, message in cases
]


def _case_id(case) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input_fails_before_work_and_leaves_adata_untouched(case, trained, no_training):
    tool, _, change, error, message, *arguments = case
    adata = fresh_input(tool, trained)
    overrides = arguments[0] if arguments else {}
    if change is not None:
        adata, overrides = change(adata, tool)
    before = snapshot(adata)
    with pytest.raises((ValueError, KeyError, TypeError), match=message):
        run(tool, adata, trained, **overrides)
    assert_untouched(adata, before)


@pytest.mark.parametrize("tool", TOOLS)
def test_backed_input_with_copy_is_refused_up_front(tool, trained, no_training, tmp_path):
    path = tmp_path / "input.h5ad"
    fresh_input(tool, trained).write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    before = snapshot(backed)
    with pytest.raises(ValueError, match="copy=True needs an AnnData in memory"):
        run(tool, backed, trained, copy=True)
    assert_untouched(backed, before)
    backed.file.close()


def test_every_tool_has_at_least_ten_bad_inputs():
    for tool in TOOLS:
        n_cases = sum(case[0] == tool for case in CASES) + 1  # + the backed-copy test
        assert n_cases >= 10, tool


# ------------------------------------------------------------------ key collisions
def test_predicting_on_the_reference_does_not_overwrite_its_results(trained):
    reference = trained["kratos"].copy()
    before = reference.obsm["kratos_proba"].copy()
    with pytest.raises(ValueError, match="key_added='kratos' would overwrite obsm\\['X_kratos'\\]"):
        scext.tl.kratos_predict(reference, reference, device="cpu")
    np.testing.assert_array_equal(reference.obsm["kratos_proba"], before)
    scext.tl.kratos_predict(reference, reference, device="cpu", key_added="again")  # another key is fine
    assert "again_proba" in reference.obsm


@pytest.mark.parametrize("tool", sorted(TRAINS))
def test_rerun_with_the_same_key_replaces_its_own_results(tool, trained):
    adata = trained[tool].copy()
    run(tool, adata, trained, random_state=1)
    assert adata.uns[tool]["params"]["random_state"] == 1
    assert adata.uns[tool]["params"]["tool"] == tool


def test_predict_twice_with_the_same_key_replaces_its_own_results(trained):
    new = log_toy(30)
    for _ in range(2):
        scext.tl.cellvgae_predict(new, trained["cellvgae"], device="cpu", key_added="placed")
    assert new.uns["placed_predict"]["params"]["tool"] == "cellvgae_predict"


# ------------------------------------------------------------------ no global side effects
def rng_states():
    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()  # noqa: NPY002


@pytest.mark.parametrize("tool", TOOLS)
def test_callers_global_random_states_are_unchanged(tool, trained):
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002
    torch.manual_seed(123)
    before = rng_states()
    adata = fresh_input(tool, trained)
    run(tool, adata, trained, key_added="rng_check")
    after = rng_states()
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])
    assert torch.equal(after[2], before[2])


# ------------------------------------------------------------------ degenerate but valid input
def test_float16_counts_with_large_libraries_are_summed_without_overflow():
    counts = counts_toy()
    factor = np.floor(60_000 / counts.X.max())  # every count fits float16, most library sizes do not
    counts.X = (counts.X * factor).astype(np.float16)
    assert np.isfinite(counts.X).all()
    assert np.isinf(counts.X.sum(axis=1)).any()  # what float16 sums would give
    scext.tl.cicl(counts, **TINY["cicl"])
    assert np.isfinite(counts.obsm["X_cicl"]).all()
    assert counts.obs["cicl"].nunique() > 1
    scext.tl.scdefer(counts, **TINY["scdefer"])
    assert np.isfinite(counts.obsm["X_scdefer"]).all()


def test_a_damaged_model_in_uns_is_a_clear_error(trained):
    reference = trained["kratos"].copy()
    del reference.uns["kratos"]["model"]["state_dict"]
    new = log_toy(20)
    before = snapshot(new)
    with pytest.raises(ValueError, match="not a readable KRATOS model|no weights"):
        scext.tl.kratos_predict(new, reference, device="cpu")
    assert_untouched(new, before)
    for model_class, tool in (
        (Cicl, "cicl"),
        (CellVGAE, "cellvgae"),
        (Scdefer, "scdefer"),
        (Kratos, "kratos"),
    ):
        damaged = trained[tool].copy()
        damaged.uns[tool]["model"]["header"] = "{not json"
        with pytest.raises(ValueError, match="not a readable"):
            model_class.from_adata(damaged)
