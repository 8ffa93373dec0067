"""Per-cell gene attributions of a classifier, in its standardised input space (KRATOS sec. 2.4, 4.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

Logits = Callable[[torch.Tensor], torch.Tensor]

# Elements of float32 scratch one attribution call may hold at once (cells x copies x genes): ~256 MB.
_SCRATCH_ELEMENTS = 2**26


def contrast_score(logits: torch.Tensor, source: int, reference: int | None) -> torch.Tensor:
    """The class score the gradient methods explain: the source logit, or its margin over `reference`.

    Logits rather than softmax outputs, because a confidently classified cell has a saturated softmax whose
    gradient is vanishingly small and ranks genes by numerical noise.
    """
    score = logits[:, source]
    return score if reference is None else score - logits[:, reference]


def cw_perturbation(
    logits_of: Logits,
    z: torch.Tensor,
    source: int,
    reference: int | None = None,
    *,
    tradeoff: float = 10.0,
    margin: float = 0.1,
    lr: float = 2.0,
    max_iter: int = 32,
    n_rounds: int = 4,
    space: str = "logits",
) -> torch.Tensor:
    """Carlini-Wagner style perturbation of each cell of class `source`, with the trade-off chosen per cell.

    Minimises ``|delta|_1 + lambda * max(0, margin + a_s(z + delta) - a_r(z + delta))`` per cell, where
    ``a_r`` is the largest other class (one-vs-rest, KRATOS eq. 12) or the class `reference` (one-vs-one,
    eq. 13). Each cell is optimised on its own (the result does not depend on which cells are batched
    together).

    Lambda is found per cell by a binary search, as Carlini and Wagner do: it starts at
    ``tradeoff / max_i |g_i|``, with ``g`` the gradient of the cell's hinge at ``delta = 0``; after a round, a
    cell that crossed the margin halves it (or bisects towards the largest lambda known to fail), and a cell
    that did not multiplies it by 10. Each round starts from ``delta = 0`` and takes proximal-gradient (ISTA)
    steps: a gradient step on the hinge, then soft-thresholding for the L1 term, which keeps untouched genes
    exactly at zero. The result is the smallest (L1) perturbation that crossed in any round; a cell that never
    crossed keeps the last round's perturbation (`cw_hinge` tells them apart). The
    :doc:`KRATOS page </methods/kratos>` says why this departs from the paper's Algorithm 1.

    Parameters
    ----------
    logits_of
        The classifier from its standardised input to logits (``KratosNet.forward_standardized``).
    z
        Cells x genes in that standardised input space.
    source
        Index of the class the cells belong to.
    reference
        ``None`` (one-vs-rest) or the index of the class to push the cells towards (one-vs-one).
    tradeoff
        Where the search over lambda starts, in units of 1 / the largest gradient of the cell's margin.
    margin
        The margin alpha, in the units of `space`.
    lr
        The gradient step as a multiple of the step that would cross the margin were the logits linear.
    max_iter
        Steps per cell over all rounds.
    n_rounds
        Rounds of the search over lambda.
    space
        ``"logits"`` (as Carlini and Wagner's own objective) or ``"proba"`` (the softmax outputs, as the
        KRATOS paper writes eq. 12). On a confidently classified cell the softmax is saturated and its
        gradient vanishes against the L1 term.

    Returns
    -------
    delta, same shape as `z`.
    """
    n_cells = z.shape[0]
    if n_cells == 0:
        return torch.zeros_like(z)
    hinge0, grad0 = _hinge_and_grad(logits_of, z, None, source, reference, margin, space)
    squared = grad0.pow(2).sum(1)
    # the gradient step of each cell: a fraction `lr` of the linearised step to the margin
    step = torch.where(squared > 0, lr * hinge0 / squared.clamp_min(1e-30), torch.zeros_like(hinge0))
    # lambda in units of 1 / (the largest pull at delta = 0): `tradeoff` 10 moves the genes within 10x of it
    pull = grad0.abs().amax(1)
    tradeoffs = torch.where(pull > 0, float(tradeoff) / pull.clamp_min(1e-30), torch.zeros_like(pull))
    lower = torch.zeros_like(hinge0)
    upper = torch.full_like(hinge0, float("inf"))
    best = torch.zeros_like(z)
    best_l1 = torch.full_like(hinge0, float("inf"))
    last = torch.zeros_like(z)
    steps_per_round = max(1, max_iter // n_rounds)
    pushed = -step[:, None] * grad0  # the gradient step from delta = 0
    for _ in range(n_rounds):
        crossed = torch.zeros(n_cells, dtype=torch.bool, device=z.device)
        # the first step, from delta = 0 where the hinge and its gradient are known
        # (a cell whose margin has no gradient gets an infinite threshold: nothing moves, no 0 / 0)
        threshold = torch.where(tradeoffs > 0, step / tradeoffs.clamp_min(1e-30), torch.inf)[:, None]
        first = _soft_threshold(pushed.clone(), threshold)
        # a cell none of whose genes leaves zero is stuck: its next step would be this one again
        moving = (hinge0 > 0) & (first != 0).any(1)
        last[~moving] = 0.0
        rows = moving.nonzero().squeeze(1)
        # the cells still on their way, compacted: every step touches only those
        delta, cells = first[rows], z[rows]
        del first
        cell_step, cell_threshold = step[rows, None], threshold[rows]
        for iteration in range(steps_per_round):
            if len(rows) == 0:
                break
            hinge, grad = _hinge_and_grad(logits_of, cells, delta, source, reference, margin, space)
            across = hinge == 0
            if across.any():
                # a cell stops once it crosses; the search then tries a smaller lambda for it
                reached = rows[across]
                crossed[reached] = True
                found = delta[across]
                size = found.abs().sum(1)
                smaller = size < best_l1[reached]
                best[reached[smaller]] = found[smaller]
                best_l1[reached[smaller]] = size[smaller]
            if iteration == steps_per_round - 1:
                break
            delta = _soft_threshold(delta.addcmul_(cell_step, grad, value=-1.0), cell_threshold)
            if across.any():
                going = ~across
                rows, delta, cells = rows[going], delta[going], cells[going]
                cell_step, cell_threshold = cell_step[going], cell_threshold[going]
        going = ~crossed[rows]
        last[rows[going]] = delta[going]  # the cells that did not cross in this round
        upper = torch.where(crossed, torch.minimum(upper, tradeoffs), upper)
        lower = torch.where(crossed, lower, torch.maximum(lower, tradeoffs))
        # Carlini and Wagner's update: x10 until a crossing is known, else the middle of the bracket
        tradeoffs = torch.where(torch.isinf(upper), tradeoffs * 10, (lower + upper) / 2)
    return torch.where(torch.isfinite(best_l1)[:, None], best, last)


def _soft_threshold(values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The proximal step of ``threshold * |.|_1``, in place: shrink towards zero by `threshold`, zero within."""
    return values.sub_(torch.clamp(values, -threshold, threshold))


