from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from conftest import FAST, make_toy
from test_kratos import assert_untouched, snapshot

import scext
from scext.models import Kratos, cw_hinge, cw_perturbation

METHODS = ["cw", "smoothgrad", "integrated_gradients"]


@pytest.fixture(scope="module")
def ranked(trained_toy):
    adata = trained_toy.copy()
    for method in METHODS:
        scext.tl.rank_genes_perturbation(adata, method=method, device="cpu")
    return adata


@pytest.mark.parametrize("method", METHODS)
def test_planted_markers_rank_first(ranked, method):
    result = ranked.uns[f"kratos_{method}"]
    for group in result["names"].dtype.names:
        top = ranked.var.loc[list(result["names"][group][:6]), "marker_of"]
        assert (top != "none").mean() >= 0.8, f"{method}, {group}: unplanted genes in the top 6: {list(top)}"
        if method == "cw":
            # one-vs-rest CW lowers the group's own markers and raises a rival's: the genes pushed down
            # hardest are the group's own markers
            pushed_down = np.argsort(result["signed_scores"][group])[:4]
            own = ranked.var.loc[list(result["names"][group][pushed_down]), "marker_of"]
        else:
            own = top[:5]
        assert (own == group).mean() >= 0.8, f"{method}, {group}: {list(own)}"


@pytest.mark.parametrize("method", METHODS)
def test_rank_genes_groups_layout(ranked, method):
    key = f"kratos_{method}"
    result = ranked.uns[key]
    groups = ["type_0", "type_1", "type_2"]
    assert list(result["names"].dtype.names) == groups
    for field in ("names", "scores", "signed_scores", "logfoldchanges", "pvals", "pvals_adj"):
        assert len(result[field]) == ranked.n_vars
    for group in groups:
        scores = result["scores"][group]
        assert (np.diff(scores) <= 0).all()
        assert sorted(result["names"][group]) == sorted(ranked.var_names)
    assert result["params"]["groupby"] == "cell_type" and result["params"]["reference"] == "rest"
    assert ranked.varm[f"{key}_scores"].shape == (ranked.n_vars, 3)
    assert result["params"]["score"] == "support"
    # at the default score every group's panel opens with genes up in the group (a marker panel)
    for group in groups:
        frame = sc.get.rank_genes_groups_df(ranked, group=group, key=key).head(3)
        assert (frame["logfoldchanges"] > 1).all(), f"{method}, {group}: {frame}"


@pytest.mark.parametrize("method", ["cw", "smoothgrad"])
def test_magnitude_score_is_the_mean_absolute_attribution(trained_toy, method):
    adata = trained_toy.copy()
    scext.tl.rank_genes_perturbation(adata, method=method, score="magnitude", key_added="mag", device="cpu")
    result = adata.uns["mag"]
    for group in result["names"].dtype.names:
        # the mean of |a| bounds |mean of a|, with equality only where the sign never changes
        assert (result["scores"][group] >= np.abs(result["signed_scores"][group]) - 1e-6).all()
        assert (np.diff(result["scores"][group]) <= 0).all()


@pytest.mark.parametrize("method", ["cw", "smoothgrad"])
def test_support_score_ranks_only_the_groups_own_markers_first(trained_toy, method):
    adata = trained_toy.copy()
    scext.tl.rank_genes_perturbation(adata, method=method, score="support", key_added="support", device="cpu")
    result = adata.uns["support"]
    assert result["params"]["score"] == "support"
    for group in result["names"].dtype.names:
        top = adata.var.loc[list(result["names"][group][:5]), "marker_of"]
        assert (top == group).all(), f"{method}, {group}: {list(top)}"
        # support is the signed mean, oriented so that the group's own markers score high
        sign = -1 if method == "cw" else 1
        np.testing.assert_allclose(result["scores"][group], sign * result["signed_scores"][group], rtol=1e-6)


