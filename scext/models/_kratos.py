"""KRATOS classifier (Zhou, Du & Chaterji, KDD 2022, sec. 4.2): genes -> 256 -> 64 -> K."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import nn

from .._utils import column_mean_var
from ..train import all_reduce_sum, iter_minibatches, map_minibatches, train_loop
from ._base import Model
from ._gene_gcn import GeneGraphSmoothing

BACKBONES = ("mlp", "gene_gcn")
CPU = torch.device("cpu")


class KratosNet(nn.Module):
    """Per-gene standardisation, an optional backbone (the gene-GCN feature smoothing), then fully
    connected ReLU layers (the last is the embedding), then logits.

    The standardisation is part of the module, so training, prediction and every explanation method see
    the same scaled input; explanations work in that scaled space (`forward_standardized`).

    Parameters
    ----------
    n_genes, n_classes
        Input and output widths.
    hidden_sizes
        Widths of the fully connected layers; the last is the embedding.
    smoothing
        A module applied to the standardised input first (`GeneGraphSmoothing`), or None.
    """

    def __init__(
        self,
        n_genes: int,
        n_classes: int,
        hidden_sizes: Sequence[int] = (256, 64),
        smoothing: nn.Module | None = None,
    ):
        super().__init__()
        self.smoothing = nn.Identity() if smoothing is None else smoothing
        self.register_buffer("center", torch.zeros(n_genes))
        self.register_buffer("scale", torch.ones(n_genes))
        layers: list[nn.Module] = []
        width = n_genes
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center) / self.scale

    def embed_standardized(self, z: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.smoothing(z))

    def forward_standardized(self, z: torch.Tensor) -> torch.Tensor:
        """Logits from already standardised input."""
        return self.head(self.embed_standardized(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_standardized(self.standardize(x))

    def embed_and_classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed_standardized(self.standardize(x))
        return embedding, torch.softmax(self.head(embedding), dim=1)


def one_vs_all_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 11: binary cross-entropy between the softmax output and the one-hot label, summed over classes."""
    log_p = torch.log_softmax(logits, dim=1)
    # log(1 - p) from log p without cancellation when p is near 1
    log_not_p = torch.log(-torch.expm1(log_p.clamp(max=-1e-7)))
    one_hot = torch.nn.functional.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return -(one_hot * log_p + (1 - one_hot) * log_not_p).sum(dim=1).mean()


