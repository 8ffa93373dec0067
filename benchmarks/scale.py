"""Time per epoch and peak memory of every scext tool at 10^4 - 10^6 synthetic cells (2,000 genes).

    python benchmarks/scale.py [--sizes 10000 100000 1000000] [--tools kratos cicl cellvgae scdefer]
        [--backed] [--slice-cells 20000] [--cache-dir /tmp/scext_scale] [--device auto] [--max-batches M]

Data: `scext.datasets.synthetic_counts` (10 types, 20 markers each, ``mean_log_expression=-2.5``: about 11%
non-zeros), generated once per size and cached as .h5ad in `--cache-dir` (generation time is not counted).
Each (tool, size) runs in a fresh process, whose peak resident memory (``ru_maxrss``) is reported; with
``--backed`` the file is opened with ``read_h5ad(..., backed="r")`` and only streamed.

KRATOS: `scext.tl.kratos` on the log-normalised counts (normalize_total + log1p in memory; on the raw counts
when backed), 2 epochs, no early stopping; seconds per epoch is the time spent in `Kratos.fit` divided by 2,
and "total" is the whole call (scaler, training, inference of every cell, test metrics).

CICL: its preprocessing (`_prepare`: streamed library sizes, HVG, sparse log-normalised input) runs on all
cells; one training epoch and the inference (every cell attending to `--slice-cells` reference cells, the
default ``max_attention_cells``) are timed on a slice of `--slice-cells` cells and scaled linearly to all
cells, since both cost the same per cell at fixed batch and reference size. "total" = preprocessing + the
scaled epoch + the scaled inference. The peak memory then lacks the H matrix of all cells (cells x 500
float32, 2 GB at 10^6), which is added to the measured peak and reported separately.

CellVGAE and scDEFER (in memory only): minibatch training forced (``training="minibatch"``, which "auto"
picks above ``batch_size`` cells) with ``batch_size=8192`` (the tools' default is 1,024; the documented table
ran at 8,192, which keeps a GPU busier), one epoch (scDEFER: one pretraining and one joint epoch), on the log-normalised
counts (CellVGAE) or the counts (scDEFER, ``denoised=False``: no cells x genes output layer); CellVGAE
clusters with Leiden (UMAP + HDBSCAN on a million cells would dominate). Their cell graph (`sc.pp.neighbors`
on 50 principal components, 5 or 10 neighbours) is built before the clock starts and cached in
`--cache-dir`, because a kNN search on 2,000 genes would dominate. "seconds per epoch" is the time spent in
`train_loop` (scDEFER: the joint epoch, which includes the refresh of P over all cells; its pretraining
epoch is listed apart). With ``--max-batches m`` an epoch trains only its first m minibatches and its time
is scaled to all of them (every minibatch holds about ``batch_size`` cells and costs about the same); the
refresh of P, the inference and the clustering always run over all cells. "total" is the whole call.
"peak GB" is the resident peak during the call (Linux ``VmHWM``, reset just before it): the loaded data
count, the preprocessing before the call does not.

The growth exponent is the slope of log(seconds per epoch) and of log(peak memory) against log(cells).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import multiprocessing as mp
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _timing import fit_seconds

N_GENES, N_TYPES, N_MARKERS = 2000, 10, 20
# the graph tools' minibatch size in this benchmark (its documented table); the tools default to 1,024
BATCH_SIZE = 8192


def dataset(n_cells: int, cache_dir: Path) -> Path:
    import scext

    path = cache_dir / f"synthetic_{n_cells}x{N_GENES}.h5ad"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        adata = scext.datasets.synthetic_counts(
            n_cells, N_GENES, N_TYPES, N_MARKERS, mean_log_expression=-2.5, counts_layer=False
        )
        adata.write_h5ad(path)
    return path


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB on Linux


def measure_kratos(path: Path, backed: bool, device: str) -> dict:
    import anndata as ad
    import scanpy as sc

    import scext
    from scext.models import Kratos

    adata = ad.read_h5ad(path, backed="r" if backed else None)
    if not backed:
        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
    start = time.perf_counter()
    with fit_seconds(Kratos) as seconds:
        scext.tl.kratos(adata, "cell_type", n_epochs=2, patience=None, device=device, progress_bar=False)
    total = time.perf_counter() - start
    return {
        "seconds per epoch": seconds[0] / 2,
        "total seconds": total,
        "test accuracy": adata.uns["kratos"]["test_accuracy"],
        "extra GB": 0.0,
    }


def measure_cicl(path: Path, backed: bool, device: str, slice_cells: int) -> dict:
    import anndata as ad
    import torch

    from scext._utils import get_matrix, resolve_device
    from scext.models import Cicl
    from scext.tl import _cicl

    torch_device = resolve_device(device)
    adata = ad.read_h5ad(path, backed="r" if backed else None)
    start = time.perf_counter()
    matrix, var_names = get_matrix(adata, backed=True)
    rng = np.random.default_rng(0)
    data, genes, scaler, _, _ = _cicl._prepare(matrix, var_names, True, 500, None, False, rng)
    prepare = time.perf_counter() - start
    n_cells = data.shape[0]
    rows = np.sort(rng.choice(n_cells, min(slice_cells, n_cells), replace=False))
    part = data[rows]
    torch.manual_seed(0)
    model = Cicl(data.shape[1], N_TYPES)
    model.set_scaler(*scaler)
    start = time.perf_counter()
    model.fit(part, n_epochs=1, device=torch_device, progress_bar=False)
    epoch = (time.perf_counter() - start) * n_cells / len(rows)
    start = time.perf_counter()
    model.embed(part, torch_device, reference_size=slice_cells)
    inference = (time.perf_counter() - start) * n_cells / len(rows)
    return {
        "seconds per epoch": epoch,
        "total seconds": prepare + epoch + inference,
        "preprocessing seconds": prepare,
        "inference seconds": inference,
        "extra GB": n_cells * len(genes) * 4 / 2**30,
    }


def cell_graph(adata, n_neighbors: int, cache_dir: Path):
    """Connectivities of a `n_neighbors`-NN graph on 50 PCs of the log-normalised counts, cached per size."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    path = cache_dir / f"graph_{adata.n_obs}_k{n_neighbors}.npz"
    if path.exists():
        return sp.load_npz(path)
    pca_path = cache_dir / f"pca_{adata.n_obs}.npy"
    if not pca_path.exists():
        work = adata.copy()
        sc.pp.normalize_total(work)
        sc.pp.log1p(work)
        sc.pp.pca(work, n_comps=50)
        np.save(pca_path, work.obsm["X_pca"])
        del work
    work = ad.AnnData(obs=adata.obs[[]], obsm={"X_pca": np.load(pca_path)})
    sc.pp.neighbors(work, n_neighbors=n_neighbors, use_rep="X_pca")
    sp.save_npz(path, work.obsp["connectivities"])
    return work.obsp["connectivities"]


