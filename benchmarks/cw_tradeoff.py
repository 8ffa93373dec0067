"""CW's trade-off lambda on a real data set: how many cells cross the margin, and how good the panels are.

    python benchmarks/cw_tradeoff.py [--dataset baron_mouse] [--tradeoffs 10 30 100 300] [--n-iter 2]

One KRATOS model (random_state 0) on the log-normalised counts (all genes), then
`rank_genes_perturbation(method="cw", cw_tradeoff=lambda)` for each lambda. "reached" is
`uns[key]["cw_reached"]` (the fraction of a group's explained cells whose perturbation crossed the margin),
summarised over groups; AUROC is `metrics.compare_panels` (RBF-SVM, groups of at least 40 cells) at the top
0.1 % and 1 % of genes, averaged over groups.
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
    parser.add_argument("--tradeoffs", nargs="*", type=float, default=[10, 30, 100, 300])
    parser.add_argument("--n-iter", type=int, default=2, help="random-search draws of the SVM evaluation")
    args = parser.parse_args()

    scext.settings.progress_bar = False
    adata = scext.datasets.load(args.dataset)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    scext.tl.kratos(adata, groupby="cell_type", random_state=0)
    print(f"{args.dataset}: KRATOS test accuracy {adata.uns['kratos']['test_accuracy']:.3f}", flush=True)

    rows, keys = [], {}
    for tradeoff in args.tradeoffs:
        key = f"kratos_cw_{tradeoff:g}"
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scext.tl.rank_genes_perturbation(adata, method="cw", cw_tradeoff=tradeoff, key_added=key)
        reached = adata.uns[key]["cw_reached"]
        fractions = np.array([reached[group][0] for group in reached.dtype.names])
        rows.append(
            {
                "cw_tradeoff": tradeoff,
                "seconds": time.perf_counter() - start,
                "median reached": np.median(fractions),
                "min reached": fractions.min(),
                "max reached": fractions.max(),
                "warned": any("cw_tradeoff" in str(w.message) for w in caught),
            }
        )
        keys[tradeoff] = key
        print(pd.DataFrame(rows[-1:]).round(3).to_markdown(index=False), flush=True)

    panels = scext.metrics.compare_panels(
        adata, {f"{t:g}": k for t, k in keys.items()}, fractions=(0.001, 0.01), n_iter=args.n_iter
    )
    auroc = panels.groupby(["method", "fraction"])["auroc"].mean().unstack()
    table = pd.DataFrame(rows).set_index("cw_tradeoff")
    table["AUROC top 0.1 %"] = [auroc.loc[f"{t:g}", 0.001] for t in table.index]
    table["AUROC top 1 %"] = [auroc.loc[f"{t:g}", 0.01] for t in table.index]
    print()
    print(table.round(3).to_markdown())


if __name__ == "__main__":
    main()