class Kratos(Model):
    """A trained (or to-be-trained) KRATOS classifier with its genes, classes and scaler.

    Usually built by `scext.tl.kratos`, which stores it in ``adata.uns[key]["model"]``; get it back with
    `Kratos.from_adata`, or `save` / `load` it to a folder (`scext.models.Model`).

    Parameters
    ----------
    var_names
        Genes the model reads, in order.
    classes
        Class names; output column ``k`` is ``classes[k]``.
    hidden_sizes
        Widths of the hidden ReLU layers; the last one is the embedding.
    layer, use_raw
        Where the model reads expression in an AnnData (as in `scext.tl.kratos`).
    backbone
        ``"mlp"`` (the KRATOS classifier) or ``"gene_gcn"`` (the gene-GCN feature smoothing before it).
    gene_dim, key_dim
        Gene feature and key sizes of the ``gene_gcn`` backbone.
    prior
        Normalised prior gene graph for ``gene_gcn`` (`scext.models.normalized_prior`), or None.
    """

    name = "kratos"
    tool = "scext.tl.kratos"
    method = "KRATOS"

    def __init__(
        self,
        var_names: Sequence[str],
        classes: Sequence[str],
        hidden_sizes: Sequence[int] = (256, 64),
        layer: str | None = None,
        use_raw: bool = False,
        backbone: str = "mlp",
        gene_dim: int = 8,
        key_dim: int = 8,
        prior: sp.coo_matrix | None = None,
    ):
        if backbone not in BACKBONES:
            raise ValueError(f"backbone={backbone!r} is unknown; choose one of {BACKBONES}.")
        if prior is not None and backbone != "gene_gcn":
            raise ValueError("A prior gene graph is used by backbone='gene_gcn' only.")
        self.var_names = pd.Index([str(g) for g in var_names])
        self.classes = [str(c) for c in classes]
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.layer = layer
        self.use_raw = bool(use_raw)
        self.backbone = backbone
        self.gene_dim, self.key_dim = int(gene_dim), int(key_dim)
        self.prior = prior
        smoothing = (
            GeneGraphSmoothing(len(self.var_names), self.gene_dim, self.key_dim, prior)
            if backbone == "gene_gcn"
            else None
        )
        self.net = KratosNet(len(self.var_names), len(self.classes), self.hidden_sizes, smoothing)

    # ------------------------------------------------------------------ training
    def fit_scaler(self, matrix, rows: np.ndarray, scale: bool = True) -> None:
        """Fit the per-gene centre and scale on `rows` (the training cells) only, streamed in row blocks."""
        mean, var = column_mean_var(matrix, rows)
        std = np.sqrt(var)
        std[std == 0] = 1.0  # constant genes carry no signal; leave them at zero after centring
        if not scale:
            mean, std = np.zeros_like(mean), np.ones_like(std)
        self.net.center.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.net.scale.copy_(torch.as_tensor(std, dtype=torch.float32))

    def fit(
        self,
        matrix,
        labels: np.ndarray,
        train_rows: np.ndarray,
        validation_rows: np.ndarray,
        *,
        n_epochs: int = 100,
        lr: float = 1e-3,
        batch_size: int = 64,
        patience: int | None = 10,
        device: torch.device = CPU,
        generator: torch.Generator | None = None,
        progress_bar: bool | None = None,
    ) -> dict[str, list[float]]:
        """Train with Adam on eq. 11; early stopping on the validation loss. Returns the history.

        Data-parallel when a `torch.distributed` process group is initialised: every rank must call this
        with the same arguments; each trains on its shard of every minibatch and validates on its shard
        of the validation cells, and all ranks end with the same weights and history.
        """
        net = self.net.to(device)
        targets = torch.as_tensor(labels, dtype=torch.long, device=device)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)

        def step(batch):
            x, y = batch
            logits = net(x)
            return {"loss": one_vs_all_bce(logits, y), "accuracy": (logits.argmax(1) == y).float().mean()}

        def batches():
            return iter_minibatches(
                matrix,
                train_rows,
                batch_size,
                device,
                shuffle=True,
                generator=generator,
                extras=(targets,),
                distributed=True,
            )

        def validate():
            # [loss sum, correct]: one all-reduce gives every rank the same value, hence the same stopping
            totals = torch.zeros(2, device=device)
            for x, y in iter_minibatches(
                matrix, validation_rows, 4096, device, extras=(targets,), distributed=True
            ):
                if len(y):
                    logits = net(x)
                    totals[0] += one_vs_all_bce(logits, y) * len(y)
                    totals[1] += (logits.argmax(1) == y).sum()
            loss, correct = all_reduce_sum(totals) / len(validation_rows)
            return {"loss": loss, "accuracy": correct}

        has_validation = len(validation_rows) > 0
        return train_loop(
            net,
            optimizer,
            step=step,
            batches=batches,
            n_epochs=n_epochs,
            validate=validate if has_validation else None,
            patience=patience if has_validation else None,
            progress_bar=progress_bar,
            description="kratos",
            distributed=True,
        )

    def pretrain_autoencoder(
        self,
        matrix,
        train_rows: np.ndarray,
        *,
        n_epochs: int = 20,
        lr: float = 1e-3,
        batch_size: int = 64,
        device: torch.device = CPU,
        generator: torch.Generator | None = None,
        progress_bar: bool | None = None,
    ) -> dict[str, list[float]]:
        """Initialise the layers up to the embedding as the encoder of an autoencoder (gene-GCN report).

        The decoder mirrors the hidden layers back to the genes and is discarded afterwards; the loss is
        the MSE of the standardised expression. Labels are not used. Returns the history.
        """
        net = self.net.to(device)
        widths = [*reversed(self.hidden_sizes), len(self.var_names)]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        decoder = nn.Sequential(*layers[:-1]).to(device)  # linear output: standardised values are signed
        optimizer = torch.optim.Adam([*net.parameters(), *decoder.parameters()], lr=lr)
        autoencoder = nn.ModuleDict({"net": net, "decoder": decoder})

        def step(batch):
            z = net.standardize(batch[0])
            return {"loss": torch.nn.functional.mse_loss(decoder(net.embed_standardized(z)), z)}

        return train_loop(
            autoencoder,
            optimizer,
            step=step,
            batches=lambda: iter_minibatches(
                matrix, train_rows, batch_size, device, shuffle=True, generator=generator, distributed=True
            ),
            n_epochs=n_epochs,
            progress_bar=progress_bar,
            description="kratos autoencoder",
            distributed=True,
        )

    # ------------------------------------------------------------------ inference
    def embed_and_classify(
        self, matrix, device: torch.device = CPU, chunk_size: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embedding (last hidden layer) and class probabilities of every row, as numpy arrays."""
        net = self.net.to(device).eval()
        embedding, proba = map_minibatches(net.embed_and_classify, matrix, device, chunk_size)
        return embedding, proba

    def transform(self, adata: AnnData, *, device: torch.device = CPU, chunk_size: int = 4096) -> np.ndarray:
        """The embedding (last hidden layer) of every cell of `adata` (genes matched by name)."""
        return self.embed_and_classify(self.aligned_matrix(adata), device, chunk_size)[0]

    def embed_and_predict(
        self, adata: AnnData, *, device: torch.device = CPU, chunk_size: int = 4096
    ) -> tuple[np.ndarray, pd.Categorical, np.ndarray]:
        """Embedding, predicted classes (categorical over `classes`) and class probabilities of `adata`."""
        embedding, proba = self.embed_and_classify(self.aligned_matrix(adata), device, chunk_size)
        return embedding, pd.Categorical.from_codes(proba.argmax(axis=1), categories=self.classes), proba

    # ------------------------------------------------------------------ persistence
    def _config(self) -> dict:
        return {
            "var_names": list(self.var_names),
            "classes": list(self.classes),
            "hidden_sizes": list(self.hidden_sizes),
            "layer": self.layer,
            "use_raw": self.use_raw,
            "backbone": self.backbone,
            "gene_dim": self.gene_dim,
            "key_dim": self.key_dim,
        }

    def _arrays(self) -> dict[str, dict[str, np.ndarray]]:
        arrays = {"state_dict": self._state_arrays()}
        if self.prior is not None:
            arrays["prior"] = {"row": self.prior.row, "col": self.prior.col, "data": self.prior.data}
        return arrays

    @classmethod
    def _build_net(cls, config: dict, arrays: dict) -> nn.Module:
        # the prior graph is no parameter (it is stored beside the weights), so the shapes do not need it
        return cls._build(config, {}, weights=False).net

    @classmethod
    def _build(cls, config: dict, arrays: dict, weights: bool = True) -> Kratos:
        prior = arrays.get("prior")
        if prior is not None:
            n_genes = len(config["var_names"])
            prior = sp.coo_matrix(
                (np.asarray(prior["data"]), (np.asarray(prior["row"]), np.asarray(prior["col"]))),
                shape=(n_genes, n_genes),
            )
        model = cls(**config, prior=prior)
        if weights:
            model._load_weights(arrays["state_dict"])
        return model

    @classmethod
    def from_dict(cls, state: dict) -> Kratos:
        if "header" in state:
            return super().from_dict(state)
        # the layout of adata.uns["kratos"]["model"] written before the shared model interface
        config = {
            "var_names": [str(g) for g in state["var_names"]],
            "classes": [str(c) for c in state["classes"]],
            "hidden_sizes": [int(h) for h in state["hidden_sizes"]],
            "layer": state["layer"],
            "use_raw": bool(state["use_raw"]),
            "backbone": str(state.get("backbone", "mlp")),
            "gene_dim": int(state.get("gene_dim", 8)),
            "key_dim": int(state.get("key_dim", 8)),
        }
        arrays = {group: dict(state[group]) for group in ("state_dict", "prior") if group in state}
        cls._check_shapes(config, arrays)
        return cls._build(config, arrays)
