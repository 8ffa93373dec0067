"""Is scDEFER's denoised layer worth its name? Per-gene correlation with counts held out before training.

    python benchmarks/scdefer_denoising.py --datasets 10x_pbmc_top2000 mouse_bladder_top2000 --seeds 0 \\
        --out benchmarks/tables/scdefer_denoising.csv

For each data set and seed, 10 % of the non-zero entries of the count matrix (genes with counts) are drawn
at random and set to 0; `scext.tl.scdefer` then trains on the masked counts at its defaults with K = the
number of annotated types (the labels are read for nothing else), and writes ``layers["scdefer_denoised"]``,
the ZINB mean ``(1 - pi) mu`` on each cell's count scale. Every figure is over the modelled genes, on
counts divided by each cell's size factor (its masked total over the median), so that depth does not count
as signal:

- ``all cells``: for each gene, Pearson r over all cells between a prediction and the original (unmasked)
  counts. Predictions: the denoised layer, and the masked counts themselves ("normalised counts"), which
  are exact except at the held-out entries, where they are 0.
- ``held-out entries``: for each gene with at least 20 held-out entries, r over those entries between a
  prediction and the held-out count. Predictions: the denoised layer; the gene's mean ("gene mean": the
  normalised counts carry nothing at an entry they miss but the gene's level); and the mean of the cell's
  15 nearest neighbours (Scanpy's PCA graph of the masked data) ("kNN mean"), a smoothing any Scanpy user
  can run.

Writes the median over genes of each (``--out``, one row per data set and seed) and a Markdown copy (.md).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

import scext

MIN_HELD_OUT = 20


def per_gene_r(prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson r of each column; NaN where either column is constant."""
    prediction = prediction - prediction.mean(axis=0)
    truth = truth - truth.mean(axis=0)
    denominator = np.sqrt((prediction**2).sum(axis=0) * (truth**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (prediction * truth).sum(axis=0) / denominator, np.nan)


def held_out_r(prediction: np.ndarray, truth: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Per gene: r over that gene's held-out entries (genes with at least `MIN_HELD_OUT` of them)."""
    values = []
    for gene in np.unique(cols):
        at = rows[cols == gene]
        if len(at) >= MIN_HELD_OUT:
            values.append(per_gene_r(prediction[at, gene][:, None], truth[at, gene][:, None])[0])
    return np.asarray(values)


def run(name: str, seed: int, fraction: float) -> dict:
    adata = scext.datasets.load(name)
    sc.pp.filter_genes(adata, min_counts=1)
    original = sp.csr_matrix(adata.X, dtype=np.float32)
    # hold out a fraction of the non-zero entries: they become zeros of the training counts
    rng = np.random.default_rng(seed)
    masked = original.copy()
    held = rng.random(masked.nnz) < fraction
    masked.data[held] = 0
    coo = original.tocoo()
    held_rows, held_cols = coo.row[held], coo.col[held]  # CSR data and its COO share the order
    masked.eliminate_zeros()
    adata.X = masked
    n_types = adata.obs["cell_type"].nunique()
    start = time.perf_counter()
    scext.tl.scdefer(adata, n_types, random_state=seed, progress_bar=False, keep_model=False)
    seconds = time.perf_counter() - start

    genes = np.flatnonzero(adata.var["scdefer_modelled"].to_numpy())
    totals = np.asarray(masked.sum(axis=1)).ravel()
    size_factors = (totals / np.median(totals))[:, None]
    truth = original[:, genes].toarray() / size_factors
    observed = masked[:, genes].toarray() / size_factors
    denoised = adata.layers["scdefer_denoised"][:, genes] / size_factors
    # kNN mean of the normalised masked counts, on Scanpy's usual graph of the masked data
    work = adata.copy()
    sc.pp.normalize_total(work)
    sc.pp.log1p(work)
    sc.pp.pca(work, n_comps=50, mask_var=work.var["scdefer_modelled"].to_numpy(), random_state=seed)
    sc.pp.neighbors(work, n_neighbors=15, random_state=seed)
    connectivities = (work.obsp["connectivities"] > 0).astype(np.float32)
    knn_mean = (connectivities @ observed) / np.asarray(connectivities.sum(axis=1))
    gene_mean = np.broadcast_to(observed.mean(axis=0), observed.shape)

    # positions of the held-out entries among the modelled genes
    column = np.full(adata.n_vars, -1)
    column[genes] = np.arange(len(genes))
    keep = column[held_cols] >= 0
    rows, cols = held_rows[keep], column[held_cols[keep]]
    held_truth = {
        "denoised": held_out_r(denoised, truth, rows, cols),
        "knn_mean": held_out_r(knn_mean, truth, rows, cols),
        "gene_mean": held_out_r(gene_mean + 1e-9 * rng.random(gene_mean.shape), truth, rows, cols),
    }
    all_denoised = per_gene_r(denoised, truth)
    all_observed = per_gene_r(observed, truth)
    return {
        "dataset": name,
        "seed": seed,
        "genes": len(genes),
        "held_out_entries": int(len(rows)),
        "all cells: denoised": np.nanmedian(all_denoised),
        "all cells: normalised counts": np.nanmedian(all_observed),
        "all cells: genes where denoised wins": float(np.nanmean(all_denoised > all_observed)),
        "held-out genes": len(held_truth["denoised"]),
        "held-out: denoised": np.nanmedian(held_truth["denoised"]),
        "held-out: kNN mean": np.nanmedian(held_truth["knn_mean"]),
        "held-out: gene mean": np.nanmedian(held_truth["gene_mean"]),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["10x_pbmc_top2000", "mouse_bladder_top2000"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/tables/scdefer_denoising.csv"))
    args = parser.parse_args()
    rows = []
    for name in args.datasets:
        for seed in args.seeds:
            rows.append(run(name, seed, args.fraction))
            print(pd.DataFrame(rows[-1:]).round(3).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    command = "python benchmarks/scdefer_denoising.py " + " ".join(
        ["--datasets", *args.datasets, "--seeds", *map(str, args.seeds)]
    )
    markdown = (
        f"Median per-gene Pearson r (size-factor-normalised counts), 10 % of non-zero entries held out. "
        f"`{command}` on {platform.machine()}, {torch_threads()} torch threads.\n\n"
        + table.round(3).to_markdown(index=False)
        + "\n"
    )
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
