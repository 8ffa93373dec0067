"""Quickstart: KRATOS on Scanpy's pbmc68k_reduced, gene panels by three explainers, and figures.

    python -m scext.quickstart --outdir quickstart_output

Trains the classifier on ``bulk_labels``, ranks genes with cw, smoothgrad and integrated gradients,
compares the panels' discriminative power with Scanpy's wilcoxon panel, and writes figures, the panels
(CSV) and the annotated AnnData to `outdir`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import scanpy as sc  # noqa: E402

import scext  # noqa: E402

METHODS = ("cw", "smoothgrad", "integrated_gradients")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--outdir", default="quickstart_output", help="folder for figures and tables")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-epochs", type=int, default=100, help="KRATOS training epochs (paper: 100)")
    parser.add_argument("--svm-iter", type=int, default=5, help="random-search size of the panel AUROC")
    args = parser.parse_args(argv)
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    sc.settings.verbosity = 2
    sc.settings.figdir = outdir

    adata = sc.datasets.pbmc68k_reduced()
    scext.tl.kratos(adata, groupby="bulk_labels", n_epochs=args.n_epochs, device=args.device)
    result = adata.uns["kratos"]
    print(
        f"test accuracy {result['test_accuracy']:.3f}, macro F1 {result['test_macro_f1']:.3f}, "
        f"ARI {result['test_ari']:.3f}, AMI {result['test_ami']:.3f}, silhouette {result['silhouette']:.3f}"
    )
    for method in METHODS:
        scext.tl.rank_genes_perturbation(adata, method=method, device=args.device)
        sc.get.rank_genes_groups_df(adata, group=None, key=f"kratos_{method}").to_csv(
            outdir / f"panels_{method}.csv", index=False
        )
    sc.tl.rank_genes_groups(adata, "bulk_labels", method="wilcoxon", key_added="wilcoxon")

    sc.pp.neighbors(adata, use_rep="X_kratos")
    sc.tl.umap(adata)
    sc.pl.umap(adata, color=["bulk_labels", "kratos_pred"], save="_kratos.png", show=False)
    sc.pl.rank_genes_groups_dotplot(adata, key="kratos_cw", n_genes=3, save="kratos_cw.png", show=False)
    scext.pl.training_history(adata, save="_quickstart.png", show=False)

    keys = {
        "KRATOS cw": "kratos_cw",
        "KRATOS smoothgrad": "kratos_smoothgrad",
        "KRATOS IG": "kratos_integrated_gradients",
        "Scanpy wilcoxon": "wilcoxon",
    }
    auroc = scext.metrics.compare_panels(
        adata, keys, metric="auroc", fractions=(0.005, 0.01, 0.05), n_iter=args.svm_iter
    )
    auroc.to_csv(outdir / "panel_auroc.csv", index=False)
    scext.pl.discriminative_power(auroc, save="_quickstart.png", show=False)
    print(auroc.groupby(["method", "fraction"])["auroc"].mean().unstack().round(3).to_string())

    adata.write_h5ad(outdir / "pbmc68k_kratos.h5ad")
    plt.close("all")
    print(f"figures, panels and the annotated AnnData are in {outdir.resolve()}")
    return outdir


if __name__ == "__main__":
    main()
