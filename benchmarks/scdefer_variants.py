"""scDEFER variants: scext's open choices (widths, graph space, pretraining length) and the paper's ablations.

    python benchmarks/scdefer_variants.py --datasets mouse_bladder_top2000 baron_mouse --seeds 0 1 2 \\
        --variants default without_zinb fusion_weight_0.5 fusion_weight_0.9 without_graph_encoder \\
        without_dense_encoder --out benchmarks/tables/scdefer_ablations.csv
    python benchmarks/scdefer_variants.py --datasets mouse_bladder_top2000 baron_mouse --seeds 0 1 \\
        --variants default paper_widths genes_graph --out benchmarks/tables/scdefer_choices.csv
    python benchmarks/scdefer_variants.py --datasets 10x_pbmc_top2000 mouse_bladder_top2000 baron_mouse \\
        paul15 --seeds 0 1 2 --variants full_graph default batch_512 batch_256 \\
        --out benchmarks/tables/scdefer_schedule.csv
    python benchmarks/scdefer_variants.py --datasets 10x_pbmc_top2000 mouse_bladder_top2000 baron_mouse \\
        paul15 --seeds 0 1 2 --variants default pretrain_100_steps --out benchmarks/tables/scdefer_pretraining.csv
    python benchmarks/scdefer_variants.py --datasets 10x_pbmc_top2000 mouse_bladder_top2000 --seeds 0 1 2 \\
        --variants default without_zinb fusion_weight_0.5 fusion_weight_0.9 without_graph_encoder \\
        --out benchmarks/tables/scdefer_ablations_minibatch.csv

The ablations are the paper's Table 3 (without ZINB, without the transcriptomics-based graph encoder,
without the fusion cell topology encoder) and Fig. 3C (alpha, here `fusion_weight`, 0.1 / 0.5 / 0.9). Each
variant is `scext.tl.scdefer` at its defaults with K = the number of annotated types, changed only as
named (``VARIANTS``). Besides the final clusters (argmax of Q after joint training), every run reports how
the pretrained Z clusters: scikit-learn's K-means (10 seedings) on Z itself and on its directions (each row
scaled to unit length, what scDEFER clusters since this choice was made), so the geometry question is
answered on the same pretrained network. Labels are read only to score finished runs. The variants of a
seed run one after another, and with ``full_graph`` among them each run's time is also given as a ratio to
the ``full_graph`` run of the same data set and seed. Writes ``--out`` (one row per run), and a Markdown
table of means and standard deviations over the seeds next to it (``.md``).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import pandas as pd
import scanpy as sc
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import normalize

import scext
import scext.models._scdefer as scdefer_model

VARIANTS = {
    "default": {},
    # the schedule before minibatches became the default: 30 + 100 full-graph epochs
    "full_graph": {"training": "full", "n_pretrain_epochs": 30, "n_epochs": 100},
    "batch_512": {"batch_size": 512},
    "batch_256": {"batch_size": 256},
    "paper_widths": {"hidden_sizes": (1024, 128, 24), "decoder_sizes": (128, 1024)},
    "widths_512": {"hidden_sizes": (512, 128, 24), "decoder_sizes": (128, 512)},
    "genes_graph": {"graph_n_pcs": None},
    # the default schedule with about 100 pretraining steps instead of PRETRAIN_STEPS (30), in whole epochs
    "pretrain_100_steps": {"pretrain_steps": 100},
    "without_zinb": {"zinb": False},
    "fusion_weight_0": {"fusion_weight": 0.0},
    "fusion_weight_0.5": {"fusion_weight": 0.5},
    "fusion_weight_0.9": {"fusion_weight": 0.9},
    "without_graph_encoder": {"encoders": ("dense",)},
    "without_dense_encoder": {"encoders": ("graph",)},
}


def run(name: str, variant: str, seed: int) -> dict:
    adata = scext.datasets.load(name)
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    n_types = len(set(truth))
    counts = str(adata.uns["scext_source"].get("integer_valued")) == "True"
    pretrained = {}
    directions = scdefer_model.directions

    def recording_directions(z, *args):  # first called on the pretrained Z, to start the centres
        pretrained.setdefault("z", z.detach().cpu().numpy())
        return directions(z, *args)

    kwargs = dict(VARIANTS[variant])
    pretrain_steps = scdefer_model.PRETRAIN_STEPS
    scdefer_model.directions = recording_directions
    scdefer_model.PRETRAIN_STEPS = kwargs.pop("pretrain_steps", pretrain_steps)
    try:
        start = time.perf_counter()
        scext.tl.scdefer(
            adata,
            n_types,
            allow_noninteger=not counts,
            random_state=seed,
            progress_bar=False,
            keep_model=False,
            denoised=False,
            **kwargs,
        )
        seconds = time.perf_counter() - start
    finally:
        scdefer_model.directions = directions
        scdefer_model.PRETRAIN_STEPS = pretrain_steps
    history = adata.uns["scdefer"]["history"]
    z = pretrained["z"]

    def score(x):
        return adjusted_rand_score(truth, KMeans(n_types, n_init=10, random_state=seed).fit_predict(x))

    return {
        "dataset": name,
        "variant": variant,
        "seed": seed,
        "ARI": adjusted_rand_score(truth, adata.obs["scdefer"]),
        "pretrained: K-means on Z": score(z),
        "pretrained: K-means on directions": score(normalize(z)),
        "pretraining ZINB loss (last epoch)": history.get("pretrain_zinb", [float("nan")])[-1],
        "joint epochs": len(history.get("loss", [])),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mouse_bladder_top2000", "baron_mouse", "paul15"])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scdefer_variants.csv"))
    args = parser.parse_args()
    sc.settings.verbosity = 0
    rows = []
    for name in args.datasets:
        for seed in args.seeds:
            for variant in args.variants:
                rows.append(run(name, variant, seed))
                print(
                    pd.DataFrame(rows[-1:]).round(3).to_string(index=False, header=len(rows) == 1), flush=True
                )
                runs = pd.DataFrame(rows)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                runs.to_csv(args.out, index=False)
    runs = pd.DataFrame(rows)
    if "full_graph" in args.variants:
        reference = runs[runs["variant"] == "full_graph"].set_index(["dataset", "seed"])["seconds"]
        runs["time / full_graph"] = (
            runs["seconds"].to_numpy()
            / reference.loc[list(zip(runs["dataset"], runs["seed"], strict=True))].to_numpy()
        )
        runs.to_csv(args.out, index=False)
    values = [c for c in runs.columns if c not in ("dataset", "variant", "seed")]
    grouped = runs.groupby(["dataset", "variant"], sort=False)[values]
    table = grouped.mean().round(3).astype(str) + " ± " + grouped.std(ddof=1).fillna(0).round(3).astype(str)
    table.insert(0, "seeds", grouped.size())
    command = "python benchmarks/scdefer_variants.py " + " ".join(
        ["--datasets", *args.datasets, "--seeds", *map(str, args.seeds), "--variants", *args.variants]
    )
    markdown = (
        f"`{command}` ({platform.machine()}, {torch.get_num_threads()} torch threads; mean ± sd over seeds)\n\n"
        + table.reset_index().to_markdown(index=False)
        + "\n"
    )
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
