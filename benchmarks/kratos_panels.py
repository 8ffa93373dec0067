"""KRATOS on real data: classification, gene panels against Scanpy's, and how they read as markers.

    python benchmarks/kratos_panels.py --dataset baron_mouse [--n-iter 10] [--device auto]
    python benchmarks/kratos_panels.py --dataset pbmc3k_hvg250
    python benchmarks/kratos_panels.py --dataset pbmc68k_reduced --no-auroc

Counts are normalised (normalize_total 1e4, log1p) first; log-normalised sets are used as they are;
pbmc68k_reduced (shipped with Scanpy, labels `bulk_labels`) is used as the quickstart uses it (scaled `X`,
log-normalised `.raw`). Every tool runs at its defaults. Prints:

- classification scores on the test cells;
- wall times, and each as a ratio to `sc.tl.rank_genes_groups(method="wilcoxon")` timed in the same
  process (the median of `--repeats` runs);
- "markers": for how many groups all top-3 genes are expressed higher in the group than in the rest (mean
  of `.raw` if present, else `X`: the sign of Scanpy's logfoldchanges), per panel, with the groups that fail;
- the mean one-vs-rest RBF-SVM AUROC over the classes with >= 40 cells at the top `--fractions` of genes,
  and the mean PCC among each class's top genes (redundancy).

Each KRATOS explainer runs once with `score="magnitude"` ("(magnitude)" rows); its default ranking,
`score="support"`, is the same run's signed scores re-sorted (exactly what `score="support"` returns), so
both come from one set of attributions and one timing. CSV files
`<out>_times.csv`, `<out>_markers.csv`, `<out>_auroc.csv` and `<out>_pcc.csv` are written.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
import scanpy as sc

import scext

EXPLAINERS = ("cw", "smoothgrad", "integrated_gradients")


def load(dataset: str):
    if dataset == "pbmc68k_reduced":
        return sc.datasets.pbmc68k_reduced(), "bulk_labels"
    adata = scext.datasets.load(dataset)
    if str(adata.uns["scext_source"].get("integer_valued")) == "True":
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
    return adata, "cell_type"


def support_ranking(adata, key: str, key_added: str) -> None:
    """Re-sort a magnitude ranking by its oriented signed scores: what ``score="support"`` ranks by."""
    result = adata.uns[key]
    sign = -1.0 if result["params"]["method"] == "kratos_cw" else 1.0
    groups = list(result["names"].dtype.names)
    fields = ("names", "scores", "signed_scores", "logfoldchanges", "pvals", "pvals_adj")
    columns = {field: [] for field in fields}
    for group in groups:
        support = sign * np.asarray(result["signed_scores"][group], dtype=np.float64)
        order = np.argsort(-support, kind="stable")
        for field in fields:
            values = np.asarray(result[field][group])
            columns[field].append(support[order].astype(np.float32) if field == "scores" else values[order])
    adata.uns[key_added] = {
        **{field: np.rec.fromarrays(columns[field], names=groups) for field in fields},
        "params": {**result["params"], "score": "support"},
    }


def markers(adata, groupby: str, key: str, top: int = 3) -> dict:
    """Groups whose top genes are all expressed higher in the group than in the rest.

    Mean expression in ``.raw`` when there is one, else ``X`` (the matrix Scanpy's rank_genes_groups reads
    at its defaults); for log-normalised data this is the sign of Scanpy's logfoldchanges.
    """
    source = adata.raw.to_adata() if adata.raw is not None else adata
    labels = adata.obs[groupby].astype(str).to_numpy()
    names = adata.uns[key]["names"]
    failing = []
    for group in names.dtype.names:
        genes = [str(g) for g in names[group][:top]]
        block = source[:, genes].X
        block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
        inside = labels == group
        if not (block[inside].mean(0) > block[~inside].mean(0)).all():
            failing.append(group)
    n_groups = len(names.dtype.names)
    return {"marker panels": f"{n_groups - len(failing)} / {n_groups}", "failing groups": ", ".join(failing)}


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
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of Scanpy's wilcoxon")
    parser.add_argument("--no-auroc", action="store_true", help="skip the (slow) SVM evaluation")
    parser.add_argument("--out", default=None, help="CSV prefix; defaults to kratos_panels_<dataset>")
    args = parser.parse_args()
    out = args.out or f"kratos_panels_{args.dataset}"

    scext.settings.progress_bar = False
    adata, groupby = load(args.dataset)
    times = {}
    start = time.perf_counter()
    scext.tl.kratos(adata, groupby=groupby, device=args.device, random_state=args.seed)
    times["kratos training"] = time.perf_counter() - start
    keys = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wilcoxon = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sc.tl.rank_genes_groups(adata, groupby, method="wilcoxon", key_added="wilcoxon")
            wilcoxon.append(time.perf_counter() - start)
        times["sc.tl.rank_genes_groups wilcoxon"] = float(np.median(wilcoxon))
        for method in EXPLAINERS:
            start = time.perf_counter()
            scext.tl.rank_genes_perturbation(
                adata, method=method, score="magnitude", device=args.device, random_state=args.seed
            )
            times[f"rank_genes_perturbation {method}"] = time.perf_counter() - start
            support_ranking(adata, f"kratos_{method}", f"kratos_{method}_support")
            keys[f"KRATOS {method}"] = f"kratos_{method}_support"
            keys[f"KRATOS {method} (magnitude)"] = f"kratos_{method}"
        start = time.perf_counter()
        sc.tl.rank_genes_groups(adata, groupby, method="logreg", key_added="logreg")
        times["sc.tl.rank_genes_groups logreg"] = time.perf_counter() - start
    keys["Scanpy wilcoxon"] = "wilcoxon"
    keys["Scanpy logreg"] = "logreg"

    result = adata.uns["kratos"]
    print(
        f"\n## {args.dataset}: {adata.n_obs} cells, {adata.n_vars} genes, "
        f"{adata.obs[groupby].nunique()} types; device {result['params']['device']}; seed {args.seed}\n"
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
    reached = adata.uns["kratos_cw"]["cw_reached"]
    fractions_reached = [float(reached[g][0]) for g in reached.dtype.names]
    print(
        f"\nCW crossed the margin for a fraction {min(fractions_reached):.3f} (lowest group) to "
        f"{max(fractions_reached):.3f} of each group's correctly classified cells."
    )

    timing = pd.DataFrame({"seconds": times})
    timing["x wilcoxon"] = timing["seconds"] / times["sc.tl.rank_genes_groups wilcoxon"]
    timing.to_csv(f"{out}_times.csv")
    print(f"\nWall time (wilcoxon: median of {args.repeats} runs, {np.round(wilcoxon, 2).tolist()} s):\n")
    print(timing.round(2).to_markdown())

    table = pd.DataFrame({label: markers(adata, groupby, key) for label, key in keys.items()}).T
    table.to_csv(f"{out}_markers.csv")
    print("\nPanels whose top 3 genes are all expressed higher in the group than in the rest:\n")
    print(table.to_markdown())

    if args.no_auroc:
        return
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
    auroc.to_csv(f"{out}_auroc.csv", index=False)
    seconds = time.perf_counter() - start
    mean = auroc.groupby(["method", "fraction"])["auroc"].mean().unstack().loc[list(keys)]
    mean.columns = [
        f"top {100 * f:g}% ({int(auroc.loc[auroc.fraction == f, 'n_genes'].iloc[0])} genes)"
        for f in mean.columns
    ]
    print(
        f"\nMean one-vs-rest SVM AUROC over the {auroc['group'].nunique()} classes with >= 40 cells "
        f"(n_iter={args.n_iter}, {seconds:.0f} s):\n"
    )
    print(mean.round(4).to_markdown())

    redundancy = scext.metrics.compare_panels(adata, keys, metric="redundancy", fractions=(0.01, 0.05, 0.1))
    redundancy.to_csv(f"{out}_pcc.csv", index=False)
    pcc = redundancy.groupby(["method", "fraction"])["pcc"].mean().unstack().loc[list(keys)]
    pcc.columns = [f"top {100 * f:g}%" for f in pcc.columns]
    print("\nMean PCC among each class's top genes (redundancy, lower is less redundant):\n")
    print(pcc.round(3).to_markdown())


if __name__ == "__main__":
    main()
