from __future__ import annotations

import numpy as np
import pytest
import torch

import scext
from scext._utils import resolve_device, stratified_split
from scext._utils._device import keeps_torch_threads
from scext.train import adam, iter_minibatches, map_minibatches, train_loop


def test_synthetic_counts_plant_markers():
    adata = scext.datasets.synthetic_counts(n_cells=400, n_genes=50, n_types=2, n_markers=5, random_state=1)
    counts = adata.X.toarray()
    assert np.allclose(counts, np.round(counts)) and counts.min() >= 0
    for t in ("type_0", "type_1"):
        markers = (adata.var["marker_of"] == t).to_numpy()
        inside = (adata.obs["cell_type"] == t).to_numpy()
        assert markers.sum() == 5
        ratio = counts[inside][:, markers].mean() / counts[~inside][:, markers].mean()
        assert 2.5 < ratio < 6
    again = scext.datasets.synthetic_counts(n_cells=400, n_genes=50, n_types=2, n_markers=5, random_state=1)
    assert (again.X != adata.X).nnz == 0
    with pytest.raises(ValueError, match="exceeds n_genes"):
        scext.datasets.synthetic_counts(n_genes=10, n_types=3, n_markers=5)


def test_stratified_split_keeps_every_class_in_training():
    labels = np.array([0] * 10 + [1] * 2 + [2])
    mask = stratified_split(labels, 0.3, np.random.default_rng(0))
    assert mask[labels == 0].sum() == 3
    assert mask[labels == 1].sum() == 1
    assert mask[labels == 2].sum() == 0
    assert not stratified_split(labels, 0.0, np.random.default_rng(0)).any()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")).type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(ValueError):
        resolve_device("quantum")


def test_minibatches_cover_every_row_once_in_seeded_order():
    import scipy.sparse as sp

    matrix = sp.csr_matrix(np.arange(40, dtype=np.float32).reshape(20, 2))
    rows = np.arange(3, 20)
    labels = torch.arange(20)
    seen = []
    for generator_seed in (0, 0):
        generator = torch.Generator().manual_seed(generator_seed)
        batches = list(
            iter_minibatches(
                matrix, rows, 5, torch.device("cpu"), shuffle=True, generator=generator, extras=(labels,)
            )
        )
        seen.append(torch.cat([b[1] for b in batches]))
        for x, y in batches:
            np.testing.assert_array_equal(x[:, 0].numpy(), 2 * y.numpy())
    assert sorted(seen[0].tolist()) == rows.tolist()
    assert torch.equal(seen[0], seen[1])
    (doubled,) = map_minibatches(lambda x: 2 * x, matrix, torch.device("cpu"), batch_size=6)
    np.testing.assert_array_equal(doubled, 2 * matrix.toarray())


def test_adam_uses_torchs_fused_kernel_on_the_cpu():
    # CICL and scDEFER train with it: one kernel over all weights instead of a loop of small tensors
    parameters = [torch.nn.Parameter(torch.zeros(3))]
    assert adam(parameters, 1e-3, torch.device("cpu")).defaults["fused"] is True
    assert adam(parameters, 1e-3, torch.device("meta")).defaults["foreach"] is True


def test_tools_train_with_and_give_back_the_callers_torch_threads():
    # numba's first parallel call (Scanpy, UMAP) resets the OpenMP thread count torch shares with it
    caller = torch.get_num_threads()
    other = 2 if caller == 1 else 1
    module = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    seen = []

    def step(batch):
        seen.append(torch.get_num_threads())
        return {"loss": module(batch[0]).pow(2).mean()}

    @keeps_torch_threads
    def tool():
        torch.set_num_threads(other)  # what numba's OpenMP start does during preprocessing
        train_loop(module, optimizer, step=step, batches=lambda: [(torch.ones(3, 2),)], n_epochs=2)
        torch.set_num_threads(other)  # and during a read-out such as UMAP

    try:
        tool()
        assert seen == [caller, caller]
        assert torch.get_num_threads() == caller
    finally:
        torch.set_num_threads(caller)
