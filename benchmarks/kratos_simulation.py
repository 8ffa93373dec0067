"""KRATOS Table 1 on kratos_sim_140: causal / dependent / noise genes among each cluster's top 20.

    python benchmarks/kratos_simulation.py [--dataset kratos_sim_140] [--device cpu]

Prints one table per method (scext cw, smoothgrad, integrated_gradients, and Scanpy wilcoxon).
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import scanpy as sc

import scext

METHODS = ("cw", "smoothgrad", "integrated_gradients")


def role_counts(adata, key: str, top: int = 20) -> pd.DataFrame:
    ranked = sc.get.rank_genes_groups_df(adata, group=None, key=key)
    rows = []
    for group, frame in ranked.groupby("group", observed=True):
        roles = adata.var.loc[frame["names"].head(top), "gene_role"].value_counts()
        rows.append({"cluster": group, **{r: int(roles.get(r, 0)) for r in ("causal", "dependent", "noise")}})
    return pd.DataFrame(rows).set_index("cluster")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="kratos_sim_140")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    adata = scext.datasets.load(args.dataset)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    start = time.perf_counter()
    scext.tl.kratos(
        adata, groupby="cell_type", device=args.device, random_state=args.seed, progress_bar=False
    )
    print(
        f"{args.dataset}: KRATOS trained in {time.perf_counter() - start:.1f} s, "
        f"test accuracy {adata.uns['kratos']['test_accuracy']:.3f}"
    )
    tables = {}
    for method in METHODS:
        start = time.perf_counter()
        scext.tl.rank_genes_perturbation(adata, method=method, device=args.device, random_state=args.seed)
        tables[f"kratos_{method}"] = role_counts(adata, f"kratos_{method}")
        print(f"  {method}: {time.perf_counter() - start:.1f} s")
    sc.tl.rank_genes_groups(adata, "cell_type", method="wilcoxon", key_added="wilcoxon")
    tables["scanpy_wilcoxon"] = role_counts(adata, "wilcoxon")
    for table in tables.values():
        table.loc["mean"] = table.mean()
    combined = pd.DataFrame(
        {
            method: [f"{r.causal:g} / {r.dependent:g} / {r.noise:g}" for r in table.round(1).itertuples()]
            for method, table in tables.items()
        },
        index=next(iter(tables.values())).index,
    )
    print(
        "\nTop-20 genes per cluster, causal / dependent / noise (paper Table 1, KRATOS-cw: C 8-10, N 0-1)\n"
    )
    print(combined.to_markdown())


if __name__ == "__main__":
    main()
