"""CICL's open choices at the defaults: training length, cluster-aware loss weight and temperature.

    python benchmarks/cicl_choices.py --steps 0 25 50 100 200 300 --seeds 0 1 2
    python benchmarks/cicl_choices.py --cluster-weights 0 0.1 1 --seeds 0 1 2
    python benchmarks/cicl_choices.py --temperatures 0.2 0.5 1 --seeds 0 1 2

Every run is the default call ``scext.tl.cicl(adata, n_clusters=K, random_state=seed, ...)`` with one argument
changed, scored on the labels it returns (the final K-means on H) against ``obs["cell_type"]``.

- ``--steps S ...``: ``n_epochs=ceil(S / minibatches per epoch)``; S = 0 is the untrained encoder. With one
  seed, the runs of a data set share the minibatch order and the noise, so a shorter budget trains on a
  prefix of the longer one's steps. Writes ``cicl_schedule`` tables.
- ``--cluster-weights L ...``: ``cluster_weight=L`` (lambda of eq. 17; 0 drops the cluster-aware loss, the
  paper's ablation of Fig. 5-6). Writes ``cicl_cluster_weight`` tables.
- ``--temperatures T ...``: ``temperature=T`` (tau of the instance-wise InfoNCE, eq. 13-14, and of the
  cluster-aware loss, eq. 15-16). Writes ``cicl_temperature`` tables.

The labels are read only to score finished runs; these tables inform one default for every data set, never
a per-set setting. For each comparison: ``<name>.csv`` (mean and standard deviation over seeds per data set
and value), ``<name>_runs.csv`` and ``<name>.md`` (data sets x values, mean ARI ± sd, the mean over data sets,
and the seconds of ``Cicl.fit`` as a ratio to those of the default value's run on the same data set and
seed) in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
from importlib.metadata import version
from pathlib import Path

import pandas as pd
import scanpy as sc
import torch
from _timing import fit_seconds
from sklearn.metrics import adjusted_rand_score

import scext
from scext.models import Cicl
from scext.tl._cicl import DEFAULT_STEPS
from scext.train._loop import epochs_for_steps

# CICL's defaults were chosen on the first four; the last three were held out
DATASETS = [
    "yan",
    "cellbench_celseq2_3cl",
    "pbmc3k_hvg250",
    "baron_mouse",
    "10x_pbmc_top2000",
    "mouse_bladder_top2000",
    "paul15",
]
DEFAULTS = {name: p.default for name, p in inspect.signature(scext.tl.cicl).parameters.items()}
BATCH_SIZE = DEFAULTS["batch_size"]


def timed_run(adata, n_clusters: int, seed: int, **kwargs) -> tuple[float, float]:
    """ARI of one default call with `kwargs` changed, and the seconds its `Cicl.fit` took."""
    with fit_seconds(Cicl) as seconds:
        result = scext.tl.cicl(adata, n_clusters, random_state=seed, copy=True, progress_bar=False, **kwargs)
    return adjusted_rand_score(adata.obs["cell_type"], result.obs["cicl"]), seconds[0]


def compare(name: str, column: str, values, default, call_kwargs, args, header) -> None:
    """Run every data set x seed x value, then write the CSVs and the Markdown table named `name`."""
    runs = []
    for dataset in args.datasets:
        adata = scext.datasets.load(dataset)
        n_clusters = adata.obs["cell_type"].nunique()
        minibatches = -(-adata.n_obs // BATCH_SIZE)
        for seed in args.seeds:
            for value in values:
                ari, seconds = timed_run(adata, n_clusters, seed, **call_kwargs(value, minibatches))
                runs.append(
                    {"dataset": dataset, "seed": seed, column: value, "ari": ari, "fit_seconds": seconds}
                )
                print(
                    f"{dataset} seed {seed} {column} {value}: ARI {ari:.3f}, fit {seconds:.1f} s", flush=True
                )
    runs = pd.DataFrame(runs)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runs.to_csv(args.out_dir / f"{name}_runs.csv", index=False)
    summary = runs.groupby(["dataset", column], sort=False).agg(
        ari_mean=("ari", "mean"), ari_sd=("ari", "std"), fit_seconds=("fit_seconds", "mean")
    )
    summary.reset_index().to_csv(args.out_dir / f"{name}.csv", index=False)

    flags = f"--{column.replace('_', '-')}s {' '.join(f'{v:g}' for v in values)}"
    lines = [
        f"`python benchmarks/cicl_choices.py {flags} --seeds {' '.join(map(str, args.seeds))}` "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({args.threads} threads), "
        f"scanpy {version('scanpy')}, scext {scext.__version__}; ARI of the final labels, mean ± sd over seeds)",
        "",
        "| data set | " + " | ".join(header(v) for v in values) + " |",
        "|---|" + "---|" * len(values),
    ]
    for dataset in args.datasets:
        cells = [summary.loc[(dataset, v)] for v in values]
        lines.append(
            f"| {dataset} | " + " | ".join(f"{c.ari_mean:.3f} ± {c.ari_sd:.3f}" for c in cells) + " |"
        )
    means = runs.groupby(column)["ari"].mean()
    lines.append("| mean over data sets | " + " | ".join(f"{means[v]:.3f}" for v in values) + " |")
    if default in values:
        # per data set and seed, fit time relative to the default value's run in the same process
        reference = runs[runs[column] == default].set_index(["dataset", "seed"])["fit_seconds"]
        keys = list(zip(runs["dataset"], runs["seed"], strict=True))
        ratios = (runs["fit_seconds"] / reference.loc[keys].to_numpy()).groupby(runs[column]).mean()
        lines.append(
            f"| training time / default's ({header(default)}) | "
            + " | ".join(f"{ratios[v]:.2f}" for v in values)
            + " |"
        )
    table = "\n".join(lines) + "\n"
    (args.out_dir / f"{name}.md").write_text(table)
    print("\n" + table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--steps", nargs="+", type=int, default=None, help="training lengths to compare")
    parser.add_argument("--cluster-weights", nargs="+", type=float, default=None, help="lambdas to compare")
    parser.add_argument("--temperatures", nargs="+", type=float, default=None, help="temperatures to compare")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/tables"))
    args = parser.parse_args()
    if args.steps is None and args.cluster_weights is None and args.temperatures is None:
        parser.error("give at least one of --steps, --cluster-weights and --temperatures")
    torch.set_num_threads(args.threads)
    sc.settings.verbosity = 0
    if args.steps is not None:
        compare(
            "cicl_schedule",
            "step",
            args.steps,
            DEFAULT_STEPS,
            lambda steps, minibatches: {"n_epochs": epochs_for_steps(steps, minibatches)},
            args,
            lambda steps: f"{steps} steps",
        )
    if args.cluster_weights is not None:
        compare(
            "cicl_cluster_weight",
            "cluster_weight",
            args.cluster_weights,
            DEFAULTS["cluster_weight"],
            lambda weight, _: {"cluster_weight": weight},
            args,
            lambda weight: f"lambda {weight:g}",
        )
    if args.temperatures is not None:
        compare(
            "cicl_temperature",
            "temperature",
            args.temperatures,
            DEFAULTS["temperature"],
            lambda temperature, _: {"temperature": temperature},
            args,
            lambda temperature: f"tau {temperature:g}",
        )


if __name__ == "__main__":
    main()
