from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scanpy import logging as logg
from sklearn.metrics import accuracy_score, f1_score

from .._docs import doc_params
from .._utils import get_matrix, matrix_source, resolve_device, seed_everything, stratified_split
from .._utils._arguments import renamed_arguments
from .._utils._contract import check_adata, check_int, check_ints, check_number, claim_slots
from .._utils._device import keeps_torch_threads
from .._utils._random import preserves_global_rng
from ..metrics import clustering_scores
from ..models import Kratos, normalized_prior
from ..models._base import params_record
from ..train._distributed import rank_zero_logging
from ._common import begin_prediction

SPLITS = ["train", "validation", "test", "unlabeled"]


@renamed_arguments(pretrain_epochs="n_pretrain_epochs", init="weight_init")
@rank_zero_logging
@keeps_torch_threads
@preserves_global_rng
@doc_params
def kratos(
    adata: AnnData,
    groupby: str,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    hidden_sizes: Sequence[int] = (256, 64),
    backbone: str = "mlp",
    prior_graph: str | None = None,
    prior_diagonal: str = "zero",
    gene_dim: int = 8,
    key_dim: int = 8,
    weight_init: str = "random",
    n_pretrain_epochs: int = 20,
    n_epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 64,
    test_size: float = 0.3,
    validation_size: float = 0.1,
    patience: int | None = 10,
    scale: bool = True,
    device: str | torch.device = "auto",
    random_state: int = 0,
    progress_bar: bool | None = None,
    key_added: str = "kratos",
    copy: bool = False,
) -> AnnData | None:
    """Train the KRATOS classifier and embed every cell in its last hidden layer.

    KRATOS fuses dimensionality reduction and clustering into one supervised network: genes -> 256 ReLU ->
    64 ReLU -> K softmax, trained with Adam on the binary cross-entropy of the softmax against one-hot labels.
    The 64-d layer is the embedding. Cells are split per class into train and test sets (the paper's 0.7 /
    0.3), and `validation_size` of the training cells are held out for early stopping. Cells whose label is
    missing are not trained on but are classified (split ``"unlabeled"``). `scext.tl.rank_genes_perturbation`
    then ranks genes per class; `scext.tl.kratos_predict` classifies new cells.

    Under ``torchrun`` with an initialised process group, training is data-parallel over the ranks, with the
    same results as one process (:ref:`distributed`). The :doc:`KRATOS page </methods/kratos>` has the model.

    Parameters
    ----------
    adata
        Cells x genes; any preprocessing (log-normalised counts are typical). May be backed
        (``anndata.read_h5ad(path, backed="r")``): ``X`` is then streamed from disk, never loaded whole.
    groupby
        Column of ``adata.obs`` with the cell-type labels to learn.
    {layer}
        Sparse input stays sparse; only minibatches are densified.
    hidden_sizes
        Hidden layer widths; the last is the embedding size.
    backbone
        ``"mlp"`` (the paper's network) or ``"gene_gcn"``: the gene-interaction GCN feature smoothing
        before the classifier (`scext.models.GeneGraphSmoothing`; :doc:`/methods/gene_gcn`). Its cost grows
        with the genes squared per cell: select a few hundred to a few thousand genes first.
    prior_graph
        Key of ``adata.varp`` holding a genes x genes interaction-score matrix (e.g. STRING scores), the prior
        graph of ``gene_gcn``; scores are divided by their maximum.
    prior_diagonal
        ``"zero"`` or ``"one"``: the prior graph's diagonal.
    gene_dim, key_dim
        Gene feature size d and key size d_k of ``gene_gcn``.
    weight_init
        ``"random"`` or ``"autoencoder"``: first train the layers up to the embedding as the encoder of an
        autoencoder on the training cells, for `n_pretrain_epochs`.
    n_pretrain_epochs
        Epochs of the autoencoder pretraining (``weight_init="autoencoder"`` only).
    n_epochs, lr, batch_size
        Adam training; the paper's 100, 1e-3 and 64. Under ``torchrun``, `batch_size` is the global minibatch.
    test_size, validation_size
        Fraction of each class held out for testing, and of the training cells for early stopping. With
        ``test_size=0`` every labelled cell trains the model (no test metrics).
    patience
        Epochs without improvement of the validation loss before stopping; the best epoch's weights are
        kept. ``None`` trains all `n_epochs`.
    scale
        Standardise each gene with the mean and standard deviation of the training cells. The same scaler is
        used for training, prediction and every explanation method.
    device
        ``"auto"`` (CUDA if available, else CPU; under torchrun, this rank's GPU), ``"cpu"``, ``"cuda"``,
        ``"cuda:1"`` or a `torch.device`.
    random_state
        Seeds the split, the initial weights and the minibatch order. Runs on the CPU are reproducible; on
        CUDA, results agree to float tolerance, not bit for bit.
    {progress_bar}
    {key_added}
    {copy}

    Returns
    -------
    `None`, or the copy when ``copy=True``. Writes:

    ``obsm["X_<key_added>"]``
        The embedding (last hidden layer) of every cell; use with ``sc.pp.neighbors(use_rep=...)``.
    ``obsm["<key_added>_proba"]``
        Class probabilities, columns in the order of ``uns[key_added]["classes"]``.
    ``obs["<key_added>_pred"]``
        Predicted class (categorical); ``uns["<key_added>_pred_colors"]`` takes the colours of
        ``uns["<groupby>_colors"]`` when Scanpy has set them, so a class looks the same in both plots.
    ``obs["<key_added>_split"]``
        ``train`` / ``validation`` / ``test`` / ``unlabeled``.
    ``uns[key_added]``
        ``params``, ``history`` (loss and accuracy per epoch, train and validation), ``classes``,
        ``test_accuracy``, ``test_macro_f1``, ``test_ari``, ``test_ami`` (predictions vs `groupby` on the
        test cells), ``silhouette`` (of the test cells' embedding, grouped by `groupby`) and ``model`` (the
        trained network; `scext.models.Kratos.from_adata` rebuilds it, `scext.tl.kratos_predict` uses it).

    References
    ----------
    Zihan Zhou, Zijia Du and Somali Chaterji. KRATOS: Context-Aware Cell Type Classification and
    Interpretation Using Joint Dimensionality Reduction and Clustering. KDD '22, ACM, 2022.
    doi:10.1145/3534678.3539455
    """
    arguments = dict(locals())
    start = logg.info(f"training KRATOS classifier on {groupby!r}")
    check_adata(adata, "kratos", copy=copy)
    torch_device = resolve_device(device)
    labels = _validated_labels(adata, groupby)
    _check_fractions(test_size, validation_size)
    if weight_init not in ("random", "autoencoder"):
        raise ValueError(f"weight_init={weight_init!r} is unknown; choose 'random' or 'autoencoder'.")
    check_ints(hidden_sizes, "hidden_sizes")
    check_int(n_epochs, "n_epochs")
    check_int(n_pretrain_epochs, "n_pretrain_epochs", minimum=0)
    check_int(batch_size, "batch_size")
    check_int(patience, "patience", allow_none=True)
    check_int(gene_dim, "gene_dim")
    check_int(key_dim, "key_dim")
    check_number(lr, "lr", low=0, open_low=True)
    claim_slots(
        adata,
        "kratos",
        key_added,
        key_added,
        [
            ("obsm", f"X_{key_added}"),
            ("obsm", f"{key_added}_proba"),
            ("obs", f"{key_added}_pred"),
            ("obs", f"{key_added}_split"),
            ("uns", key_added),
            ("uns", f"{key_added}_pred_colors"),
        ],
    )
    matrix, var_names = get_matrix(adata, layer=layer, use_raw=use_raw, backed=True)
    prior = _prior(adata, prior_graph, prior_diagonal, use_raw)
    rng, generator = seed_everything(random_state)

    classes = list(labels.cat.categories)
    codes = labels.cat.codes.to_numpy()
    labelled = np.flatnonzero(codes >= 0)
    is_test = np.zeros(len(codes), dtype=bool)
    is_test[labelled] = stratified_split(codes[labelled], test_size, rng)
    train_pool = labelled[~is_test[labelled]]
    is_validation = np.zeros(len(codes), dtype=bool)
    is_validation[train_pool] = stratified_split(codes[train_pool], validation_size, rng)
    train_rows = train_pool[~is_validation[train_pool]]
    validation_rows = np.flatnonzero(is_validation)
    test_rows = np.flatnonzero(is_test)

    model = Kratos(
        var_names,
        classes,
        hidden_sizes,
        layer=layer,
        use_raw=use_raw,
        backbone=backbone,
        gene_dim=gene_dim,
        key_dim=key_dim,
        prior=prior,
    )
    model.fit_scaler(matrix, train_rows, scale=scale)
    # pretraining and training share the optimiser settings and the minibatch generator
    shared = {
        "lr": lr,
        "batch_size": batch_size,
        "device": torch_device,
        "generator": generator,
        "progress_bar": progress_bar,
    }
    pretraining = {}
    if weight_init == "autoencoder":
        pretraining = model.pretrain_autoencoder(matrix, train_rows, n_epochs=n_pretrain_epochs, **shared)
    history = model.fit(
        matrix,
        np.where(codes >= 0, codes, 0),
        train_rows,
        validation_rows,
        n_epochs=n_epochs,
        patience=patience,
        **shared,
    )
    embedding, proba = model.embed_and_classify(matrix, torch_device)
    predicted = proba.argmax(axis=1)

    split = np.full(len(codes), "unlabeled", dtype=object)
    split[train_rows], split[validation_rows], split[test_rows] = "train", "validation", "test"
    summary = _test_summary(codes, predicted, embedding, test_rows, classes, random_state)

    if copy:
        adata = adata.copy()
    adata.obsm[f"X_{key_added}"] = embedding
    adata.obsm[f"{key_added}_proba"] = proba
    adata.obs[f"{key_added}_pred"] = pd.Categorical.from_codes(predicted, categories=classes)
    _copy_colors(adata, groupby, f"{key_added}_pred")
    adata.obs[f"{key_added}_split"] = pd.Categorical(split, categories=SPLITS)
    adata.uns[key_added] = {
        "params": params_record(
            kratos,
            arguments,
            input=matrix_source(layer, use_raw),
            n_pretrain_epochs=n_pretrain_epochs if weight_init == "autoencoder" else 0,
            device=torch_device,
        ),
        "history": {
            **{name: np.asarray(values) for name, values in history.items()},
            **{f"pretrain_{name}": np.asarray(values) for name, values in pretraining.items()},
        },
        "classes": np.asarray(classes, dtype=object),
        **summary,
        "model": model.to_dict(),
    }
    accuracy = summary.get("test_accuracy", float("nan"))
    logg.info(
        f"    finished (test accuracy {accuracy:.3f})",
        time=start,
        deep=(
            f"added\n    'X_{key_added}', embedding (adata.obsm)\n    '{key_added}_proba' (adata.obsm)\n"
            f"    '{key_added}_pred', '{key_added}_split' (adata.obs)\n    '{key_added}' (adata.uns)"
        ),
    )
    return adata if copy else None


