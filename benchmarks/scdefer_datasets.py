"""scDEFER with default arguments on the shared count data sets, next to Scanpy's baselines; and ablations.

    python benchmarks/scdefer_datasets.py [--datasets yan cellbench_celseq2_3cl ...] [--ablation yan]
        [--ablations fusion_weight zinb] [--n-pretrain-epochs 250] [--n-epochs 250] [--device auto]

Each data set is read with `scext.datasets.load`, genes without any count are dropped (as the paper's
preprocessing does), and `scext.tl.scdefer` runs on the counts with K = the number of annotated types (the
usual convention of the paper and of the Scanpy "true K" baselines). `yan` holds RPKM values, not counts: it
runs with ``allow_noninteger=True`` and is marked. Labels are read only to score the clusters (ARI, NMI)
after training. ``--ablation NAME`` also runs fusion_weight (the paper's alpha) 0.5 and 0.9 and the model without ZINB on that data set
(the paper's Fig. 3C and Table 3 "NZinb"); ``--ablations`` picks which of the two. Wall times include preprocessing and the kNN graph.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import scanpy as sc

import scext

DATASETS = [
    "yan",
    "cellbench_celseq2_3cl",
    "mouse_bladder_top2000",
    "10x_pbmc_top2000",
    "baron_mouse",
    "paul15",
]
# ../shared/datasets/README.md: Scanpy Leiden (res 1), Leiden tuned to the true K, K-means on 50 PCs
SCANPY_ARI = {
    "baron_mouse": (0.487, 0.485, 0.822),
    "10x_pbmc_top2000": (0.571, 0.748, 0.737),
    "mouse_bladder_top2000": (0.585, 0.556, 0.605),
    "paul15": (0.337, 0.306, 0.323),
    "yan": (0.935, 0.816, 0.650),
    "cellbench_celseq2_3cl": (0.811, 1.000, 1.000),
}
# paper 004, Table 2 (ARI, NMI); only Yan is among its data sets
PAPER = {"yan": (0.8955, 0.9057)}


def run(name: str, args, **overrides) -> dict:
    adata = scext.datasets.load(name)
    sc.pp.filter_genes(adata, min_counts=1)
    counts = str(adata.uns["scext_source"].get("integer_valued", "True")) == "True"
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    n_types = len(set(truth))
    start = time.perf_counter()
    scext.tl.scdefer(
        adata,
        n_types,
        allow_noninteger=not counts,
        n_pretrain_epochs=args.n_pretrain_epochs,
        n_epochs=args.n_epochs,
        device=args.device,
        random_state=args.random_state,
        progress_bar=False,
        **overrides,
    )
    seconds = time.perf_counter() - start
    scores = scext.metrics.clustering_scores(truth, adata.obs["scdefer"])
    leiden, leiden_k, kmeans_k = SCANPY_ARI.get(name, (float("nan"),) * 3)
    paper_ari, paper_nmi = PAPER.get(name, (float("nan"), float("nan")))
    setting = ", ".join(f"{key}={value}" for key, value in overrides.items()) or "default"
    return {
        "data set": name + ("" if counts else " (RPKM)"),
        "setting": setting,
        "cells": adata.n_obs,
        "K": n_types,
        "clusters found": adata.uns["scdefer"]["n_clusters"],
        "ARI": scores["ari"],
        "NMI": scores["nmi"],
        "paper ARI": paper_ari,
        "paper NMI": paper_nmi,
        "Scanpy Leiden ARI": leiden,
        "Leiden true K ARI": leiden_k,
        "K-means true K ARI": kmeans_k,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="*", default=DATASETS)
    parser.add_argument("--ablation", default=None, help="data set for the fusion_weight / no-ZINB ablation")
    parser.add_argument(
        "--ablations", nargs="*", choices=["fusion_weight", "zinb"], default=["fusion_weight", "zinb"]
    )
    parser.add_argument("--n-pretrain-epochs", type=int, default=250)
    parser.add_argument("--n-epochs", type=int, default=250)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--random-state", type=int, default=0)
    args = parser.parse_args()
    rows = []
    jobs = [(name, {}) for name in args.datasets]
    if args.ablation is not None:
        if args.ablation not in args.datasets:
            jobs.append((args.ablation, {}))
        if "fusion_weight" in args.ablations:
            jobs += [(args.ablation, {"fusion_weight": 0.5}), (args.ablation, {"fusion_weight": 0.9})]
        if "zinb" in args.ablations:
            jobs.append((args.ablation, {"zinb": False}))
    for name, overrides in jobs:
        rows.append(run(name, args, **overrides))
        print(pd.DataFrame(rows[-1:]).round(3).to_markdown(index=False), flush=True)
    print(
        f"\nscDEFER, {args.n_pretrain_epochs} pretraining + {args.n_epochs} joint epochs, device "
        f"{args.device}, random_state {args.random_state}\n"
    )
    print(pd.DataFrame(rows).round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()
