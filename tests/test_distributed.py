"""Data-parallel KRATOS over torch.distributed: two CPU processes (gloo) must match one process."""

from __future__ import annotations

import datetime
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import scext
from scext.train import shard, world

WORLD_SIZE = 2
# 190 training cells: 38 splits into even shards with no remainder; 21 is odd, gives uneven shards
# (11 / 10) and a last minibatch of one row, so rank 1's last shard is empty
SCENARIOS = {
    "even": {"batch_size": 38},
    "uneven": {"batch_size": 21, "init": "autoencoder", "pretrain_epochs": 2},
}
COMMON = {"n_epochs": 4, "hidden_sizes": (16, 8), "patience": None, "device": "cpu", "random_state": 0}


def toy():
    adata = scext.datasets.synthetic_counts(n_cells=300, n_genes=50, n_types=3, random_state=0)
    adata.X.data = np.log1p(adata.X.data)
    return adata


def train(scenario: str):
    adata = toy()
    scext.tl.kratos(adata, groupby="cell_type", progress_bar=False, **COMMON, **SCENARIOS[scenario])
    return adata


def save(adata, directory, tag: str) -> None:
    np.save(directory / f"{tag}_embedding.npy", adata.obsm["X_kratos"])
    np.save(directory / f"{tag}_proba.npy", adata.obsm["kratos_proba"])
    history = adata.uns["kratos"]["history"]
    np.savez(directory / f"{tag}_history.npz", **history)


def worker(rank: int, directory) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{directory / 'rendezvous'}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    import scanpy as sc

    sc.settings.verbosity = "info"
    sc.settings.logfile = directory / f"log_rank{rank}.txt"
    try:
        assert world() == (rank, WORLD_SIZE)
        for scenario in SCENARIOS:
            save(train(scenario), directory, f"{scenario}_rank{rank}")
            assert sc.settings.verbosity == sc.Verbosity.info  # restored after the call
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run every scenario in two gloo processes once; returns the folder of their saved results."""
    directory = tmp_path_factory.mktemp("distributed")
    # the fork server imports once and forks both workers from it: half the import time of spawn, without
    # forking this (possibly OpenMP-initialised) process. torch._dynamo is what the first optimizer step
    # would import.
    preload = ["scext", "sklearn.metrics", "torch.distributed", "torch._dynamo"]
    mp.get_context("forkserver").set_forkserver_preload(preload)
    context = mp.start_processes(
        worker, args=(directory,), nprocs=WORLD_SIZE, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + 180
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the distributed workers did not finish in 180 s (a collective mismatch hangs)")
    return directory


def load(directory, tag: str):
    history = np.load(directory / f"{tag}_history.npz")
    return (
        np.load(directory / f"{tag}_embedding.npy"),
        np.load(directory / f"{tag}_proba.npy"),
        {name: history[name] for name in history.files},
    )


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_match_each_other_and_one_process(two_ranks, scenario):
    single = train(scenario)
    n_train = int((single.obs["kratos_split"] == "train").sum())
    batch_size = SCENARIOS[scenario]["batch_size"]
    if scenario == "uneven":
        assert batch_size % 2 == 1 and n_train % batch_size == 1  # the empty-shard case is exercised
    else:
        assert n_train % batch_size == 0

    embedding0, proba0, history0 = load(two_ranks, f"{scenario}_rank0")
    embedding1, proba1, history1 = load(two_ranks, f"{scenario}_rank1")
    np.testing.assert_array_equal(embedding0, embedding1)
    np.testing.assert_array_equal(proba0, proba1)
    assert history0.keys() == history1.keys()
    for name in history0:
        np.testing.assert_array_equal(history0[name], history1[name])

    np.testing.assert_allclose(embedding0, single.obsm["X_kratos"], atol=1e-5)
    np.testing.assert_allclose(proba0, single.obsm["kratos_proba"], atol=1e-5)
    expected = single.uns["kratos"]["history"]
    assert set(history0) == set(expected)
    assert len(history0["loss"]) == COMMON["n_epochs"]
    for name, values in expected.items():
        np.testing.assert_allclose(history0[name], values, rtol=1e-5, atol=1e-6, err_msg=name)


def test_only_rank_zero_logs(two_ranks):
    assert "training KRATOS" in (two_ranks / "log_rank0.txt").read_text()
    assert "KRATOS" not in (two_ranks / "log_rank1.txt").read_text()


def test_without_process_group_nothing_is_sharded():
    assert world() == (0, 1)
    rows = np.arange(7)
    np.testing.assert_array_equal(shard(rows), rows)
