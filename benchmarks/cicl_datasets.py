"""CICL on every shared data set (except pbmc_small): ARI / NMI next to a Scanpy baseline, the lambda ablation,
and wall time per epoch.

    python benchmarks/cicl_datasets.py                      # all data sets, ablation on yan and baron_mouse
    python benchmarks/cicl_datasets.py --cell-epochs 25000  # the README table: fewer epochs on larger sets
    python benchmarks/cicl_datasets.py --datasets yan --ablation yan

K is the number of annotated cell types (as in the paper and in the baseline's "K-means, true K"). The labels
are read only to score the finished clustering: training, K-means and the choice of the reported model (the
last epoch) never see them. The Scanpy baseline is computed here the way ../shared/datasets/README.md
describes it (normalize_total + log1p for counts, 2,000 HVG, scale, PCA 50, K-means with the true K on the
PCs); the README's Leiden (resolution 1) ARI is quoted beside it.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import scanpy as sc
import torch

import scext
from scext.metrics import clustering_scores
from scext.models import Cicl, kmeans
from scext.tl._cicl import default_n_epochs

# ../shared/datasets/README.md, "Leiden res 1" column (ARI)
README_LEIDEN_ARI = {
    "kratos_sim_140": 0.970,
    "kratos_sim_220": 0.990,
    "baron_mouse": 0.487,
    "pbmc3k_hvg250": 0.811,
    "10x_pbmc_top2000": 0.571,
    "mouse_bladder_top2000": 0.585,
    "paul15": 0.337,
    "yan": 0.935,
    "cellbench_celseq2_3cl": 0.811,
}
# the paper's Table 3 (yan is the only shared data set the paper reports)
PAPER_ARI = {"yan": 0.7989}
PROCESSED = {"pbmc3k_hvg250"}  # already log-normalised HVGs: used as given, as the baseline does


def baseline(adata, n_clusters: int, processed: bool, random_state: int = 0) -> dict[str, float]:
    """Scanpy's first-try pipeline, K-means with the true K on 50 PCs (torch K-means, 10 seedings)."""
    work = adata.copy()
    if not processed:  # counts, RPKM: normalise and log first
        sc.pp.normalize_total(work)
        sc.pp.log1p(work)
    if work.n_vars > 2000:
        sc.pp.highly_variable_genes(work, n_top_genes=2000)
        work = work[:, work.var["highly_variable"]].copy()
    sc.pp.scale(work)
    sc.pp.pca(work, n_comps=min(50, work.n_obs - 1, work.n_vars - 1), random_state=random_state)
    generator = torch.Generator().manual_seed(random_state)
    _, labels = kmeans(
        torch.from_numpy(work.obsm["X_pca"]).float(), n_clusters, n_init=10, generator=generator
    )
    return clustering_scores(adata.obs["cell_type"], labels.numpy())


def run_cicl(adata, n_clusters: int, name: str, **kwargs) -> tuple[dict[str, float], float, dict]:
    """Scores, seconds per training epoch, and params of one CICL run."""
    timings = []
    fit = Cicl.fit

    def timed_fit(self, *args, **kw):
        start = time.perf_counter()
        history = fit(self, *args, **kw)
        timings.append(time.perf_counter() - start)
        return history

    Cicl.fit = timed_fit
    try:
        result = scext.tl.cicl(
            adata, n_clusters, preprocess=name not in PROCESSED, copy=True, progress_bar=False, **kwargs
        )
    finally:
        Cicl.fit = fit
    params = result.uns["cicl"]["params"]
    scores = clustering_scores(adata.obs["cell_type"], result.obs["cicl"].to_numpy())
    return scores, timings[0] / max(params["n_epochs"], 1), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [n for n in scext.datasets.SHARED_NAMES if n != "pbmc_small"]
    parser.add_argument("--datasets", nargs="+", default=names)
    parser.add_argument("--ablation", nargs="*", default=["yan", "baron_mouse"])
    parser.add_argument(
        "--cell-epochs",
        type=int,
        default=None,
        help="budget: at most max(10, this / cells) epochs per data set, below scext.tl.cicl's default",
    )
    parser.add_argument("--random-state", type=int, default=0)
    args = parser.parse_args()
    kwargs = {"random_state": args.random_state, "device": "cpu"}
    sc.settings.verbosity = 0
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), no GPU; scext {scext.__version__}\n"
    )
    rows = [
        "| data set | cells | K | genes used | CICL ARI | CICL NMI | K-means on PCs ARI | K-means on PCs NMI "
        "| Leiden res 1 ARI (README) | paper ARI | s / epoch | epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ablation_rows = [
        "| data set | lambda | ARI | NMI | s / epoch |",
        "|---|---|---|---|---|",
    ]
    for name in args.datasets:
        adata = scext.datasets.load(name)
        n_clusters = adata.obs["cell_type"].nunique()
        n_epochs = default_n_epochs(adata.n_obs, 256)
        if args.cell_epochs is not None:
            n_epochs = min(n_epochs, max(10, args.cell_epochs // adata.n_obs))
        kwargs["n_epochs"] = n_epochs
        base = baseline(adata, n_clusters, name in PROCESSED, args.random_state)
        scores, per_epoch, params = run_cicl(adata, n_clusters, name, **kwargs)
        paper = f"{PAPER_ARI[name]:.3f}" if name in PAPER_ARI else "-"
        rows.append(
            f"| {name} | {adata.n_obs} | {n_clusters} | {params['n_genes']} | {scores['ari']:.3f} | "
            f"{scores['nmi']:.3f} | {base['ari']:.3f} | {base['nmi']:.3f} | {README_LEIDEN_ARI[name]:.3f} | "
            f"{paper} | {per_epoch:.2f} | {params['n_epochs']} |"
        )
        print(rows[-1], flush=True)
        if name in args.ablation:
            ablation_rows.append(
                f"| {name} | 0.1 | {scores['ari']:.3f} | {scores['nmi']:.3f} | {per_epoch:.2f} |"
            )
            zero, zero_epoch, _ = run_cicl(adata, n_clusters, name, cluster_weight=0.0, **kwargs)
            ablation_rows.append(f"| {name} | 0 | {zero['ari']:.3f} | {zero['nmi']:.3f} | {zero_epoch:.2f} |")
            print(ablation_rows[-1], flush=True)
    print("\n" + "\n".join(rows))
    print("\nAblation (paper Fig. 5-6: lambda = 0 drops the cluster-aware loss)\n")
    print("\n".join(ablation_rows))


if __name__ == "__main__":
    main()
