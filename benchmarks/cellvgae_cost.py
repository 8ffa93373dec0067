"""CellVGAE's cost: seconds per full-graph epoch and peak memory, by number of cells and layer type.

    python benchmarks/cellvgae_cost.py [--cells 2638 50000] [--convs gat gcn] [--genes 250] [--device auto]

Synthetic negative-binomial cells (`scext.datasets.synthetic_counts`, 8 types), log-normalised; the
default architecture (2 hidden layers of 128 x 3 heads, latent 50) on a 5-NN graph of the features. Each
configuration runs in a fresh process, so that its peak resident memory (CPU) or peak allocated memory
(CUDA) is its own. Reported: kNN graph seconds, seconds per training epoch (median of 3 after a warm-up
epoch), seconds to embed and read out attention, peak memory. Clustering (UMAP + HDBSCAN) is not included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import pandas as pd


def measure(n_cells: int, n_genes: int, conv: str, device: str) -> dict:
    import numpy as np
    import scanpy as sc
    import torch
    from sklearn.preprocessing import minmax_scale

    import scext
    from scext._utils import resolve_device
    from scext._utils._graph import edge_index, knn_graph
    from scext.models import CellVGAENet
    from scext.models._cellvgae import loss_terms

    torch_device = resolve_device(device)
    adata = scext.datasets.synthetic_counts(
        n_cells=n_cells, n_genes=n_genes, n_types=8, n_markers=10, random_state=0
    )
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    features = adata.X.toarray().astype(np.float32)
    start = time.perf_counter()
    graph = knn_graph(features, 5)
    graph_seconds = time.perf_counter() - start

    torch.manual_seed(0)
    x = torch.from_numpy(minmax_scale(features).astype(np.float32)).to(torch_device)
    edges = edge_index(graph, torch_device)
    net = CellVGAENet(n_genes, conv=conv).to(torch_device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def synchronize():
        if torch_device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(4):
        synchronize()
        start = time.perf_counter()
        terms = loss_terms(net, x, edges, regularizer="kl", regularizer_weight=1 / n_cells)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        synchronize()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    # what tl.cellvgae runs below 50,000 cells: one chunk of all cells, i.e. one full-graph pass per layer
    net.infer(
        lambda rows: x[torch.from_numpy(rows).to(torch_device)],
        graph,
        [np.arange(n_cells)],
        attention_layer=None if conv == "gcn" else 2,
    )
    synchronize()
    inference_seconds = time.perf_counter() - start
    if torch_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "cells": n_cells,
        "conv": conv,
        "edges": int(graph.nnz),
        "kNN graph s": graph_seconds,
        "s per epoch": sorted(times[1:])[1],
        "embed + attention s": inference_seconds,
        "peak GB": peak,
        "device": str(torch_device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, nargs="+", default=[2638, 50000])
    parser.add_argument("--convs", nargs="+", default=["gat", "gcn"])
    parser.add_argument("--genes", type=int, default=250)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(int(args.one[0]), args.genes, args.one[1], args.device)))
        return
    rows = []
    for n_cells in args.cells:
        for conv in args.convs:
            command = [sys.executable, __file__, "--one", str(n_cells), conv, "--genes", str(args.genes)]
            command += ["--device", args.device]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(
        f"\nCellVGAE per full-graph epoch, {args.genes} genes ({table['device'][0]}; peak memory is the process's "
        "resident size on CPU, allocated tensors on CUDA)\n"
    )
    print(table.drop(columns="device").round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()
