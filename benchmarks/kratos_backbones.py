"""KRATOS backbones (paper 001's two tables): MLP vs gene_gcn, random vs autoencoder initialisation.

    python benchmarks/kratos_backbones.py --dataset pbmc3k_hvg250
    python benchmarks/kratos_backbones.py --dataset baron_mouse --gcn-genes 500

Counts are normalised (normalize_total 1e4, log1p). gene_gcn costs genes^2 per cell, so on data sets with
more genes than --gcn-genes it runs on that many highly variable genes (Scanpy's seurat flavour, chosen
without labels); the MLP is reported on all genes and on the same gene subset.

Prior graph: no interaction database is reachable offline, so the "prior" is a gene co-expression graph
built from the TRAINING cells only (the split that kratos draws with the same random_state): for each gene
its 10 genes of highest |Pearson r|, scores |r|, symmetrised. It is data-derived, not biological prior
knowledge, and never sees a test cell.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

import scext


def coexpression_prior(adata, cells: np.ndarray, n_neighbors: int = 10) -> sp.csr_matrix:
    values = adata.X[cells]
    values = values.toarray() if sp.issparse(values) else np.asarray(values)
    correlation = np.abs(np.nan_to_num(np.corrcoef(values, rowvar=False)))
    np.fill_diagonal(correlation, 0)
    strongest = np.argsort(-correlation, axis=1)[:, :n_neighbors]
    rows = np.repeat(np.arange(adata.n_vars), n_neighbors)
    graph = sp.csr_matrix(
        (correlation[rows, strongest.ravel()], (rows, strongest.ravel())), shape=(adata.n_vars,) * 2
    )
    return graph.maximum(graph.T)


def run(adata, label: str, genes: str, seed: int, device: str, **kwargs) -> dict:
    start = time.perf_counter()
    scext.tl.kratos(
        adata, groupby="cell_type", random_state=seed, device=device, progress_bar=False, **kwargs
    )
    result = adata.uns["kratos"]
    return {
        "model": label,
        "genes": genes,
        "seed": seed,
        "test accuracy": result["test_accuracy"],
        "macro F1": result["test_macro_f1"],
        "epochs": len(result["history"]["loss"]),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="pbmc3k_hvg250")
    parser.add_argument("--gcn-genes", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    full = scext.datasets.load(args.dataset)
    if str(full.uns["scext_source"].get("integer_valued")) == "True":
        sc.pp.normalize_total(full, target_sum=1e4)
        sc.pp.log1p(full)
    if full.n_vars > args.gcn_genes:
        sc.pp.highly_variable_genes(full, n_top_genes=args.gcn_genes)
        subset = full[:, full.var["highly_variable"]].copy()
    else:
        subset = full
    rows = []
    for seed in args.seeds:
        rows.append(run(full, "MLP, random init", f"all {full.n_vars}", seed, args.device))
        train_cells = np.flatnonzero(full.obs["kratos_split"] == "train")
        rows.append(
            run(
                full,
                "MLP, autoencoder init",
                f"all {full.n_vars}",
                seed,
                args.device,
                weight_init="autoencoder",
            )
        )
        tag = f"{subset.n_vars} HVG" if subset is not full else f"all {full.n_vars}"
        if subset is not full:
            rows.append(run(subset, "MLP, random init", tag, seed, args.device))
        subset.varp["coexpression"] = coexpression_prior(subset, train_cells)
        gcn = {"backbone": "gene_gcn"}
        rows.append(run(subset, "gene_gcn, no prior", tag, seed, args.device, **gcn))
        rows.append(
            run(
                subset, "gene_gcn + prior (diag 0)", tag, seed, args.device, prior_graph="coexpression", **gcn
            )
        )
        rows.append(
            run(
                subset,
                "gene_gcn + prior (diag 1)",
                tag,
                seed,
                args.device,
                prior_graph="coexpression",
                prior_diagonal="one",
                **gcn,
            )
        )
        rows.append(
            run(
                subset,
                "gene_gcn + prior (diag 0), autoencoder init",
                tag,
                seed,
                args.device,
                prior_graph="coexpression",
                weight_init="autoencoder",
                **gcn,
            )
        )
        # the split is drawn from random_state alone, so every row above trained and tested on the same cells
        assert (full.obs["kratos_split"].to_numpy() == subset.obs["kratos_split"].to_numpy()).all()
    table = pd.DataFrame(rows)
    summary = table.groupby(["model", "genes"], sort=False)[
        ["test accuracy", "macro F1", "epochs", "seconds"]
    ].mean()
    print(
        f"\n## {args.dataset}: {full.n_obs} cells, device {full.uns['kratos']['params']['device']}, "
        f"seeds {args.seeds}\n"
    )
    print(summary.round(3).to_markdown())


if __name__ == "__main__":
    main()
