"""KRATOS on real data: classification, and the discriminative power and redundancy of gene panels.

    python benchmarks/kratos_panels.py --dataset baron_mouse [--n-iter 10] [--device auto]
    python benchmarks/kratos_panels.py --dataset pbmc3k_hvg250

Counts are normalised (normalize_total 1e4, log1p) first; log-normalised sets are used as they are.
Prints: wall times, classification scores on the test cells, and mean one-vs-rest RBF-SVM AUROC over the
classes with >= 40 cells at the top 0.1 %, 1 % and 5 % of genes, for each KRATOS explainer and for Scanpy's
wilcoxon and logreg panels, plus the mean PCC among each class's top genes.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import scanpy as sc

import scext

EXPLAINERS = ("cw", "smoothgrad", "integrated_gradients")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="baron_mouse")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-iter", type=int, default=10, help="random-search size of the SVM evaluation")
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.001, 0.01, 0.05])
    args = parser.parse_args()

    adata = scext.datasets.load(args.dataset)
    if str(adata.uns["scext_source"].get("integer_valued")) == "True":
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    times = {}
    start = time.perf_counter()
    scext.tl.kratos(
        adata, groupby="cell_type", device=args.device, random_state=args.seed, progress_bar=False
    )
    times["kratos training"] = time.perf_counter() - start
    keys = {}
    for method in EXPLAINERS:
        start = time.perf_counter()
        scext.tl.rank_genes_perturbation(adata, method=method, device=args.device, random_state=args.seed)
        times[f"rank_genes_perturbation {method}"] = time.perf_counter() - start
        keys[f"KRATOS {method}"] = f"kratos_{method}"
    start = time.perf_counter()
    scext.tl.rank_genes_perturbation(
        adata,
        method="cw",
        score="support",
        key_added="kratos_cw_support",
        device=args.device,
        random_state=args.seed,
    )
    times["rank_genes_perturbation cw, score=support"] = time.perf_counter() - start
    keys["KRATOS cw (support)"] = "kratos_cw_support"
    for method in ("wilcoxon", "logreg"):
        start = time.perf_counter()
        sc.tl.rank_genes_groups(adata, "cell_type", method=method, key_added=method)
        times[f"sc.tl.rank_genes_groups {method}"] = time.perf_counter() - start
        keys[f"Scanpy {method}"] = method

    result = adata.uns["kratos"]
    device = result["params"]["device"]
    print(
        f"\n## {args.dataset}: {adata.n_obs} cells, {adata.n_vars} genes, "
        f"{adata.obs['cell_type'].nunique()} types; device {device}\n"
    )
    print(
        pd.DataFrame(
            [
                {
                    "test accuracy": result["test_accuracy"],
                    "macro F1": result["test_macro_f1"],
                    "ARI": result["test_ari"],
                    "AMI": result["test_ami"],
                    "silhouette": result["silhouette"],
                    "epochs": len(result["history"]["loss"]),
                }
            ]
        )
        .round(3)
        .to_markdown(index=False)
    )

    start = time.perf_counter()
    auroc = scext.metrics.compare_panels(
        adata,
        keys,
        metric="auroc",
        fractions=tuple(args.fractions),
        n_iter=args.n_iter,
        n_jobs=args.n_jobs,
        random_state=args.seed,
    )
    times[f"panel AUROC, {len(keys)} panels, n_iter={args.n_iter}"] = time.perf_counter() - start
    table = auroc.groupby(["method", "fraction"])["auroc"].mean().unstack()
    table.columns = [
        f"top {100 * f:g}% ({int(auroc.loc[auroc.fraction == f, 'n_genes'].iloc[0])} genes)"
        for f in table.columns
    ]
    n_groups = auroc["group"].nunique()
    print(f"\nMean one-vs-rest SVM AUROC over the {n_groups} classes with >= 40 cells:\n")
    print(table.round(3).to_markdown())

    redundancy = scext.metrics.compare_panels(adata, keys, metric="redundancy", fractions=(0.01, 0.05, 0.1))
    pcc = redundancy.groupby(["method", "fraction"])["pcc"].mean().unstack()
    pcc.columns = [f"top {100 * f:g}%" for f in pcc.columns]
    print("\nMean PCC among each class's top genes (redundancy, lower is less redundant):\n")
    print(pcc.round(3).to_markdown())
    print("\nWall time:\n")
    print(pd.Series(times, name="seconds").round(1).to_frame().to_markdown())


if __name__ == "__main__":
    main()