def reset_peak() -> None:
    """Start a new resident-memory peak (Linux ``VmHWM``), so preprocessing before the call does not count."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_since_reset_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measure_graph_tool(tool: str, path: Path, device: str, max_batches: int | None, cache_dir: Path) -> dict:
    import anndata as ad
    import scanpy as sc

    import scext
    from scext.train._graph_batches import PARTS_PER_BATCH, batches_per_epoch

    module = importlib.import_module(f"scext.models._{tool}")  # the model class calls train_loop
    loops: list[dict] = []
    original_loop = module.train_loop

    def timed_loop(*args, batches, step, **kwargs):
        refresh, steps = [], []

        def counted_step(batch):
            steps.append(1)
            return step(batch)

        def limited():
            start = time.perf_counter()
            iterator = iter(batches())  # scDEFER's joint epochs refresh P over all cells here
            refresh.append(time.perf_counter() - start)
            return itertools.islice(iterator, max_batches) if max_batches else iterator

        start = time.perf_counter()
        result = original_loop(*args, batches=limited, step=counted_step, **kwargs)
        loops.append(
            {
                "seconds": time.perf_counter() - start,
                "refresh": sum(refresh),
                "steps": len(steps) / len(refresh),
            }
        )
        return result

    module.train_loop = timed_loop
    adata = ad.read_h5ad(path)
    graph = cell_graph(adata, 10 if tool == "scdefer" else 5, cache_dir)
    adata.obsp["graph_connectivities"] = graph
    adata.uns["graph"] = {"connectivities_key": "graph_connectivities"}
    if tool == "cellvgae":
        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
    reset_peak()
    start = time.perf_counter()
    common = {
        "neighbors_key": "graph",
        "training": "minibatch",
        "batch_size": BATCH_SIZE,
        "device": device,
        "progress_bar": False,
    }
    if tool == "cellvgae":
        scext.tl.cellvgae(adata, n_epochs=1, cluster_method="leiden", **common)
    else:
        scext.tl.scdefer(adata, N_TYPES, n_pretrain_epochs=1, n_epochs=1, denoised=False, **common)
    total = time.perf_counter() - start
    n_parts = adata.uns[tool]["params"]["n_parts"]
    n_batches = batches_per_epoch(n_parts, PARTS_PER_BATCH)

    def epoch(loop: dict) -> float:
        # an epoch visits every batch; each costs about the same (batch_size cells), so a truncated epoch
        # scales linearly; the refresh of P runs over all cells and is measured whole
        training = loop["seconds"] - loop["refresh"]
        return loop["refresh"] + training * n_batches / loop["steps"]

    row = {"seconds per epoch": epoch(loops[-1])}
    if tool == "scdefer":
        row["pretraining epoch seconds"] = epoch(loops[0])
        row["P refresh seconds"] = loops[-1]["refresh"]
    row["batches timed"] = f"{int(loops[-1]['steps'])} of {n_batches}"
    return {**row, "total seconds": total, "peak GB": peak_since_reset_gb()}


def child(tool: str, path: Path, args: argparse.Namespace, queue) -> None:
    try:
        if tool == "kratos":
            row = measure_kratos(path, args.backed, args.device)
        elif tool == "cicl":
            row = measure_cicl(path, args.backed, args.device, args.slice_cells)
        else:
            row = measure_graph_tool(tool, path, args.device, args.max_batches, args.cache_dir)
        # the graph tools measure their own peak; CICL adds what its slice run does not hold
        row["peak GB"] = row.get("peak GB", peak_gb()) + row.pop("extra GB", 0.0)
        queue.put(row)
    except Exception as err:  # report and go on with the other sizes
        queue.put({"error": f"{type(err).__name__}: {err}"})


def growth(frame: pd.DataFrame, column: str) -> float:
    valid = frame[["cells", column]].dropna()
    if len(valid) < 2:
        return float("nan")
    return float(np.polyfit(np.log(valid["cells"]), np.log(valid[column]), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="*", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--tools",
        nargs="*",
        choices=["kratos", "cicl", "cellvgae", "scdefer"],
        default=["kratos", "cicl", "cellvgae", "scdefer"],
    )
    parser.add_argument("--backed", action="store_true", help="read the data backed (streamed from disk)")
    parser.add_argument("--slice-cells", type=int, default=20_000)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/scext_scale"))
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="graph tools: train this many minibatches per epoch and scale the epoch time (default: all)",
    )
    args = parser.parse_args()
    context = mp.get_context("spawn")
    rows = []
    for n_cells in args.sizes:
        start = time.perf_counter()
        path = dataset(n_cells, args.cache_dir)
        print(f"data {n_cells:,} cells ready ({time.perf_counter() - start:.0f} s)", flush=True)
        for tool in args.tools:
            queue = context.Queue()
            process = context.Process(target=child, args=(tool, path, args, queue))
            process.start()
            result = queue.get()
            process.join()
            rows.append(
                {"tool": tool, "input": "backed" if args.backed else "in memory", "cells": n_cells, **result}
            )
            print(pd.DataFrame(rows[-1:]).round(3).to_markdown(index=False), flush=True)
    table = pd.DataFrame(rows)
    print(f"\n{N_GENES} genes, device {args.device}\n")
    print(table.round(3).to_markdown(index=False))
    if "seconds per epoch" in table:
        print("\ngrowth exponents (slope of log-log):")
        for tool, frame in table.groupby("tool"):
            print(
                f"  {tool}: time per epoch {growth(frame, 'seconds per epoch'):.2f}, "
                f"peak memory {growth(frame, 'peak GB'):.2f}"
            )


if __name__ == "__main__":
    main()