def test_cw_perturbation_pushes_markers_down(ranked):
    result = ranked.uns["kratos_cw"]
    # leaving a class means lowering its own markers: the mean perturbation of its top genes is negative
    assert (result["signed_scores"]["type_1"][:3] < 0).all()


def test_cw_reports_how_many_cells_crossed_the_margin(ranked, trained_toy):
    reached = ranked.uns["kratos_cw"]["cw_reached"]
    assert list(reached.dtype.names) == ["type_0", "type_1", "type_2"]
    assert all(reached[group][0] >= 0.8 for group in reached.dtype.names)  # the default crosses on the toy
    adata = trained_toy.copy()
    # a lambda too weak for the L1 step: no cell leaves its class, and the user is told
    with pytest.warns(UserWarning, match="cw_tradeoff"):
        scext.tl.rank_genes_perturbation(adata, method="cw", cw_tradeoff=1e-3, cw_max_iter=30, device="cpu")
    weak = adata.uns["kratos_cw"]["cw_reached"]
    assert all(weak[group][0] == 0 for group in weak.dtype.names)


def _correct_cells(adata, group):
    """The standardised input of the cells of `group` the model classifies correctly, the net and the class."""
    model = Kratos.from_adata(adata)
    net = model.net.eval()
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    x = torch.as_tensor(X, dtype=torch.float32)
    with torch.no_grad():
        predicted = net(x).argmax(1).numpy()
    source = model.classes.index(group)
    rows = np.flatnonzero((adata.obs["cell_type"].astype(str).to_numpy() == group) & (predicted == source))
    return net, net.standardize(x[rows]), source


def _crossed(net, z, delta, source, reference=None):
    with torch.no_grad():
        hinge = cw_hinge(net.forward_standardized(z + delta), source, reference, margin=0.1)
    return (hinge == 0).float().mean().item()


@pytest.mark.parametrize("group", ["type_0", "type_1", "type_2"])
def test_cw_crosses_the_margin_for_almost_every_cell_at_the_defaults(trained_toy, group):
    net, z, source = _correct_cells(trained_toy, group)
    assert len(z) > 50
    delta = cw_perturbation(net.forward_standardized, z, source)
    assert _crossed(net, z, delta, source) >= 0.95
    # one-vs-one towards another class, too
    other = (source + 1) % 3
    delta = cw_perturbation(net.forward_standardized, z, source, other)
    assert _crossed(net, z, delta, source, other) >= 0.95


def test_cw_perturbation_shrinks_as_lambda_falls(trained_toy):
    """One round at a fixed lambda (no search): the smaller lambda, the smaller the L1 size, same cells."""
    net, z, source = _correct_cells(trained_toy, "type_0")
    sizes = [
        cw_perturbation(net.forward_standardized, z, source, tradeoff=tradeoff, n_rounds=1)
        .abs()
        .sum(1)
        .mean()
        for tradeoff in (100.0, 30.0, 10.0, 3.0)
    ]
    assert all(later < earlier for earlier, later in zip(sizes[:-1], sizes[1:], strict=True)), sizes
    # too small a lambda moves nothing: no gene's pull beats the L1 step
    assert cw_perturbation(net.forward_standardized, z, source, tradeoff=0.1, n_rounds=1).abs().max() == 0


def test_cw_leaves_a_cell_without_gradient_unperturbed():
    """A flat classifier (no gradient): no step, no NaN, and the cell is reported as not crossed."""
    z = torch.randn(4, 6)

    def flat(values):
        return torch.tensor([2.0, 0.0, 0.0]).expand(len(values), 3) + 0.0 * values.sum(1, keepdim=True)

    delta = cw_perturbation(flat, z, 0)
    assert torch.equal(delta, torch.zeros_like(z))
    assert (cw_hinge(flat(z + delta), 0, None, margin=0.1) > 0).all()


