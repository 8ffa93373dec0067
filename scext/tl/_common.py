"""What the ``tl.<tool>_predict`` functions share: the checks before any work, in one order."""

from __future__ import annotations

import torch
from anndata import AnnData

from .._utils import resolve_device
from .._utils._contract import check_adata, check_int, claim_slots
from ..models import Model


def begin_prediction(
    adata: AnnData,
    model,
    model_class: type[Model],
    *,
    tool: str,
    key: str,
    key_added: str | None,
    device,
    chunk_size: int | None,
    copy: bool,
    label_suffix: str = "",
) -> tuple[Model, torch.device, str]:
    """Check a predict call before any work; the model, the device and the resolved `key_added`.

    Order: the AnnData (`check_adata`), `chunk_size`, the device, the model (an object or a reference
    AnnData), the model's genes in `adata` (a missing gene is the first error a user should see), then the
    slots the call writes: ``obsm["X_<key_added>"]``, ``obsm["<key_added>_proba"]``, the labels column
    ``obs["<key_added><label_suffix>"]`` with its colours, and the record ``uns["<key_added>_predict"]``.
    """
    key_added = key if key_added is None else key_added
    check_adata(adata, tool, copy=copy)
    check_int(chunk_size, "chunk_size", allow_none=True)
    torch_device = resolve_device(device)
    model = model_class.resolve(model, key)
    model.aligned_matrix(adata)
    label_column = f"{key_added}{label_suffix}"
    claim_slots(
        adata,
        tool,
        key_added,
        f"{key_added}_predict",
        [
            ("obsm", f"X_{key_added}"),
            ("obsm", f"{key_added}_proba"),
            ("obs", label_column),
            ("uns", f"{label_column}_colors"),
            ("uns", f"{key_added}_predict"),
        ],
    )
    return model, torch_device, key_added
