"""CellVGAE with default arguments on the shared labelled data sets, next to Scanpy's Leiden baseline.

    python benchmarks/cellvgae_datasets.py [--datasets pbmc3k_hvg250 ...] [--n-epochs 200] [--pca-graph]
        [--min-cluster-size N] [--device auto]

Count matrices get Scanpy's standard preprocessing first (normalize_total, log1p, 2,000 highly variable
genes, which CellVGAE takes as node features); pbmc3k_hvg250 is already log-normalised. Labels are read
only to score the result. For every data set the table gives the ARI of CellVGAE's own clusters (HDBSCAN
on a UMAP of the embedding, noise cells counted as one more cluster) and without the noise cells, the ARI
of Leiden (resolution 1) on a 15-NN graph of X_cellvgae, the silhouette of the embedding by true label,
the number of clusters and noise cells, and the wall time. paul15 also gets the Spearman correlation of
diffusion pseudotime computed on X_cellvgae with diffusion pseudotime on PCA (root: the first 7MEP cell,
as in Scanpy's paul15 tutorial).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import scanpy as sc
from scipy.stats import spearmanr
from sklearn.metrics import adjusted_rand_score, silhouette_score

import scext

DATASETS = ["pbmc3k_hvg250", "10x_pbmc_top2000", "mouse_bladder_top2000", "baron_mouse", "paul15"]
# README of ../shared/datasets: Scanpy Leiden at resolution 1
SCANPY_LEIDEN = {
    "pbmc3k_hvg250": 0.811,
    "10x_pbmc_top2000": 0.571,
    "mouse_bladder_top2000": 0.585,
    "baron_mouse": 0.487,
    "paul15": 0.337,
}
PAPER = {"pbmc3k_hvg250": 0.897}


def prepared(name: str, pca: bool = False):
    adata = scext.datasets.load(name)
    if adata.uns["scext_source"]["matrix"] == "raw counts":
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        sc.pp.highly_variable_genes(adata, n_top_genes=2000)
    if pca:
        # the Scanpy baseline's PCs: highly variable genes, scaled, 50 components
        scaled = adata[:, adata.var.get("highly_variable", np.ones(adata.n_vars, bool))].copy()
        sc.pp.scale(scaled, max_value=10)
        sc.pp.pca(scaled, n_comps=50, random_state=0)
        adata.obsm["X_pca"] = scaled.obsm["X_pca"]
    return adata


def leiden_ari(adata, truth) -> float:
    sc.pp.neighbors(adata, use_rep="X_cellvgae", key_added="cellvgae_nn", random_state=0)
    sc.tl.leiden(
        adata,
        neighbors_key="cellvgae_nn",
        key_added="leiden_cellvgae",
        flavor="igraph",
        n_iterations=2,
        random_state=0,
    )
    return adjusted_rand_score(truth, adata.obs["leiden_cellvgae"])


def pseudotime_agreement(adata) -> float:
    root = int(np.flatnonzero(adata.obs["cell_type"] == "7MEP")[0])
    reference = adata.copy()
    sc.pp.pca(reference, n_comps=50, mask_var="highly_variable")
    sc.pp.neighbors(reference, random_state=0)
    sc.tl.diffmap(reference)
    reference.uns["iroot"] = root
    sc.tl.dpt(reference)
    adata.uns["iroot"] = root
    sc.tl.diffmap(adata, neighbors_key="cellvgae_nn")
    sc.tl.dpt(adata, neighbors_key="cellvgae_nn")
    both = np.isfinite(adata.obs["dpt_pseudotime"]) & np.isfinite(reference.obs["dpt_pseudotime"])
    return float(spearmanr(adata.obs["dpt_pseudotime"][both], reference.obs["dpt_pseudotime"][both])[0])


def run(name: str, n_epochs: int, device: str, min_cluster_size: int | None, pca_graph: bool) -> dict:
    adata = prepared(name, pca=pca_graph)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    start = time.perf_counter()
    scext.tl.cellvgae(
        adata,
        n_epochs=n_epochs,
        device=device,
        min_cluster_size=min_cluster_size,
        graph_use_rep="X_pca" if pca_graph else None,
        progress_bar=False,
    )
    seconds = time.perf_counter() - start
    clusters = adata.obs["cellvgae"].astype(str).to_numpy()
    assigned = clusters != "noise"
    embedding = adata.obsm["X_cellvgae"]
    row = {
        "data set": name,
        "cells": adata.n_obs,
        "ARI clusters": adjusted_rand_score(truth, clusters),
        "ARI w/o noise": adjusted_rand_score(truth[assigned], clusters[assigned]),
        "ARI Leiden on X_cellvgae": leiden_ari(adata, truth),
        "Scanpy Leiden": SCANPY_LEIDEN.get(name, np.nan),
        "paper": PAPER.get(name, np.nan),
        "silhouette": silhouette_score(embedding, truth, random_state=0, sample_size=min(5000, adata.n_obs)),
        "clusters": adata.uns["cellvgae"]["n_clusters"],
        "true types": len(set(truth)),
        "noise cells": adata.uns["cellvgae"]["n_noise"],
        "seconds": seconds,
    }
    if name == "paul15":
        row["DPT Spearman vs PCA"] = pseudotime_agreement(adata)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--n-epochs", type=int, default=200)
    parser.add_argument("--min-cluster-size", type=int, default=None)
    parser.add_argument(
        "--pca-graph", action="store_true", help="build the 5-NN graph on 50 PCs, not on genes"
    )
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rows = []
    for name in args.datasets:
        rows.append(run(name, args.n_epochs, args.device, args.min_cluster_size, args.pca_graph))
        print(pd.DataFrame(rows[-1:]).round(3).to_markdown(index=False), flush=True)
    graph = "50 PCs" if args.pca_graph else "the feature genes"
    print(f"\nCellVGAE, {args.n_epochs} epochs, 5-NN graph on {graph}, device {args.device}\n")
    print(pd.DataFrame(rows).round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()