def test_cw_search_finds_the_tradeoff_from_a_poor_start(trained_toy):
    """Lambda 0.1 moves no toy cell; the per-cell search raises it until the cells cross, with no user knob."""
    fixed, searched = trained_toy.copy(), trained_toy.copy()
    with pytest.warns(UserWarning, match="cw_tradeoff"):
        scext.tl.rank_genes_perturbation(fixed, method="cw", cw_tradeoff=0.1, cw_n_rounds=1, device="cpu")
    scext.tl.rank_genes_perturbation(searched, method="cw", cw_tradeoff=0.1, device="cpu")
    for group in ("type_0", "type_1", "type_2"):
        assert fixed.uns["kratos_cw"]["cw_reached"][group][0] == 0
        assert searched.uns["kratos_cw"]["cw_reached"][group][0] >= 0.95
    assert searched.uns["kratos_cw"]["params"]["cw_n_rounds"] == 4


def test_scanpy_plots_after_h5ad_round_trip(ranked, tmp_path):
    path = tmp_path / "ranked.h5ad"
    ranked.write_h5ad(path)
    adata = sc.read_h5ad(path)
    frame = sc.get.rank_genes_groups_df(adata, group=None, key="kratos_cw")
    assert len(frame) == 3 * adata.n_vars
    sc.pl.rank_genes_groups_dotplot(adata, key="kratos_cw", n_genes=3, show=False)
    sc.pl.rank_genes_groups_heatmap(adata, key="kratos_smoothgrad", n_genes=3, show=False)
    sc.pl.rank_genes_groups_matrixplot(
        adata, key="kratos_integrated_gradients", n_genes=3, values_to_plot="logfoldchanges", show=False
    )
    # panels can be recomputed from the stored model after the round trip
    scext.tl.rank_genes_perturbation(adata, method="smoothgrad", key_added="again", device="cpu")
    np.testing.assert_array_equal(
        adata.uns["again"]["names"]["type_2"], ranked.uns["kratos_smoothgrad"]["names"]["type_2"]
    )


@pytest.mark.parametrize("reference", ["rest", "type_2"])
def test_logfoldchanges_are_scanpys_also_on_scaled_data_with_raw(reference):
    """On scaled X with log-normalised .raw (as pbmc68k_reduced), fold changes come from .raw, as Scanpy's."""
    adata = make_toy(random_state=1)
    adata.raw = adata
    sc.pp.scale(adata)
    scext.tl.kratos(adata, groupby="cell_type", random_state=0, device="cpu", **FAST)
    scext.tl.rank_genes_perturbation(
        adata, method="smoothgrad", sg_n_samples=2, reference=reference, key_added="sg", device="cpu"
    )
    sc.tl.rank_genes_groups(adata, "cell_type", method="wilcoxon", reference=reference, key_added="wilcoxon")
    for group in adata.uns["sg"]["names"].dtype.names:
        ours = sc.get.rank_genes_groups_df(adata, group=group, key="sg").set_index("names")["logfoldchanges"]
        theirs = sc.get.rank_genes_groups_df(adata, group=group, key="wilcoxon").set_index("names")
        assert ours.notna().all()
        np.testing.assert_allclose(ours, theirs.loc[ours.index, "logfoldchanges"], rtol=1e-4, atol=1e-4)


def test_one_vs_one_towards_a_reference(trained_toy):
    adata = trained_toy.copy()
    scext.tl.rank_genes_perturbation(adata, method="cw", reference="type_2", key_added="ovo", device="cpu")
    scext.tl.rank_genes_perturbation(
        adata, method="cw", reference="type_2", score="magnitude", key_added="ovo_mag", device="cpu"
    )
    result = adata.uns["ovo"]
    assert list(result["names"].dtype.names) == ["type_0", "type_1"]
    assert result["params"]["reference"] == "type_2"
    # the default panel: the genes that hold type_0 cells away from type_2, i.e. type_0's own markers
    assert (adata.var.loc[list(result["names"]["type_0"][:5]), "marker_of"] == "type_0").mean() >= 0.8
    # |delta|: moving type_0 cells to type_2 involves type_0's and type_2's markers, not type_1's
    roles = adata.var.loc[list(adata.uns["ovo_mag"]["names"]["type_0"][:10]), "marker_of"]
    assert roles.isin(["type_0", "type_2"]).mean() >= 0.8
    sc.pl.rank_genes_groups_dotplot(adata, key="ovo", n_genes=2, show=False)