@renamed_arguments(batch_size="chunk_size")
@keeps_torch_threads
@preserves_global_rng
@doc_params
def kratos_predict(
    adata: AnnData,
    model: Kratos | AnnData,
    *,
    key: str = "kratos",
    device: str | torch.device = "auto",
    chunk_size: int = 4096,
    key_added: str | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Classify and embed the cells of `adata` with a trained KRATOS model.

    Parameters
    ----------
    adata
        New cells. Must hold every gene of the model, in the same units (layer, normalisation) as the
        training data; extra genes are ignored and the order may differ.
    {predict_model}
    {device}
    chunk_size
        Cells embedded at once (memory: chunk_size x genes floats); results do not depend on it.
    {copy}

    Returns
    -------
    `None`, or the copy when ``copy=True``. Writes ``obsm["X_<key_added>"]``, ``obsm["<key_added>_proba"]``,
    ``obs["<key_added>_pred"]`` as `scext.tl.kratos` does, and ``uns["<key_added>_predict"]["classes"]``.
    """
    arguments = dict(locals())
    start = logg.info("classifying cells with a trained KRATOS model")
    reference = model
    model, torch_device, key_added = begin_prediction(
        adata,
        model,
        Kratos,
        tool="kratos_predict",
        key=key,
        key_added=key_added,
        device=device,
        chunk_size=chunk_size,
        copy=copy,
        label_suffix="_pred",
    )
    matrix = model.aligned_matrix(adata)
    embedding, proba = model.embed_and_classify(matrix, torch_device, chunk_size)
    if copy:
        adata = adata.copy()
    adata.obsm[f"X_{key_added}"] = embedding
    adata.obsm[f"{key_added}_proba"] = proba
    adata.obs[f"{key_added}_pred"] = pd.Categorical.from_codes(proba.argmax(axis=1), categories=model.classes)
    if isinstance(reference, AnnData) and f"{key}_pred_colors" in reference.uns:
        adata.uns[f"{key_added}_pred_colors"] = list(reference.uns[f"{key}_pred_colors"])
    adata.uns[f"{key_added}_predict"] = {
        "params": params_record(kratos_predict, arguments, key_added=key_added, device=torch_device),
        "classes": np.asarray(model.classes, dtype=object),
    }
    logg.info(
        "    finished", time=start, deep=f"added 'X_{key_added}', '{key_added}_proba', '{key_added}_pred'"
    )
    return adata if copy else None


def _copy_colors(adata: AnnData, source: str, target: str) -> None:
    """Give the predictions the label column's Scanpy colours, so a class looks the same in both plots."""
    colors = adata.uns.get(f"{source}_colors")
    categories = adata.obs[source].cat.categories if adata.obs[source].dtype == "category" else None
    if colors is None or categories is None or len(colors) != len(categories):
        return
    by_class = dict(zip(categories, colors, strict=True))
    classes = adata.obs[target].cat.categories
    if all(name in by_class for name in classes):
        adata.uns[f"{target}_colors"] = [by_class[name] for name in classes]


def _validated_labels(adata: AnnData, groupby: str) -> pd.Series:
    if groupby not in adata.obs:
        raise KeyError(
            f"groupby={groupby!r} is not a column of adata.obs (have: {list(adata.obs.columns)}); "
            "pass the column that holds the cell-type labels."
        )
    column = adata.obs[groupby]
    if isinstance(column.dtype, pd.CategoricalDtype):
        # keep the user's category order, which Scanpy's plots follow
        labels = column.cat.remove_unused_categories()
        labels = labels.cat.rename_categories([str(c) for c in labels.cat.categories])
    else:
        labels = column.astype(str).where(column.notna()).astype("category")
    counts = labels.value_counts()
    if len(counts) < 2:
        raise ValueError(f"obs[{groupby!r}] has {len(counts)} class(es); a classifier needs at least 2.")
    singletons = list(counts.index[counts < 2])
    if singletons:
        raise ValueError(
            f"obs[{groupby!r}] has classes with a single cell: {singletons}. A class needs at least two "
            "cells (one to train, one to test); merge or drop those cells first."
        )
    return labels


def _prior(adata: AnnData, key: str | None, diagonal: str, use_raw: bool):
    if key is None:
        return None
    if use_raw:
        raise ValueError(
            "prior_graph lives in adata.varp, whose genes are not those of adata.raw; use X or a layer."
        )
    if key not in adata.varp:
        raise KeyError(f"prior_graph={key!r} is not in adata.varp (have: {list(adata.varp.keys())}).")
    return normalized_prior(adata.varp[key], diagonal)


def _check_fractions(test_size: float, validation_size: float) -> None:
    for name, value in (("test_size", test_size), ("validation_size", validation_size)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}.")


def _test_summary(codes, predicted, embedding, test_rows, classes, random_state) -> dict:
    if len(test_rows) == 0:
        return {}
    truth, guess = codes[test_rows], predicted[test_rows]
    names = np.asarray(classes, dtype=object)
    scores = clustering_scores(names[truth], names[guess], embedding[test_rows], random_state=random_state)
    return {
        "test_accuracy": float(accuracy_score(truth, guess)),
        "test_macro_f1": float(f1_score(truth, guess, average="macro")),
        "test_ari": scores["ari"],
        "test_ami": scores["ami"],
        "silhouette": scores.get("silhouette", float("nan")),
    }