def _hinge_and_grad(logits_of, z, delta, source, reference, margin, space):
    """The hinge of eq. 12-13 at ``z + delta`` and its gradient in delta (``delta=None``: at zero)."""
    # the gradient in delta is the gradient in the perturbed input itself
    perturbed = (z.clone() if delta is None else z + delta).requires_grad_(True)
    with torch.enable_grad():
        hinge = cw_hinge(logits_of(perturbed), source, reference, margin=margin, space=space)
        (grad,) = torch.autograd.grad(hinge.sum(), perturbed)
    return hinge.detach(), grad


def cw_hinge(
    logits: torch.Tensor, source: int, reference: int | None, *, margin: float, space: str = "logits"
) -> torch.Tensor:
    """Per cell ``max(0, margin + a_s - a_r)``, the class term of CW's objective; zero once the cell has crossed.

    Evaluated on ``z + delta`` after `cw_perturbation`, a zero hinge says the perturbation reached the rival
    class.

    Parameters
    ----------
    logits
        Cells x classes logits of the (perturbed) cells.
    source, reference
        As in `cw_perturbation`.
    margin, space
        As in `cw_perturbation`.

    Returns
    -------
    The hinge of every cell.
    """
    scores = torch.softmax(logits, dim=1) if space == "proba" else logits
    own = scores[:, source]
    if reference is None:
        rival = scores.masked_fill(_one_hot_mask(scores, source), -torch.inf).max(dim=1).values
    else:
        rival = scores[:, reference]
    return torch.clamp(margin + own - rival, min=0.0)


def _one_hot_mask(scores: torch.Tensor, column: int) -> torch.Tensor:
    mask = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
    mask[column] = True
    return mask


def smoothgrad(
    logits_of: Logits,
    z: torch.Tensor,
    source: int,
    reference: int | None = None,
    *,
    n_samples: int = 50,
    noise_std: float = 0.5,
) -> torch.Tensor:
    """SmoothGrad of the class score: gradients averaged over Gaussian-noised copies (Captum).

    The class score is the `source` logit, or its margin over `reference`.

    Parameters
    ----------
    logits_of
        The classifier from its standardised input to logits (``KratosNet.forward_standardized``).
    z
        Cells x genes in that standardised input space.
    source
        Index of the class the cells belong to.
    reference
        ``None`` (one-vs-rest) or the index of the class to push the cells towards (one-vs-one).
    n_samples
        Noisy copies per cell.
    noise_std
        Standard deviation of the noise, in standardised units.

    Returns
    -------
    Attributions, same shape as `z`.
    """
    explainer = NoiseTunnel(Saliency(lambda v: contrast_score(logits_of(v), source, reference)))
    cells_per_chunk = max(1, _SCRATCH_ELEMENTS // (n_samples * z.shape[1]))
    return torch.cat(
        [
            explainer.attribute(
                chunk, nt_type="smoothgrad", nt_samples=n_samples, stdevs=noise_std, abs=False
            ).detach()
            for chunk in z.split(cells_per_chunk)
        ]
    )


def integrated_gradients(
    logits_of: Logits,
    z: torch.Tensor,
    source: int,
    reference: int | None = None,
    *,
    baseline: torch.Tensor,
    n_steps: int = 50,
) -> torch.Tensor:
    """Integrated Gradients of the class score from `baseline` (right Riemann sum; Captum).

    The class score is the `source` logit, or its margin over `reference`.

    Parameters
    ----------
    logits_of
        The classifier from its standardised input to logits (``KratosNet.forward_standardized``).
    z
        Cells x genes in that standardised input space.
    source
        Index of the class the cells belong to.
    reference
        ``None`` (one-vs-rest) or the index of the class to push the cells towards (one-vs-one).
    baseline
        The baseline cell x' (1 x genes, standardised), broadcast to every cell.
    n_steps
        Steps of the Riemann sum.

    Returns
    -------
    Attributions, same shape as `z`.
    """
    explainer = IntegratedGradients(lambda v: contrast_score(logits_of(v), source, reference))
    internal_batch = max(n_steps, _SCRATCH_ELEMENTS // z.shape[1])
    return explainer.attribute(
        z,
        baselines=baseline.expand_as(z),
        n_steps=n_steps,
        method="riemann_right",
        internal_batch_size=internal_batch,
    ).detach()
