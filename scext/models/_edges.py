"""Edge decoding shared by the graph autoencoders: inner-product scores and random negative pairs."""

from __future__ import annotations

import torch


def edge_logits(z: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Inner-product decoder (eq. 2) before the sigmoid, for the (source, target) pairs in `edges`."""
    return (z[edges[0]] * z[edges[1]]).sum(dim=-1)


def sample_pairs(n_cells: int, n_pairs: int, device: torch.device) -> torch.Tensor:
    """Uniform random (source, target) pairs: the negative edges of eq. 10.

    With k neighbours per cell a random pair is a real edge with probability about k / N, so the pairs are
    not filtered against the graph.
    """
    return torch.randint(0, n_cells, (2, n_pairs), device=device)
