"""CW's per-cell search over lambda: does the result depend on where the search starts?

    python benchmarks/cw_tradeoff.py [--dataset baron_mouse] [--starts 1 10 100] [--n-iter 2]
        [--out cw_tradeoff.csv]

One KRATOS model (random_state 0) on the log-normalised counts (all genes), then
`rank_genes_perturbation(method="cw", score="magnitude", cw_tradeoff=start)` (|delta|, where the L1 noise of
a poor lambda shows most) for each starting value with the default search
(`cw_n_rounds=4`), and once without a search (`cw_n_rounds=1`: lambda fixed at the default start, the
same budget of steps). `cw_tradeoff` is in units of 1 / (the largest gradient of each cell's margin).
"reached" is `uns[key]["cw_reached"]` (the fraction of a group's explained cells whose perturbation
crossed the margin), summarised over groups; seconds are also given as a ratio to
`sc.tl.rank_genes_groups(method="wilcoxon")` timed in the same process; AUROC is `metrics.compare_panels`
(RBF-SVM, groups of at least 40 cells) at the top 0.1 % and 1 % of genes, averaged over groups.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
import scanpy as sc

import scext


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="baron_mouse")
    parser.add_argument("--starts", nargs="*", type=float, default=[1, 10, 100])
    parser.add_argument("--n-iter", type=int, default=2, help="random-search draws of the SVM evaluation")
    parser.add_argument("--out", default="cw_tradeoff.csv")
    args = parser.parse_args()

    scext.settings.progress_bar = False
    adata = scext.datasets.load(args.dataset)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    scext.tl.kratos(adata, groupby="cell_type", random_state=0)
    print(f"{args.dataset}: KRATOS test accuracy {adata.uns['kratos']['test_accuracy']:.3f}", flush=True)
    start = time.perf_counter()
    sc.tl.rank_genes_groups(adata, "cell_type", method="wilcoxon", key_added="wilcoxon")
    wilcoxon = time.perf_counter() - start

    runs = [(f"search from {s:g}", {"cw_tradeoff": s}) for s in args.starts]
    runs.append(("fixed 10 (no search)", {"cw_tradeoff": 10.0, "cw_n_rounds": 1}))
    rows, keys = [], {}
    for label, kwargs in runs:
        key = f"cw_{len(keys)}"
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scext.tl.rank_genes_perturbation(adata, method="cw", score="magnitude", key_added=key, **kwargs)
        seconds = time.perf_counter() - start
        reached = adata.uns[key]["cw_reached"]
        fractions = np.array([reached[group][0] for group in reached.dtype.names])
        rows.append(
            {
                "run": label,
                "seconds": seconds,
                "x wilcoxon": seconds / wilcoxon,
                "median reached": np.median(fractions),
                "min reached": fractions.min(),
                "warned": any("cw_tradeoff" in str(w.message) for w in caught),
            }
        )
        keys[label] = key
        print(pd.DataFrame(rows[-1:]).round(3).to_markdown(index=False), flush=True)

    panels = scext.metrics.compare_panels(adata, keys, fractions=(0.001, 0.01), n_iter=args.n_iter)
    auroc = panels.groupby(["method", "fraction"])["auroc"].mean().unstack()
    table = pd.DataFrame(rows).set_index("run")
    table["AUROC top 0.1 %"] = [auroc.loc[label, 0.001] for label in table.index]
    table["AUROC top 1 %"] = [auroc.loc[label, 0.01] for label in table.index]
    table.to_csv(args.out)
    print(f"\nwilcoxon: {wilcoxon:.1f} s\n")
    print(table.round(3).to_markdown())


if __name__ == "__main__":
    main()
