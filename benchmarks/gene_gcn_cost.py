"""Cost of the gene_gcn backbone's smoothing per minibatch, by number of genes.

    python benchmarks/gene_gcn_cost.py [--genes 250 500 1000 2000] [--batch-size 64] [--device auto]

Each size runs in a fresh process so that peak resident memory (CPU) or peak allocated memory (CUDA)
belongs to that size alone. Prints seconds per forward+backward of one minibatch (median of 3 after a
warm-up) and the peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import pandas as pd


def measure(n_genes: int, batch_size: int, device: str) -> dict:
    import torch

    from scext._utils import resolve_device
    from scext.models import GeneGraphSmoothing

    torch_device = resolve_device(device)
    torch.manual_seed(0)
    module = GeneGraphSmoothing(n_genes).to(torch_device)
    z = torch.randn(batch_size, n_genes, device=torch_device)
    times = []
    for _ in range(4):
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        module(z).sum().backward()
        if torch_device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if torch_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "genes": n_genes,
        "seconds per batch": sorted(times[1:])[1],
        "peak MB": peak,
        "device": str(torch_device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--genes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.batch_size, args.device)))
        return
    rows = []
    for n_genes in args.genes:
        command = [
            sys.executable,
            __file__,
            "--one",
            str(n_genes),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
        ]
        rows.append(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))
    table = pd.DataFrame(rows)
    print(
        f"\ngene_gcn smoothing, forward+backward of {args.batch_size} cells ({table['device'][0]}; peak memory "
        "is the process's resident size on CPU, allocated tensors on CUDA)\n"
    )
    print(table.drop(columns="device").round(3).to_markdown(index=False))


if __name__ == "__main__":
    main()
