from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from conftest import FAST, make_toy
from test_kratos import assert_untouched, snapshot

import scext
from scext.models import GeneGraphSmoothing, Kratos, normalized_prior


def test_learned_graph_rows_sum_to_one():
    torch.manual_seed(0)
    smoothing = GeneGraphSmoothing(n_genes=12, gene_dim=4, key_dim=3)
    graph = smoothing.learned_graph(torch.randn(5, 12))
    assert graph.shape == (5, 12, 12)
    assert (graph >= 0).all()
    torch.testing.assert_close(graph.sum(-1), torch.ones(5, 12))


def test_chunked_attention_equals_the_dense_graph(monkeypatch):
    """The memory-bounded path computes exactly G (X W) with G from learned_graph."""
    import scext.models._gene_gcn as gene_gcn

    monkeypatch.setattr(gene_gcn, "ATTENTION_CHUNK", 5)
    torch.manual_seed(1)
    smoothing = GeneGraphSmoothing(n_genes=17, gene_dim=4, key_dim=3)
    z = torch.randn(3, 17)
    x = smoothing.gene_features(z)
    expected = smoothing.readout(x + torch.relu(smoothing.learned_graph(z) @ smoothing.weight(x))).squeeze(-1)
    with torch.no_grad():
        torch.testing.assert_close(smoothing(z), expected)
    # with gradients (checkpointed chunks) the value is the same and gradients flow to theta and phi
    out = smoothing(z)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert smoothing.theta.weight.grad.abs().sum() > 0 and smoothing.phi.weight.grad.abs().sum() > 0


def test_prior_graph_routes_exactly_its_edges():
    """A planted prior edge gene_0 <- gene_1 makes gene_0's smoothed feature depend more on gene_1,
    and leaves genes without prior edges exactly as they were."""
    prior = normalized_prior(sp.coo_matrix(([4.0, 2.0], ([0, 3], [1, 2])), shape=(6, 6)))
    np.testing.assert_allclose(prior.toarray()[0, 1], 1.0)  # divided by the maximum
    np.testing.assert_allclose(prior.toarray()[3, 2], 0.5)
    torch.manual_seed(2)
    plain = GeneGraphSmoothing(n_genes=6, gene_dim=4, key_dim=3)
    with_prior = GeneGraphSmoothing(n_genes=6, gene_dim=4, key_dim=3, prior=prior)
    with_prior.load_state_dict(plain.state_dict())
    z = torch.randn(4, 6)
    out_plain, out_prior = plain(z), with_prior(z)
    untouched = [1, 2, 4, 5]
    torch.testing.assert_close(out_plain[:, untouched], out_prior[:, untouched])
    assert not torch.allclose(out_plain[:, 0], out_prior[:, 0])

    def sensitivity(module):
        jacobian = torch.autograd.functional.jacobian(lambda v: module(v[None])[0], z[0])
        return jacobian[0, 1].abs()

    assert sensitivity(with_prior) > sensitivity(plain)


def test_normalized_prior_diagonal_variants_and_errors():
    graph = np.array([[5.0, 2.0], [1.0, 0.0]])
    zero = normalized_prior(graph, "zero").toarray()
    one = normalized_prior(graph, "one").toarray()
    np.testing.assert_allclose(zero, [[0, 1], [0.5, 0]])
    np.testing.assert_allclose(one, [[1, 1], [0.5, 1]])
    with pytest.raises(ValueError, match="square"):
        normalized_prior(np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        normalized_prior(-np.ones((2, 2)))
    with pytest.raises(ValueError, match="prior_diagonal"):
        normalized_prior(graph, "half")


def toy_with_prior():
    adata = make_toy(n_cells=300)
    markers = adata.var["marker_of"].to_numpy()
    # prior: genes marking the same type interact
    same = (markers[:, None] == markers[None, :]) & (markers[:, None] != "none")
    adata.varp["interactions"] = sp.csr_matrix(same.astype(np.float32) * 700.0)
    return adata


def test_gene_gcn_backbone_learns_and_round_trips(tmp_path):
    adata = toy_with_prior()
    scext.tl.kratos(
        adata, groupby="cell_type", backbone="gene_gcn", prior_graph="interactions", device="cpu", **FAST
    )
    assert adata.uns["kratos"]["test_accuracy"] > 0.9
    assert adata.uns["kratos"]["params"]["backbone"] == "gene_gcn"
    adata.write_h5ad(tmp_path / "gcn.h5ad")
    reread = sc.read_h5ad(tmp_path / "gcn.h5ad")
    model = Kratos.from_adata(reread)
    assert model.backbone == "gene_gcn" and model.prior.nnz == adata.varp["interactions"].nnz - 15
    scext.tl.kratos_predict(reread, model, key_added="again")
    np.testing.assert_allclose(reread.obsm["again_proba"], adata.obsm["kratos_proba"], atol=1e-5)
    model.save(tmp_path / "model")
    loaded = Kratos.load(tmp_path / "model", adata=reread)
    x = torch.as_tensor(reread.X[:4].toarray(), dtype=torch.float32)
    torch.testing.assert_close(loaded.net(x), model.net(x))
    # the explainers work on the new backbone unchanged
    scext.tl.rank_genes_perturbation(reread, method="integrated_gradients", device="cpu")
    top = list(reread.uns["kratos_integrated_gradients"]["names"]["type_1"][:5])
    assert (reread.var.loc[top, "marker_of"] == "type_1").mean() >= 0.8


def test_autoencoder_initialisation_pretrains_and_changes_the_start():
    runs = {}
    for init in ("random", "autoencoder"):
        adata = make_toy(n_cells=200)
        scext.tl.kratos(
            adata,
            groupby="cell_type",
            weight_init=init,
            n_pretrain_epochs=15,
            device="cpu",
            **{**FAST, "n_epochs": 1},
        )
        runs[init] = adata
    history = runs["autoencoder"].uns["kratos"]["history"]
    # most of the toy's 60 standardised genes are pure noise, so only the planted structure is learnable
    assert history["pretrain_loss"][-1] < 0.97 * history["pretrain_loss"][0]
    assert "pretrain_loss" not in runs["random"].uns["kratos"]["history"]
    assert not np.allclose(runs["random"].obsm["X_kratos"], runs["autoencoder"].obsm["X_kratos"])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"backbone": "transformer"}, ValueError, "backbone"),
        ({"prior_graph": "interactions"}, ValueError, "gene_gcn"),
        ({"backbone": "gene_gcn", "prior_graph": "absent"}, KeyError, "varp"),
        (
            {"backbone": "gene_gcn", "prior_graph": "interactions", "prior_diagonal": "two"},
            ValueError,
            "diagonal",
        ),
        ({"init": "pca"}, ValueError, "init"),
    ],
)
def test_bad_backbone_arguments_raise_and_leave_adata_untouched(kwargs, error, message):
    adata = toy_with_prior()
    before = snapshot(adata)
    with pytest.raises(error, match=message):
        scext.tl.kratos(adata, groupby="cell_type", device="cpu", **FAST, **kwargs)
    assert_untouched(adata, before)
