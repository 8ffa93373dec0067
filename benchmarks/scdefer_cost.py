"""Where a scDEFER training step spends its time, and its FLOP rate against the machine's fp32 matmul rate.

    python benchmarks/scdefer_cost.py --dataset 10x_pbmc_top2000 --epochs 10 --out benchmarks/tables/scdefer_cost.md

Runs `scext.tl.scdefer` at its defaults except for the schedule: `--epochs` pretraining epochs (one
full-graph step each) and no joint training. The FLOPs of one pretraining step (forward and backward) are
counted by ``torch.utils.flop_counter`` (matrix products only; the elementwise ZINB terms are not counted),
the seconds per step are the pretraining's wall time over the steps, and the fp32 matmul rate of this
machine is measured in the same process (a 2,048 x 2,048 product, best of five). The profile lists the
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
    parser.add_argument("--out", type=Path, default=Path("benchmarks/tables/scdefer_cost.md"))
    args = parser.parse_args()
    adata = scext.datasets.load(args.dataset)
    n_types = adata.obs["cell_type"].nunique()
    measured = {}
    train_loop = scdefer_model.train_loop

    def measuring_loop(module, optimizer, *, step, batches, n_epochs, **kwargs):
        batch = next(iter(batches()))
        with FlopCounterMode(display=False) as counter:
            step(batch)["loss"].backward()
        optimizer.zero_grad(set_to_none=True)
        measured["flops"] = counter.get_total_flops()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            start = time.perf_counter()
            history = train_loop(module, optimizer, step=step, batches=batches, n_epochs=n_epochs, **kwargs)
            measured["seconds"] = time.perf_counter() - start
        measured["profile"] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        return history

    scdefer_model.train_loop = measuring_loop
    try:
        scext.tl.scdefer(
            adata, n_types, n_pretrain_epochs=args.epochs, n_epochs=0, progress_bar=False, keep_model=False
        )
    finally:
        scdefer_model.train_loop = train_loop
    rate = matmul_rate()
    per_step = measured["seconds"] / args.epochs
    print(measured["profile"])
    achieved = measured["flops"] / per_step
    table = (
        f"`python benchmarks/scdefer_cost.py --dataset {args.dataset} --epochs {args.epochs}` "
        f"({platform.machine()}, {torch.get_num_threads()} torch threads)\n\n"
        "| data set | cells | GFLOP per step (matrix products) | seconds per step | GFLOP/s | "
        "fp32 matmul GFLOP/s, same process | share of it |\n|---|--:|--:|--:|--:|--:|--:|\n"
        f"| {args.dataset} | {adata.n_obs:,} | {measured['flops'] / 1e9:.1f} | {per_step:.2f} | "
        f"{achieved / 1e9:.1f} | {rate / 1e9:.1f} | {achieved / rate:.0%} |\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
