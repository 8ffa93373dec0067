"""Time per epoch and peak memory of every scext tool at 10^4 - 10^6 synthetic cells (2,000 genes).

    python benchmarks/scale.py [--sizes 10000 100000 1000000] [--tools kratos cicl cellvgae scdefer]
        [--backed] [--slice-cells 20000] [--cache-dir /tmp/scext_scale] [--device auto]

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

CellVGAE and scDEFER (in memory only; they read the whole matrix): minibatch training forced
(``training="minibatch"``, the mode "auto" picks above 50,000 cells), one epoch (scDEFER: one pretraining
and one joint epoch), on the log-normalised counts (CellVGAE) or the counts (scDEFER). Their cell graph is
built before the clock starts, on 50 principal components (`sc.pp.pca`, `sc.pp.neighbors`), because a kNN
search on 2,000 genes would dominate; "seconds per epoch" is the time spent in `train_loop` (scDEFER: the
joint epoch, which includes the refresh of P over all cells; its pretraining epoch is listed apart), and
"total" the whole call (graph tensors, partition, training, inference, clustering).

The growth exponent is the slope of log(seconds per epoch) and of log(peak memory) against log(cells).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

N_GENES, N_TYPES, N_MARKERS = 2000, 10, 20


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
    fit_seconds = []
    original_fit = Kratos.fit

    def timed_fit(self, *args, **kwargs):
        start = time.perf_counter()
        result = original_fit(self, *args, **kwargs)
        fit_seconds.append(time.perf_counter() - start)
        return result

    Kratos.fit = timed_fit
    start = time.perf_counter()
    scext.tl.kratos(adata, "cell_type", n_epochs=2, patience=None, device=device, progress_bar=False)
    total = time.perf_counter() - start
    return {
        "seconds per epoch": fit_seconds[0] / 2,
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
    data, genes, scaler, _ = _cicl._prepare(matrix, var_names, True, 500, None, False, rng)
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
    model.transform(part, torch_device, reference_size=slice_cells)
    inference = (time.perf_counter() - start) * n_cells / len(rows)
    return {
        "seconds per epoch": epoch,
        "total seconds": prepare + epoch + inference,
        "preprocessing seconds": prepare,
        "inference seconds": inference,
        "extra GB": n_cells * len(genes) * 4 / 2**30,
    }


def measure_graph_tool(tool: str, path: Path, device: str) -> dict:
    import anndata as ad
    import scanpy as sc

    import scext

    module = getattr(scext.tl, f"_{tool}")
    epochs: list[float] = []
    original_loop = module.train_loop

    def timed_loop(*args, **kwargs):
        start = time.perf_counter()
        result = original_loop(*args, **kwargs)
        epochs.append((time.perf_counter() - start) / max(kwargs.get("n_epochs", 1), 1))
        return result

    module.train_loop = timed_loop
    adata = ad.read_h5ad(path)
    work = adata.copy()
    sc.pp.normalize_total(work)
    sc.pp.log1p(work)
    sc.pp.pca(work, n_comps=50)
    sc.pp.neighbors(work, n_neighbors=10 if tool == "scdefer" else 5, use_rep="X_pca", key_added="graph")
    if tool == "cellvgae":
        adata = work
    else:
        adata.obsp["graph_connectivities"] = work.obsp["graph_connectivities"]
        adata.uns["graph"] = work.uns["graph"]
    del work
    start = time.perf_counter()
    if tool == "cellvgae":
        scext.tl.cellvgae(
            adata, neighbors_key="graph", training="minibatch", n_epochs=1, device=device, progress_bar=False
        )
        row = {"seconds per epoch": epochs[0]}
    else:
        scext.tl.scdefer(
            adata,
            N_TYPES,
            neighbors_key="graph",
            training="minibatch",
            n_pretrain_epochs=1,
            n_epochs=1,
            device=device,
            progress_bar=False,
        )
        row = {"seconds per epoch": epochs[1], "pretraining epoch seconds": epochs[0]}
    return {**row, "total seconds": time.perf_counter() - start, "extra GB": 0.0}


def child(tool: str, path: Path, backed: bool, device: str, slice_cells: int, queue) -> None:
    try:
        if tool == "kratos":
            row = measure_kratos(path, backed, device)
        elif tool == "cicl":
            row = measure_cicl(path, backed, device, slice_cells)
        else:
            row = measure_graph_tool(tool, path, device)
        row["peak GB"] = peak_gb() + row.pop("extra GB")
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
    args = parser.parse_args()
    context = mp.get_context("spawn")
    rows = []
    for n_cells in args.sizes:
        start = time.perf_counter()
        path = dataset(n_cells, args.cache_dir)
        print(f"data {n_cells:,} cells ready ({time.perf_counter() - start:.0f} s)", flush=True)
        for tool in args.tools:
            queue = context.Queue()
            process = context.Process(
                target=child, args=(tool, path, args.backed, args.device, args.slice_cells, queue)
            )
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
