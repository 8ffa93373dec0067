"""CellVGAE's open choices: feature genes, regulariser, schedule, and how clusters are read from mu.

    python benchmarks/cellvgae_choices.py [--datasets yan pbmc3k_hvg250 baron_mouse] [--seeds 0 1]
        [--genes 500 2000] [--regularizers kl mmd] [--schedules 50:1e-3 200:1e-4 50:1e-3:1024]
        [--graph-spaces genes pcs] [--out benchmarks/results/cellvgae_choices.csv]

For each data set (log-normalised: counts get normalize_total + log1p), seed, number of feature genes,
regulariser and schedule (``epochs:learning rate`` on the full graph, or ``steps:learning rate:batch size``
on Cluster-GCN minibatches of about that many cells, in whole epochs of at least that many optimizer
steps) and graph space (``genes``: the tool's 5-NN graph on the feature genes; ``pcs``: the same graph on
their top 50 principal components, centred and not scaled, passed as ``graph_use_rep``),
`scext.tl.cellvgae` is trained at its other defaults without clustering, and mu is read out five ways:
HDBSCAN on mu (the tool's default), HDBSCAN on a 2-D UMAP of mu (``cluster_method="umap_hdbscan"``, the
former default), K-means with the true K (what ``n_clusters=K`` returns), and Leiden at resolution 1 and
0.3 on a 15-NN graph of mu. Labels are read only to score: ARI of each read-out, and the label purity of
the 5-NN graph the encoder was trained on and of the 5-NN graph of mu (the fraction of neighbour pairs
that share a label), which says whether the graph or the read-out loses the clusters. Writes one CSV row per run and a Markdown table of
means and spreads over the seeds next to it (``.md``).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch
from clustering import is_log_normalised, load
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

import scext
from scext._utils._genes import highly_variable_genes
from scext._utils._graph import knn_graph
from scext.tl._cellvgae import _cluster
from scext.train._graph_batches import batches_per_epoch, partition_plan
from scext.train._loop import epochs_for_steps

N_PCS = 50  # as Scanpy's pca, and scDEFER's graph_n_pcs


def log_normalised(name: str) -> ad.AnnData:
    adata = load(name)
    if not is_log_normalised(adata):
        sc.pp.normalize_total(adata)
        sc.pp.log1p(adata)
    return adata


def purity(neighbours: np.ndarray, labels: np.ndarray) -> float:
    return float((labels[neighbours] == labels[:, None]).mean())


def graph_purity(data: np.ndarray, labels: np.ndarray, seed: int) -> float:
    graph = knn_graph(np.ascontiguousarray(data, dtype=np.float32), 5, random_state=seed).tocoo()
    return float((labels[graph.row] == labels[graph.col]).mean())


def leiden_on(embedding: np.ndarray, resolution: float, seed: int) -> np.ndarray:
    holder = ad.AnnData(np.zeros((embedding.shape[0], 1), dtype=np.float32))
    holder.obsm["mu"] = embedding
    sc.pp.neighbors(holder, use_rep="mu", n_neighbors=15, random_state=seed)
    sc.tl.leiden(holder, resolution=resolution, flavor="igraph", n_iterations=2, random_state=seed)
    return holder.obs["leiden"].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["yan", "pbmc3k_hvg250", "baron_mouse"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--genes", nargs="+", type=int, default=[500, 2000])
    parser.add_argument("--regularizers", nargs="+", default=["kl", "mmd"])
    parser.add_argument(
        "--schedules",
        nargs="+",
        default=["50:1e-3"],
        help="epochs:learning rate or steps:learning rate:batch size",
    )
    parser.add_argument("--graph-spaces", nargs="+", choices=["genes", "pcs"], default=["genes"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/cellvgae_choices.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sc.settings.verbosity = 0
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.datasets:
        adata = log_normalised(name)
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        n_types = len(np.unique(labels))
        matrix = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
        for n_genes in args.genes:
            genes = highly_variable_genes(matrix, n_genes)
            graph_spaces = {"genes": matrix[:, genes]}
            if "pcs" in args.graph_spaces:
                # the top principal components of the feature genes as read (log-normalised, centred by PCA)
                components = sc.AnnData(graph_spaces["genes"])
                sc.pp.pca(components, n_comps=min(N_PCS, components.n_obs - 1, components.n_vars - 1))
                graph_spaces["pcs"] = adata.obsm["X_feature_pca"] = components.obsm["X_pca"]
            trained_graph = {
                space: graph_purity(graph_spaces[space], labels, 0) for space in args.graph_spaces
            }
            for space, regularizer, schedule, seed in itertools.product(
                args.graph_spaces, args.regularizers, args.schedules, args.seeds
            ):
                n_epochs, lr, *batch = schedule.split(":")
                schedule_arguments = {"training": "full"}
                if batch:  # minibatches: whole epochs of at least n_epochs steps
                    n_parts, parts_per_batch = partition_plan(adata.n_obs, int(batch[0]))
                    n_epochs = epochs_for_steps(int(n_epochs), batches_per_epoch(n_parts, parts_per_batch))
                    schedule_arguments = {"training": "minibatch", "batch_size": int(batch[0])}
                # numba's first parallel call (UMAP, in the previous run) resets torch's OpenMP threads
                torch.set_num_threads(args.threads)
                start = time.perf_counter()
                result = scext.tl.cellvgae(
                    adata,
                    n_top_genes=n_genes,
                    regularizer=regularizer,
                    n_epochs=int(n_epochs),
                    lr=float(lr),
                    cluster_method=None,
                    keep_model=False,
                    random_state=seed,
                    device="cpu",
                    progress_bar=False,
                    copy=True,
                    graph_use_rep="X_feature_pca" if space == "pcs" else None,
                    **schedule_arguments,
                )
                seconds = time.perf_counter() - start
                mu = result.obsm["X_cellvgae"]
                neighbours = NearestNeighbors(n_neighbors=6).fit(mu).kneighbors(mu, return_distance=False)
                hdbscan = np.asarray(_cluster(mu, "hdbscan", None, 1.0, seed))
                umap_hdbscan = np.asarray(_cluster(mu, "umap_hdbscan", None, 1.0, seed))
                kmeans = np.asarray(_cluster(mu, None, None, 1.0, seed, n_clusters=n_types))
                row = {
                    "dataset": name,
                    "genes": len(genes),
                    "regularizer": regularizer,
                    "schedule": schedule,
                    "graph": space,
                    "seed": seed,
                    "reconstruction": float(result.uns["cellvgae"]["history"]["reconstruction"][-10:].mean()),
                    "graph_purity": trained_graph[space],
                    "mu_purity": purity(neighbours[:, 1:], labels),
                    "ari_hdbscan": adjusted_rand_score(labels, hdbscan),
                    "clusters_hdbscan": len(np.unique(hdbscan)),
                    "ari_umap_hdbscan": adjusted_rand_score(labels, umap_hdbscan),
                    "clusters_umap_hdbscan": len(np.unique(umap_hdbscan)),
                    "ari_kmeans_k": adjusted_rand_score(labels, kmeans),
                    "seconds": seconds,
                }
                for resolution in (1.0, 0.3):
                    leiden = leiden_on(mu, resolution, seed)
                    row[f"ari_leiden_{resolution}"] = adjusted_rand_score(labels, leiden)
                    row[f"clusters_leiden_{resolution}"] = len(np.unique(leiden))
                rows.append(row)
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    grouped = table.drop(columns="seed").groupby(
        ["dataset", "genes", "regularizer", "schedule", "graph"], sort=False
    )
    spread = grouped.std(ddof=1).fillna(0).round(3).astype(str)
    summary = grouped.mean().round(3).astype(str) + " ± " + spread
    for column in ("graph_purity", "seconds"):  # one value per data set, or no spread worth printing
        summary[column] = grouped[column].mean().round(3 if column == "graph_purity" else 1).astype(str)
    command = "python benchmarks/cellvgae_choices.py " + " ".join(
        [
            "--datasets",
            *args.datasets,
            "--seeds",
            *map(str, args.seeds),
            "--genes",
            *map(str, args.genes),
            "--regularizers",
            *args.regularizers,
            "--schedules",
            *args.schedules,
            "--graph-spaces",
            *args.graph_spaces,
            "--threads",
            str(args.threads),
            "--out",
            str(out),
        ]
    )
    markdown = (
        f"`{command}` ({platform.machine()}, {args.threads} torch thread(s); mean ± sd over seeds)\n\n"
        + summary.reset_index().to_markdown(index=False)
        + "\n"
    )
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
