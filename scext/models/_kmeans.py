"""K-means and the Student-t soft assignment in torch, on any device, so a GPU run stays on the GPU."""

from __future__ import annotations

import math

import torch


def kmeans(
    x: torch.Tensor,
    n_clusters: int,
    *,
    n_init: int = 1,
    max_iter: int = 100,
    tol: float = 1e-4,
    init: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of `x` into `n_clusters` groups by K-means.

    Seeding is greedy k-means++ (each new centre is the best of ``2 + log(k)`` candidates drawn with
    probability proportional to the squared distance to the nearest centre), followed by Lloyd iterations
    until the centres move by less than `tol` times the mean per-feature variance of `x` (the criterion
    scikit-learn uses), or `max_iter`. With `n_init` > 1 the run of lowest inertia is kept. An empty cluster
    is re-seeded with the point farthest from its centre. Everything runs on ``x.device``; no gradient flows.

    Parameters
    ----------
    x
        Points x features, floating point, on any device.
    n_clusters
        Number of clusters K; at most the number of points.
    n_init
        Independent seedings; the one of lowest within-cluster sum of squares wins.
    max_iter, tol
        Lloyd iterations at most, and the convergence tolerance (relative to the data's variance).
    init
        K x features starting centres (e.g. those of a previous call); used for the first run instead of
        k-means++.
    generator
        Random source for the seeding, on ``x.device`` (a `torch.Generator` made with ``device=x.device``).
        The same generator state gives the same result on the CPU; on CUDA the centre updates use atomic
        adds, so results agree to float tolerance.

    Returns
    -------
    centers
        K x features tensor on ``x.device``.
    labels
        Cluster index (int64) of every point.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be points x features, got shape {tuple(x.shape)}.")
    n_points = x.shape[0]
    if not isinstance(n_clusters, int) or isinstance(n_clusters, bool) or not 1 <= n_clusters <= n_points:
        raise ValueError(
            f"n_clusters must be an int in [1, {n_points}] (the number of points), got {n_clusters!r}."
        )
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be at least 1, got {n_init} and {max_iter}.")
    if init is not None and tuple(init.shape) != (n_clusters, x.shape[1]):
        raise ValueError(f"init must have shape {(n_clusters, x.shape[1])}, got {tuple(init.shape)}.")
    with torch.no_grad():
        x = x.detach()
        if not x.is_floating_point():
            x = x.float()
        threshold = tol * x.var(dim=0, unbiased=False).mean()
        squared_norms = (x * x).sum(dim=1)
        best = None
        for run in range(n_init):
            if run == 0 and init is not None:
                centers = init.detach().to(device=x.device, dtype=x.dtype).clone()
            else:
                centers = _kmeans_plusplus(x, squared_norms, n_clusters, generator)
            centers, labels, inertia = _lloyd(x, squared_norms, centers, max_iter, threshold)
            if best is None or inertia < best[2]:
                best = (centers, labels, inertia)
        return best[0], best[1]


def squared_distances(x: torch.Tensor, centers: torch.Tensor, squared_norms: torch.Tensor | None = None):
    """Squared Euclidean distances, points x centres, by the matrix-product expansion (clamped at 0)."""
    if squared_norms is None:
        squared_norms = (x * x).sum(dim=1)
    distances = squared_norms[:, None] - 2 * x @ centers.T + (centers * centers).sum(dim=1)[None, :]
    return distances.clamp_min_(0)


def _kmeans_plusplus(x, squared_norms, n_clusters, generator):
    n_points = x.shape[0]
    n_trials = 2 + int(math.log(n_clusters))
    first = torch.randint(n_points, (1,), generator=generator, device=x.device)
    centers = [x[first]]
    closest = squared_distances(x, x[first], squared_norms)[:, 0]
    for _ in range(1, n_clusters):
        total = closest.sum()
        # all points coincide with a centre: any point is as good as another
        weights = closest if total > 0 else torch.ones_like(closest)
        candidates = torch.multinomial(weights, n_trials, replacement=True, generator=generator)
        to_candidates = squared_distances(x, x[candidates], squared_norms)
        potentials = torch.minimum(closest[:, None], to_candidates)
        pick = potentials.sum(dim=0).argmin()
        centers.append(x[candidates[pick]][None])
        closest = potentials[:, pick]
    return torch.cat(centers)


def _lloyd(x, squared_norms, centers, max_iter, threshold):
    n_clusters = centers.shape[0]
    for _ in range(max_iter):
        distances = squared_distances(x, centers, squared_norms)
        nearest, labels = distances.min(dim=1)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=n_clusters).to(x.dtype)
        new_centers = sums / counts.clamp_min(1)[:, None]
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # re-seed empty clusters with the worst-fitted points, which is what lowers the inertia most
            far = nearest.topk(len(empty)).indices
            new_centers[empty] = x[far]
        shift = ((new_centers - centers) ** 2).sum()
        centers = new_centers
        if shift <= threshold:
            break
    distances = squared_distances(x, centers, squared_norms)
    nearest, labels = distances.min(dim=1)
    return centers, labels, nearest.sum()


def student_t(h: torch.Tensor, centers: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Eq. 8: soft assignment q_ij proportional to (1 + ||h_i - c_j||^2 / alpha)^(-(alpha + 1) / 2)."""
    kernel = (1 + squared_distances(h, centers) / alpha).pow(-(alpha + 1) / 2)
    return kernel / kernel.sum(dim=1, keepdim=True)
