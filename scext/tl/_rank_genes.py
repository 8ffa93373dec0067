from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scanpy import logging as logg
from tqdm.auto import tqdm

from .. import __version__
from .._settings import settings
from .._utils import resolve_device, seed_everything
from .._utils._contract import check_adata, check_int, check_number, claim_slots
from .._utils._device import keeps_torch_threads
from .._utils._random import preserves_global_rng
from .._utils._warnings import warn
from ..models import Kratos
from ..models._attribution import cw_hinge, cw_perturbation, integrated_gradients, smoothgrad
from ..train import dense_rows

METHODS = ("cw", "smoothgrad", "integrated_gradients")


@keeps_torch_threads
@preserves_global_rng
def rank_genes_perturbation(
    adata: AnnData,
    *,
    method: str = "cw",
    key: str = "kratos",
    groups: list[str] | None = None,
    reference: str = "rest",
    score: str = "support",
    cw_tradeoff: float = 10.0,
    cw_margin: float = 0.1,
    cw_lr: float = 2.0,
    cw_max_iter: int = 32,
    cw_n_rounds: int = 4,
    cw_space: str = "logits",
    sg_n_samples: int = 50,
    sg_noise_std: float = 0.5,
    ig_n_steps: int = 50,
    ig_baseline: str = "zero",
    batch_size: int = 512,
    device: str | torch.device = "auto",
    random_state: int = 0,
    progress_bar: bool | None = None,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Rank genes per class by explaining a trained KRATOS classifier.

    For each class, the cells of that class the classifier gets right are explained, and a gene's score is the
    mean over those cells of its attribution (see `score`). Attributions live in the classifier's standardised
    input space, so scores are in units of each gene's standard deviation.

    - ``"cw"``: Carlini-Wagner style perturbation (one-vs-rest, or one-vs-one towards `reference`): per cell,
      the smallest (L1) change of its standardised expression that moves it across the margin, with the
      trade-off searched per cell (`scext.models.cw_perturbation`).
    - ``"smoothgrad"``: the gradient of the class logit averaged over noisy copies (Captum).
    - ``"integrated_gradients"``: gradients integrated along the path from a baseline cell (Captum).

    The :doc:`KRATOS page </methods/kratos>` gives the paper's equations and how scext departs from them.

    Parameters
    ----------
    adata
        The AnnData `scext.tl.kratos` was run on (or one with the same genes, labels in the same column).
    method
        ``"cw"``, ``"smoothgrad"`` or ``"integrated_gradients"``.
    key
        ``key_added`` of the `scext.tl.kratos` run whose model is explained.
    groups
        Classes to rank genes for; all by default.
    reference
        ``"rest"`` (one-vs-rest) or a class name: each group is pushed towards that class (one-vs-one).
    score
        ``"support"``: the mean signed attribution, oriented so that genes whose increase holds a cell in its
        class come first; panels then read like marker panels, as those of `scanpy.tl.rank_genes_groups` do.
        ``"magnitude"``: the mean absolute attribution (the paper's ranking), which also ranks the genes a
        class is recognised by *lacking*; use it to find classes marked by genes going down.
    cw_tradeoff, cw_margin, cw_lr, cw_max_iter, cw_n_rounds
        CW's trade-off lambda where the per-cell search starts (in units of 1 / the largest gradient of the
        cell's margin), the margin alpha (in logits), the step size (a multiple of the step that would cross
        the margin were the logits linear), the steps per cell and the rounds of the search over lambda
        (each halves lambda after a crossing, multiplies it by 10 after a failure).
        ``uns[key_added]["cw_reached"]`` records the fraction of each group's cells that crossed.
    cw_space
        ``"logits"`` or ``"proba"``: whether CW's hinge compares logits or softmax outputs (the paper's
        literal equation).
    sg_n_samples, sg_noise_std
        Noisy copies per cell and the noise's standard deviation (standardised units) for SmoothGrad.
    ig_n_steps, ig_baseline
        Integration steps of Integrated Gradients and its baseline: ``"zero"``, the zero of the standardised
        input (the average training cell), or ``"unexpressed"``, every gene at zero expression.
    batch_size
        Cells explained at once (memory scales with ``batch_size x genes``); results do not depend on it.
    device, random_state
        As in `scext.tl.kratos`; `random_state` seeds SmoothGrad's noise.
    progress_bar
        Show a bar over groups; defaults to `scext.settings.progress_bar`.
    key_added
        Defaults to ``"<key>_<method>"``.
    copy
        Return a copy with the results instead of writing to `adata`.

    Returns
    -------
    `None`, or the copy when ``copy=True``. Writes:

    ``uns[key_added]``
        Scanpy's rank_genes_groups layout: ``names``, ``scores`` (see `score`), ``signed_scores`` (mean
        signed attribution; for ``cw`` the mean perturbation, negative where lowering the gene leaves the
        class), ``logfoldchanges`` (Scanpy's formula, on ``adata.raw`` when the model reads ``X`` and
        ``.raw`` holds its genes, else on the model's input), ``pvals`` and ``pvals_adj`` (NaN: attributions
        give no test), ``params``, ``n_cells`` explained per group and, for ``cw``, ``cw_reached``.
        ``sc.get.rank_genes_groups_df`` and ``sc.pl.rank_genes_groups_*`` read it with ``key=key_added``.
    ``varm["<key_added>_scores"]``
        Genes x groups score matrix (NaN for genes the model does not read).

    References
    ----------
    Zihan Zhou, Zijia Du and Somali Chaterji. KRATOS: Context-Aware Cell Type Classification and
    Interpretation Using Joint Dimensionality Reduction and Clustering. KDD '22, ACM, 2022.
    doi:10.1145/3534678.3539455
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {METHODS}.")
    if score not in ("magnitude", "support"):
        raise ValueError(f"score={score!r} is unknown; choose 'magnitude' or 'support'.")
    if cw_space not in ("logits", "proba"):
        raise ValueError(f"cw_space={cw_space!r} is unknown; choose 'logits' or 'proba'.")
    if ig_baseline not in ("zero", "unexpressed"):
        raise ValueError(f"ig_baseline={ig_baseline!r} is unknown; choose 'zero' or 'unexpressed'.")
    key_added = f"{key}_{method}" if key_added is None else key_added
    check_adata(adata, "rank_genes_perturbation", copy=copy)
    if groups is not None and len(groups) == 0:
        raise ValueError("groups=[] selects no class; pass None for every class, or a list of class names.")
    for name, value in (
        ("cw_max_iter", cw_max_iter),
        ("cw_n_rounds", cw_n_rounds),
        ("sg_n_samples", sg_n_samples),
        ("ig_n_steps", ig_n_steps),
        ("batch_size", batch_size),
    ):
        check_int(value, name)
    check_number(cw_tradeoff, "cw_tradeoff", low=0, open_low=True)
    check_number(cw_lr, "cw_lr", low=0, open_low=True)
    check_number(cw_margin, "cw_margin", low=0)
    check_number(sg_noise_std, "sg_noise_std", low=0)
    claim_slots(
        adata,
        "rank_genes_perturbation",
        key_added,
        key_added,
        [("uns", key_added), ("varm", f"{key_added}_scores")],
    )
    model = Kratos.from_adata(adata, key=key)
    groupby = str(adata.uns[key]["params"]["groupby"])
    if groupby not in adata.obs:
        raise KeyError(f"obs[{groupby!r}], the labels the model was trained on, is missing from adata.")
    labels = adata.obs[groupby].astype(str).where(adata.obs[groupby].notna()).to_numpy()
    groups = list(model.classes) if groups is None else [str(g) for g in groups]
    unknown = [g for g in [*groups, *([] if reference == "rest" else [reference])] if g not in model.classes]
    if unknown:
        raise ValueError(f"{unknown} are not classes of the model; choose from {model.classes}.")
    groups = [g for g in groups if g != reference]
    torch_device = resolve_device(device)
    matrix = model.aligned_matrix(adata)
    seed_everything(random_state)
    start = logg.info(f"ranking genes with {method} on KRATOS model {key!r}")

    predicted = np.asarray(model.classes)[model.embed_and_classify(matrix, torch_device)[1].argmax(axis=1)]
    net = model.net.to(torch_device).eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    ig_origin = _baseline(net, model, ig_baseline, torch_device)
    explain = {
        "cw": partial(
            cw_perturbation,
            tradeoff=cw_tradeoff,
            margin=cw_margin,
            lr=cw_lr,
            max_iter=cw_max_iter,
            n_rounds=cw_n_rounds,
            space=cw_space,
        ),
        "smoothgrad": partial(smoothgrad, n_samples=sg_n_samples, noise_std=sg_noise_std),
        "integrated_gradients": partial(
            integrated_gradients,
            baseline=ig_origin,
            n_steps=ig_n_steps,
        ),
    }[method]
    reference_index = None if reference == "rest" else model.classes.index(reference)

    scores, signed, n_cells, reached = {}, {}, {}, {}
    show = settings.progress_bar if progress_bar is None else progress_bar
    for group in tqdm(groups, desc=f"{method} per group", disable=not show, leave=False):
        rows = np.flatnonzero((labels == group) & (predicted == group))
        if len(rows) == 0:
            warn(f"No cell of class {group!r} is classified correctly; it gets no ranking.")
            continue
        total = torch.zeros(matrix.shape[1], device=torch_device, dtype=torch.float64)
        total_abs = torch.zeros_like(total)
        n_reached = 0
        source = model.classes.index(group)
        for chunk in range(0, len(rows), batch_size):
            z = net.standardize(dense_rows(matrix, rows[chunk : chunk + batch_size], torch_device))
            attribution = explain(net.forward_standardized, z, source, reference_index)
            total_abs += attribution.abs().sum(0, dtype=torch.float64)
            if method == "integrated_gradients":
                # IG's attribution is the distance from the baseline times the path's mean gradient; turned
                # by the direction of that distance, positive means "more of this gene supports the class"
                # as for the other methods (a gene low in the class with a negative gradient is no support)
                attribution = attribution * torch.sign(z - ig_origin)
            total += attribution.sum(0, dtype=torch.float64)
            if method == "cw":
                with torch.no_grad():
                    hinge = cw_hinge(
                        net.forward_standardized(z + attribution),
                        source,
                        reference_index,
                        margin=cw_margin,
                        space=cw_space,
                    )
                n_reached += int((hinge == 0).sum())
        signed[group] = (total / len(rows)).cpu().numpy()
        if score == "magnitude":
            scores[group] = (total_abs / len(rows)).cpu().numpy()
        else:
            scores[group] = -signed[group] if method == "cw" else signed[group]
        n_cells[group] = len(rows)
        if method == "cw":
            reached[group] = n_reached / len(rows)
    if not scores:
        raise ValueError("No group had a correctly classified cell; nothing to rank.")
    # a few rare groups that resist are normal; most groups never crossing means the search fell short
    stuck = {group: fraction for group, fraction in reached.items() if fraction < 0.1}
    if len(stuck) > len(reached) / 2:
        warn(
            f"The CW perturbation took fewer than 10% of the cells across the margin in {len(stuck)} of "
            f"{len(reached)} groups ({', '.join(f'{g}: {f:.0%}' for g, f in list(stuck.items())[:5])}"
            f"{', ...' if len(stuck) > 5 else ''}); their rankings then follow the L1 step more than the "
            f"classifier. The search over lambda started at cw_tradeoff={cw_tradeoff} (in units of 1 / the "
            f"largest gradient of each cell's margin) and ran cw_n_rounds={cw_n_rounds} rounds; raise "
            f"either (the default, 10, suits every data set tried); see uns[{key_added!r}]['cw_reached']."
        )

    result = _rank_genes_groups_layout(
        scores,
        signed,
        _log_fold_changes(_fold_change_matrix(adata, model, matrix), labels, list(scores), reference),
        model.var_names,
    )
    result["params"] = {
        "groupby": groupby,
        "reference": reference,
        "method": f"kratos_{method}",
        "score": score,
        "use_raw": model.use_raw,
        "layer": model.layer,
        "corr_method": "none",
        "model_key": key,
        "tool": "rank_genes_perturbation",
        "cw_tradeoff": cw_tradeoff,
        "cw_margin": cw_margin,
        "cw_lr": cw_lr,
        "cw_max_iter": cw_max_iter,
        "cw_n_rounds": cw_n_rounds,
        "cw_space": cw_space,
        "sg_n_samples": sg_n_samples,
        "sg_noise_std": sg_noise_std,
        "ig_n_steps": ig_n_steps,
        "ig_baseline": ig_baseline,
        "device": str(torch_device),
        "random_state": int(random_state),
        "scext_version": __version__,
    }
    # a record array, not a dict: group names may hold "/", which h5py would read as nested groups
    result["n_cells"] = np.rec.fromarrays([[n] for n in n_cells.values()], names=list(n_cells))
    if reached:
        result["cw_reached"] = np.rec.fromarrays([[f] for f in reached.values()], names=list(reached))
    gene_scores = pd.DataFrame(scores, index=model.var_names).reindex(adata.var_names)

    if copy:
        adata = adata.copy()
    adata.uns[key_added] = result
    adata.varm[f"{key_added}_scores"] = gene_scores.to_numpy(dtype=np.float32)
    logg.info(
        "    finished",
        time=start,
        deep=f"added\n    '{key_added}', gene rankings (adata.uns)\n    '{key_added}_scores' (adata.varm)",
    )
    return adata if copy else None


