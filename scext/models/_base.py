"""What every scext model class shares: genes, persistence, the params record, alignment to new data.

A model class (`Kratos`, `Cicl`, `CellVGAE`, `Scdefer`) holds a plain `torch.nn.Module` (``net``, no
AnnData inside), the genes it reads and whatever it needs to place new cells. It describes itself by two
hooks, and this base class turns them into files, ``adata.uns`` entries and checks:

- ``_config()``: plain JSON-able values (sizes, names, choices), enough to build the module again;
- ``_arrays()``: named groups of numpy arrays (``"state_dict"`` always; scalers, centres, reference cells);
- ``_build(config, arrays)``: the model again from those two, with the weights loaded.

Files hold tensors and plain types only and load with ``torch.load(weights_only=True)``: a model file from a
stranger cannot run code. Before any module is built from a header, the module is first built on torch's
``meta`` device (no memory) and its parameter shapes compared with the stored tensors, so a header that
asks for a layer a million wide fails with a clear error instead of allocating gigabytes.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from torch import nn

from .._utils import SelectedColumns, get_matrix

#: files written by `Model.save` carry this format number; a reader refuses another major scext version
FORMAT = 1


def scext_version() -> str:
    from .. import __version__

    return __version__


def major_version(version: str) -> str:
    """The part of a version that must match for a saved model to load: ``"0.1"`` of ``0.1.3`` before 1.0
    (0.x releases may break formats at each minor), else the major number."""
    parts = str(version).split(".")
    return ".".join(parts[:2]) if parts[0] == "0" else parts[0]


class Model:
    """Base class of scext's model classes: fit, embed, predict, save, load, and read from an AnnData.

    Subclasses set `name` (the tool's name, used for files and messages), `tool` (the `scext.tl` function
    that trains it) and implement ``_config``, ``_arrays``, ``_build``, ``fit``, ``transform`` and
    ``predict``. ``var_names``, ``layer`` and ``use_raw`` say where the model reads expression.
    """

    name: ClassVar[str] = "model"
    tool: ClassVar[str] = "scext.tl"
    #: the method's name as its paper writes it, for messages
    method: ClassVar[str] = "scext"
    #: modules to import before a module is built on the meta device (see `_check_shapes`)
    imports_before_meta: ClassVar[tuple[str, ...]] = ()
    net: nn.Module
    var_names: pd.Index
    layer: str | None = None
    use_raw: bool = False

    # ------------------------------------------------------------------ hooks
    def _config(self) -> dict:
        raise NotImplementedError

    def _arrays(self) -> dict[str, dict[str, np.ndarray]]:
        raise NotImplementedError

    @classmethod
    def _build(cls, config: dict, arrays: dict[str, dict[str, np.ndarray]]) -> Model:
        raise NotImplementedError

    def fit(self, *args, **kwargs):
        raise NotImplementedError

    def embed_and_predict(self, adata: AnnData, **kwargs) -> tuple[np.ndarray, pd.Categorical, np.ndarray]:
        """Embedding, labels (categorical) and probabilities or soft assignments of the cells of `adata`."""
        raise NotImplementedError

    def transform(self, adata: AnnData, **kwargs) -> np.ndarray:
        """The embedding of the cells of `adata` (genes matched by name)."""
        return self.embed_and_predict(adata, **kwargs)[0]

    def predict(self, adata: AnnData, **kwargs) -> tuple[pd.Categorical, np.ndarray]:
        """Labels (categorical) and probabilities or soft assignments of the cells of `adata`."""
        return self.embed_and_predict(adata, **kwargs)[1:]

    # ------------------------------------------------------------------ genes
    def aligned_matrix(self, adata: AnnData):
        """The AnnData's expression in this model's gene order; raises if genes are missing.

        Extra genes are ignored and the order may differ. Missing genes are a `ValueError` naming them.
        """
        matrix, var_names = get_matrix(adata, layer=self.layer, use_raw=self.use_raw, backed=True)
        if var_names.equals(self.var_names):
            return matrix
        if not var_names.is_unique:
            duplicated = list(var_names[var_names.duplicated()].unique()[:5])
            raise ValueError(
                f"The AnnData's gene names are not unique (e.g. {duplicated}); call "
                "adata.var_names_make_unique() so that genes can be matched to the model's."
            )
        position = var_names.get_indexer(self.var_names)
        missing = self.var_names[position < 0]
        if len(missing):
            raise ValueError(
                f"The AnnData lacks {len(missing)} of the {self.method} model's {len(self.var_names)} genes "
                f"(e.g. {list(missing[:5])}). The model needs every gene it was trained on "
                "(model.var_names); extra genes are fine. Use data that has them (e.g. before subsetting "
                "to highly variable genes), or retrain on the genes both data sets share."
            )
        return SelectedColumns(matrix, position)

    # ------------------------------------------------------------------ adata.uns
    def to_dict(self) -> dict:
        """Plain types and numpy arrays only, so the model fits in ``adata.uns`` and in an h5ad file."""
        return {
            "header": json.dumps(self._header()),
            **{group: dict(values) for group, values in self._arrays().items()},
        }

    @classmethod
    def from_dict(cls, state: Mapping) -> Model:
        if "header" not in state:
            raise ValueError(
                f"This is not a stored scext model (no 'header'); it cannot be read as {cls.__name__}."
            )
        header = json.loads(str(state["header"]))
        arrays = {
            group: {k: np.asarray(v) for k, v in values.items()}
            for group, values in state.items()
            if group != "header" and isinstance(values, Mapping)
        }
        return cls._from_parts(header, arrays)

    @classmethod
    def from_adata(cls, adata: AnnData, key: str | None = None) -> Model:
        """The model that ``scext.tl.<tool>(..., key_added=key)`` stored in ``adata.uns[key]["model"]``."""
        key = cls.name if key is None else key
        if key not in adata.uns or "model" not in adata.uns[key]:
            raise KeyError(
                f"adata.uns[{key!r}] holds no {cls.method} model; run {cls.tool}(adata, ...) first."
            )
        try:
            return cls.from_dict(adata.uns[key]["model"])
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as err:
            raise ValueError(
                f"adata.uns[{key!r}]['model'] is not a readable {cls.method} model ({type(err).__name__}: {err}); "
                f"it was edited or damaged. Retrain with {cls.tool}."
            ) from None

    @classmethod
    def resolve(cls, model, key: str | None = None) -> Model:
        """`model` itself, or the model stored in a reference AnnData at ``uns[key]`` (the `model` argument
        of every ``tl.<tool>_predict``)."""
        if isinstance(model, AnnData):
            return cls.from_adata(model, key)
        if not isinstance(model, cls):
            raise TypeError(
                f"model must be a scext.models.{cls.__name__} or an AnnData that {cls.tool} was run on, got "
                f"{type(model).__name__}."
            )
        return model

    # ------------------------------------------------------------------ files
    @classmethod
    def file_name(cls) -> str:
        return f"{cls.name}_model.pt"

    def save(self, directory: str | Path, overwrite: bool = False) -> None:
        """Write the model to ``directory/<name>_model.pt``: tensors and plain types only."""
        directory = Path(directory)
        path = directory / self.file_name()
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            group: {k: torch.as_tensor(np.asarray(v, order="C")) for k, v in values.items()}
            for group, values in self._arrays().items()
        }
        torch.save({"header": json.dumps(self._header()), **tensors}, path)

    @classmethod
    def load(cls, directory: str | Path, adata: AnnData | None = None) -> Model:
        """Read a model written by `save`; with `adata`, check that its genes cover the model's.

        The file is read with ``torch.load(weights_only=True)``, so it cannot execute code; its header is
        checked (model class, scext version, shapes) before any module is built.
        """
        path = Path(directory)
        if path.is_dir():
            path = path / cls.file_name()
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist; save a {cls.__name__} there with model.save(directory)."
            )
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a refused pickle or a corrupt file, reported as one error
            raise ValueError(
                f"{path} is not a scext model file that can be read safely ({type(err).__name__}: {err})."
            ) from None
        if not isinstance(saved, dict) or "header" not in saved:
            raise ValueError(f"{path} is not a scext model file (it has no header).")
        arrays = {
            group: {k: v.numpy() for k, v in values.items()}
            for group, values in saved.items()
            if group != "header" and isinstance(values, dict)
        }
        model = cls._from_parts(json.loads(saved["header"]), arrays)
        if adata is not None:
            model.aligned_matrix(adata)
        return model

    # ------------------------------------------------------------------ checks
    def _header(self) -> dict:
        return {
            "model_class": type(self).__name__,
            "format": FORMAT,
            "scext_version": scext_version(),
            "config": self._config(),
        }

    @classmethod
    def _from_parts(cls, header: dict, arrays: dict) -> Model:
        saved_class = header.get("model_class")
        if saved_class != cls.__name__:
            raise ValueError(
                f"This file holds a {saved_class} model, not a {cls.__name__}; load it with "
                f"scext.models.{saved_class}.load."
            )
        saved_version = str(header.get("scext_version", "unknown"))
        if major_version(saved_version) != major_version(scext_version()):
            raise ValueError(
                f"This {cls.__name__} model was written by scext {saved_version}; this is scext "
                f"{scext_version()}, which reads models of version {major_version(scext_version())}.x only. "
                "Retrain the model, or load it with the scext version that wrote it."
            )
        if "state_dict" not in arrays:
            raise ValueError(f"The stored {cls.__name__} model has no weights ('state_dict').")
        config = header["config"]
        cls._check_shapes(config, arrays)
        return cls._build(config, arrays)

    @classmethod
    def _check_shapes(cls, config: dict, arrays: dict) -> None:
        """Build the module on the meta device (no memory) and compare its shapes with the stored weights."""
        for module in cls.imports_before_meta:
            # a library's first import must not create its module-level tensors on the meta device
            importlib.import_module(module)
        try:
            with torch.device("meta"):
                skeleton = cls._build_net(config, arrays)
        except (TypeError, ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"The stored {cls.__name__} header is invalid: {err}") from None
        expected = {name: tuple(value.shape) for name, value in skeleton.state_dict().items()}
        stored = {name: tuple(np.shape(value)) for name, value in arrays["state_dict"].items()}
        if expected != stored:
            wrong = sorted(
                name for name in expected.keys() | stored.keys() if expected.get(name) != stored.get(name)
            )
            raise ValueError(
                f"The stored {cls.__name__} weights do not match its header: {wrong[:5]} "
                f"(header asks for {[expected.get(n) for n in wrong[:5]]}, file holds "
                f"{[stored.get(n) for n in wrong[:5]]}). The file is damaged or was edited."
            )
        for name, value in arrays["state_dict"].items():
            if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all():
                raise ValueError(f"The stored {cls.__name__} weight {name!r} holds NaN or infinite values.")

    @classmethod
    def _build_net(cls, config: dict, arrays: dict) -> nn.Module:
        """The untrained module a header describes (called on the meta device by `_check_shapes`)."""
        raise NotImplementedError

    def _load_weights(self, state_dict: Mapping[str, np.ndarray]) -> None:
        self.net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state_dict.items()})
        self.net.eval()

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}


def params_record(function, arguments: Mapping[str, Any], **resolved) -> dict:
    """``uns[key]["params"]``: every argument of `function` as called (from ``locals()``), then `resolved`.

    Values become types an h5ad file stores: sequences of numbers become numpy arrays, `torch.device` its
    string, and AnnData / matrices are left out. The scext version is always added.
    """
    record = {
        "tool": function.__name__
    }  # claims the key_added namespace (`scext._utils._contract.claim_slots`)
    for name in inspect.signature(function).parameters:
        if name in ("adata", "model") or name not in arguments:
            continue
        record[name] = _plain(arguments[name])
    record.update({name: _plain(value) for name, value in resolved.items()})
    record["scext_version"] = scext_version()
    return record


def _plain(value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, Sequence) and all(
        isinstance(v, (int, np.integer, float, np.floating)) for v in value
    ):
        return np.asarray(
            value, dtype=np.int64 if all(isinstance(v, (int, np.integer)) for v in value) else float
        )
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return np.asarray(value, dtype=object)
    return f"<{type(value).__name__}>"  # a matrix or object passed as an argument: named, not stored
