"""Where a scDEFER training step spends its time, and its FLOP rate against the machine's fp32 matmul rate.

    python benchmarks/scdefer_cost.py --dataset 10x_pbmc_top2000 --epochs 10 --batch-sizes 0 1024 \\
        --out benchmarks/tables/scdefer_cost.md

Runs `scext.tl.scdefer` at its defaults except for the schedule: `--epochs` pretraining epochs and no joint
training, once per `--batch-sizes` entry (0: the full graph, one step per epoch; else Cluster-GCN
minibatches of about that many cells). The FLOPs of the steps of one epoch (forward and backward) are
counted by ``torch.utils.flop_counter`` (matrix products only; neither the elementwise ZINB terms nor the
sparse propagation are counted) before training, and their mean is the FLOPs of a step (minibatches differ
in size: "cells per step" is their mean); the seconds per step are the
pretraining's wall time over the steps, and the fp32 matmul rate of this machine is measured in the same
process (a 2,048 x 2,048 product, best of five). The profile lists the
operators that took the most time over the timed steps (``torch.profiler``). Writes the figures as a
Markdown table (``--out``) and prints the profile.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import scext
import scext.models._scdefer as scdefer_model


def matmul_rate() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 2048**3 / best


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="10x_pbmc_top2000")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[0, 1024])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/tables/scdefer_cost.md"))
    args = parser.parse_args()
    adata = scext.datasets.load(args.dataset)
    n_types = adata.obs["cell_type"].nunique()
    measured = {}
    train_loop = scdefer_model.train_loop

    def measuring_loop(module, optimizer, *, step, batches, n_epochs, **kwargs):
        # one epoch's steps, forward and backward, counted but not taken: the mean step of an epoch
        epoch = list(batches())
        with FlopCounterMode(display=False) as counter:
            for batch in epoch:
                step(batch)["loss"].backward()
        optimizer.zero_grad(set_to_none=True)
        measured["steps"] = n_epochs * len(epoch)
        measured["flops"] = counter.get_total_flops() / len(epoch)
        measured["cells"] = sum(len(batch[0]) for batch in epoch) / len(epoch)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            start = time.perf_counter()
            history = train_loop(module, optimizer, step=step, batches=batches, n_epochs=n_epochs, **kwargs)
            measured["seconds"] = time.perf_counter() - start
        measured["profile"] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        return history

    rows = []
    for batch_size in args.batch_sizes:
        schedule = {"training": "full"} if batch_size == 0 else {"batch_size": batch_size}
        scdefer_model.train_loop = measuring_loop
        try:
            scext.tl.scdefer(
                adata,
                n_types,
                n_pretrain_epochs=args.epochs,
                n_epochs=0,
                progress_bar=False,
                keep_model=False,
                **schedule,
            )
        finally:
            scdefer_model.train_loop = train_loop
        print(measured["profile"])
        per_step = measured["seconds"] / measured["steps"]
        achieved = measured["flops"] / per_step
        rows.append((measured["cells"], measured["flops"], measured["steps"], per_step, achieved))
    rate = matmul_rate()
    table = (
        f"`python benchmarks/scdefer_cost.py --dataset {args.dataset} --epochs {args.epochs} --batch-sizes "
        f"{' '.join(map(str, args.batch_sizes))}` ({platform.machine()}, {torch.get_num_threads()} torch "
        "threads)\n\n"
        "| data set | cells | cells per step | steps | GFLOP per step (matrix products) | seconds per step | "
        "GFLOP/s | fp32 matmul GFLOP/s, same process | share of it |\n"
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|\n"
    )
    for cells, flops, steps, per_step, achieved in rows:
        table += (
            f"| {args.dataset} | {adata.n_obs:,} | {cells:,.0f} | {steps} | {flops / 1e9:.1f} | {per_step:.3f} | "
            f"{achieved / 1e9:.1f} | {rate / 1e9:.1f} | {achieved / rate:.0%} |\n"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
