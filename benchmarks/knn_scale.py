"""kNN graph cost up to a million cells: seconds, peak memory and recall of `knn_graph` by method.

    python benchmarks/knn_scale.py [--sizes 10000 100000 1000000] [--dims 50] [--n-neighbors 15]
        [--methods pynndescent torch] [--device cpu] [--torch-cpu-max 200000]

Data look like PCA coordinates of clustered cells: 20 Gaussian blobs in `--dims` dimensions (seeded numpy,
float32). Each (size, method) runs in a fresh process, so that its peak resident memory is its own and
pynndescent's numba compilation is paid there. Measured in that process:

- warm-up s: a first call on 2,000 cells, i.e. the one-off compilation (numba) or initialisation (torch);
- seconds: wall time of the `knn_graph` call itself (neighbour search + symmetrisation), after the warm-up;
- peak RSS GB: the process's peak resident memory up to the end of that call (``ru_maxrss``; it includes
  the interpreter, torch, numba and the data themselves, shown alone as "data GB");
- peak GPU GB: torch's peak allocated CUDA memory (CUDA only);
- recall: recall@k of the directed neighbours of 1,000 random cells against exact float64 brute force.

Brute-force ``torch`` search is quadratic, so on the CPU it is skipped above `--torch-cpu-max` cells.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import pandas as pd

N_CLUSTERS = 20
N_QUERIES = 1000
WARM_UP_CELLS = 2000


def synthetic_pca(n_cells: int, n_dims: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    # cluster spread shrinking along the dimensions, as PCA variance does, so that a few leading
    # components separate the clusters and the rest is mostly within-cluster noise
    scale = (1.0 / np.sqrt(np.arange(1, n_dims + 1))).astype(np.float32)
    centres = rng.normal(scale=6.0, size=(N_CLUSTERS, n_dims)).astype(np.float32) * scale
    labels = rng.integers(N_CLUSTERS, size=n_cells)
    data = rng.standard_normal(size=(n_cells, n_dims), dtype=np.float32)
    data *= scale
    data += centres[labels]
    return data


def exact_neighbours(data, queries, n_neighbors: int, device):
    """Exact float64 neighbours of the rows `queries` of `data`, self excluded, by torch brute force."""
    import torch

    x = torch.from_numpy(data).to(device=device, dtype=torch.float64)
    squared_norms = x.square().sum(dim=1)
    result = []
    chunk = max(1, 2**26 // len(data))
    for start in range(0, len(queries), chunk):
        rows = torch.from_numpy(queries[start : start + chunk]).to(device)
        distances = torch.addmm(squared_norms.unsqueeze(0), x[rows], x.T, beta=1.0, alpha=-2.0)
        distances[torch.arange(len(rows), device=device), rows] = torch.inf
        result.append(torch.topk(distances, n_neighbors, dim=1, largest=False).indices.cpu())
    return torch.cat(result).numpy()


def measure(n_cells: int, n_dims: int, n_neighbors: int, method: str, device: str) -> dict:
    import numpy as np
    import torch

    from scext._utils import resolve_device
    from scext._utils._graph import _symmetric_graph, knn_graph, knn_indices

    torch_device = resolve_device(device)
    data = synthetic_pca(n_cells, n_dims)

    start = time.perf_counter()
    knn_graph(synthetic_pca(WARM_UP_CELLS, n_dims, seed=1), n_neighbors, method=method, device=torch_device)
    warm_up = time.perf_counter() - start
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    start = time.perf_counter()
    # knn_graph's own two steps, so that the directed neighbours are at hand for the recall
    indices = knn_indices(data, n_neighbors, method=method, device=torch_device)
    graph = _symmetric_graph(indices, n_neighbors)
    seconds = time.perf_counter() - start
    # ru_maxrss never decreases: read now, before the exact search below adds its own memory
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if torch_device.type == "cuda" else float("nan")

    queries = np.random.default_rng(2).choice(n_cells, size=min(N_QUERIES, n_cells), replace=False)
    truth = exact_neighbours(data, queries, n_neighbors, torch_device)
    hits = sum(len(set(a) & set(b)) for a, b in zip(indices[queries].tolist(), truth.tolist(), strict=True))
    return {
        "method": method,
        "cells": n_cells,
        "seconds": seconds,
        "warm-up s": warm_up,
        "peak RSS GB": peak_rss,
        "data GB": data.nbytes / 2**30,
        "peak GPU GB": peak_gpu,
        "recall": hits / truth.size,
        "edges": int(graph.nnz),
        "device": str(torch_device),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000, 1000000])
    parser.add_argument("--dims", type=int, default=50)
    parser.add_argument("--n-neighbors", type=int, default=15)
    parser.add_argument("--methods", nargs="+", default=["pynndescent", "torch"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--torch-cpu-max", type=int, default=200000)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        row = measure(int(args.one[0]), args.dims, args.n_neighbors, args.one[1], args.device)
        print(json.dumps(row))
        return
    rows = []
    for n_cells in args.sizes:
        for method in args.methods:
            if method == "torch" and args.device == "cpu" and n_cells > args.torch_cpu_max:
                print(
                    f"skipped: torch on the CPU at {n_cells} cells (brute force is O(n^2); "
                    f"--torch-cpu-max {args.torch_cpu_max})",
                    flush=True,
                )
                continue
            command = [sys.executable, os.path.abspath(__file__), "--one", str(n_cells), method]
            command += ["--dims", str(args.dims), "--n-neighbors", str(args.n_neighbors)]
            command += ["--device", args.device]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(f"failed: {method} at {n_cells} cells\n{result.stderr[-2000:]}", flush=True)
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    if not rows:
        return
    table = pd.DataFrame(rows)
    if table["device"].str.startswith("cpu").all():
        table = table.drop(columns="peak GPU GB")
    print(
        f"\nkNN graph, {args.n_neighbors} neighbours, {args.dims} dims, {N_CLUSTERS} Gaussian blobs "
        f"(device {table['device'][0]}, {table['threads'][0]} torch threads, {os.cpu_count()} CPUs); "
        f"recall@{args.n_neighbors} on {N_QUERIES} cells\n"
    )
    print(table.drop(columns=["device", "threads"]).round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()