def _baseline(net, model: Kratos, kind: str, device: torch.device) -> torch.Tensor:
    """IG baseline in the standardised space: its zero vector, or zero expression mapped into it."""
    origin = torch.zeros(1, len(model.var_names), device=device)
    return origin if kind == "zero" else net.standardize(origin)


def _fold_change_matrix(adata: AnnData, model: Kratos, matrix):
    """The matrix Scanpy's rank_genes_groups would take at its defaults: ``adata.raw`` when there is one.

    Scanpy reads ``.raw`` by default (``use_raw=None``); so do these fold changes when the model reads
    ``X`` and ``.raw`` holds all its genes (as in pbmc68k_reduced, whose ``X`` is scaled and ``.raw``
    log-normalised). Otherwise the model's own input matrix.
    """
    if model.layer is None and not model.use_raw and adata.raw is not None:
        columns = adata.raw.var_names.get_indexer(model.var_names)
        if (columns >= 0).all():
            return adata.raw.X[:, columns]
    return matrix


def _log_fold_changes(matrix, labels: np.ndarray, groups: list[str], reference: str) -> dict[str, np.ndarray]:
    """Scanpy's logfoldchanges: log2 of expm1(mean) ratios, group vs rest (or vs the reference group).

    Like Scanpy, this assumes log1p-transformed input; on other units it is only a direction.
    """

    def mean_of(mask):
        block = matrix[np.flatnonzero(mask)]
        return np.asarray(block.mean(axis=0) if sp.issparse(block) else np.mean(block, axis=0)).ravel()

    labelled = pd.notna(labels)
    reference_mean = None if reference == "rest" else mean_of(labels == reference)
    changes = {}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for group in groups:
            in_group = labels == group
            other = reference_mean if reference_mean is not None else mean_of(labelled & ~in_group)
            changes[group] = np.log2((np.expm1(mean_of(in_group)) + 1e-9) / (np.expm1(other) + 1e-9))
    return changes


def _rank_genes_groups_layout(scores, signed, changes, var_names: pd.Index) -> dict:
    """Record arrays with one field per group, each sorted by descending score (Scanpy's layout)."""
    groups = list(scores)
    order = {g: np.argsort(-np.nan_to_num(scores[g], nan=-np.inf), kind="stable") for g in groups}
    names = np.asarray(var_names, dtype=object)

    def record(values, dtype):
        columns = [np.asarray(values(g)[order[g]], dtype=dtype) for g in groups]
        return np.rec.fromarrays(columns, names=groups)

    nan = np.full(len(names), np.nan)
    return {
        "names": record(lambda g: names, "U50" if names.size == 0 else f"U{max(len(n) for n in names)}"),
        "scores": record(lambda g: scores[g], np.float32),
        "signed_scores": record(lambda g: signed[g], np.float32),
        "logfoldchanges": record(lambda g: changes[g], np.float32),
        "pvals": record(lambda g: nan, np.float64),
        "pvals_adj": record(lambda g: nan, np.float64),
    }