def test_same_seed_same_smoothgrad(trained_toy):
    first, second = trained_toy.copy(), trained_toy.copy()
    for adata in (first, second):
        scext.tl.rank_genes_perturbation(adata, method="smoothgrad", random_state=5, device="cpu")
    np.testing.assert_array_equal(
        first.uns["kratos_smoothgrad"]["scores"]["type_0"],
        second.uns["kratos_smoothgrad"]["scores"]["type_0"],
    )


def test_results_do_not_depend_on_batch_size(trained_toy):
    small, large = trained_toy.copy(), trained_toy.copy()
    scext.tl.rank_genes_perturbation(small, method="cw", batch_size=7, device="cpu", cw_max_iter=30)
    scext.tl.rank_genes_perturbation(large, method="cw", batch_size=1000, device="cpu", cw_max_iter=30)
    np.testing.assert_allclose(
        small.varm["kratos_cw_scores"], large.varm["kratos_cw_scores"], rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "shap"}, ValueError, "unknown"),
        ({"score": "abs"}, ValueError, "score"),
        ({"key": "absent"}, KeyError, "no KRATOS model"),
        ({"groups": ["type_9"]}, ValueError, "not classes"),
        ({"reference": "type_9"}, ValueError, "not classes"),
        ({"ig_baseline": "median", "method": "integrated_gradients"}, ValueError, "ig_baseline"),
        ({"device": "cuda:5"}, ValueError, "CUDA"),
    ],
)
def test_bad_arguments_raise_and_leave_adata_untouched(trained_toy, kwargs, error, message):
    adata = trained_toy.copy()
    before = snapshot(adata)
    with pytest.raises(error, match=message):
        scext.tl.rank_genes_perturbation(adata, **kwargs)
    assert_untouched(adata, before)


def test_copy_returns_result_and_leaves_input(trained_toy):
    adata = trained_toy.copy()
    before = snapshot(adata)
    out = scext.tl.rank_genes_perturbation(adata, method="integrated_gradients", copy=True, device="cpu")
    assert_untouched(adata, before)
    assert "kratos_integrated_gradients" in out.uns


def test_pbmc68k_reduced_group_names_with_slashes_round_trip(tmp_path):
    adata = sc.datasets.pbmc68k_reduced()
    scext.tl.kratos(adata, groupby="bulk_labels", n_epochs=5, device="cpu")
    scext.tl.rank_genes_perturbation(adata, method="smoothgrad", sg_n_samples=5, device="cpu")
    adata.write_h5ad(tmp_path / "pbmc.h5ad")
    reread = sc.read_h5ad(tmp_path / "pbmc.h5ad")
    result = reread.uns["kratos_smoothgrad"]
    assert "CD4+/CD25 T Reg" in result["names"].dtype.names
    assert result["n_cells"].dtype.names == result["names"].dtype.names
    sc.pl.rank_genes_groups_dotplot(reread, key="kratos_smoothgrad", n_genes=2, show=False)


def test_warnings_name_the_callers_line_not_scexts_wrappers(trained_toy):
    adata = trained_toy.copy()
    with pytest.warns(UserWarning, match="cw_tradeoff") as record:
        scext.tl.rank_genes_perturbation(adata, method="cw", cw_tradeoff=1e-3, cw_n_rounds=1, device="cpu")
    assert {warning.filename for warning in record} == {__file__}
