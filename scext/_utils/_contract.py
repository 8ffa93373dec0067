"""The input contract every tool checks before any work: the AnnData, the numbers, the slots it will write.

Each check raises a `ValueError` (a `KeyError` for a missing key) whose message names the argument and the
fix; none of them modifies the AnnData. Tools call them first, then train, then write every slot at the end.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from anndata import AnnData
from scanpy import logging as logg


def check_adata(adata: AnnData, tool: str, *, copy: bool = False) -> None:
    """A non-empty AnnData with unique gene names; a backed one only without ``copy=True``."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"{tool}: adata must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError(f"{tool}: adata has no cells (0 x {adata.n_vars}).")
    if adata.n_vars == 0:
        raise ValueError(f"{tool}: adata has no genes ({adata.n_obs} x 0).")
    if not adata.var_names.is_unique:
        duplicated = list(adata.var_names[adata.var_names.duplicated()].unique()[:5])
        raise ValueError(
            f"{tool}: adata.var_names are not unique (e.g. {duplicated}); genes are matched by name. Call "
            "adata.var_names_make_unique() first."
        )
    if copy and adata.isbacked:
        raise ValueError(
            f"{tool}: copy=True needs an AnnData in memory, but adata is backed by {adata.filename}. Pass "
            "copy=False (results are written into the backed AnnData's in-memory slots), or load it with "
            "adata.to_memory() first."
        )


def check_int(value, name: str, *, minimum: int = 1, allow_none: bool = False) -> None:
    """An int (not a bool) of at least `minimum`, or None where `allow_none`."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int of at least {minimum}{extra}, got {value!r}.")


def check_ints(values, name: str, *, minimum: int = 1, allow_empty: bool = False) -> None:
    """A sequence of ints of at least `minimum` each (layer widths, heads)."""
    if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        values = [values]
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}.") from None
    if not values and not allow_empty:
        raise ValueError(f"{name} must hold at least one int, got {values!r}.")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must hold ints of at least {minimum}, got {values!r}.")


def check_number(
    value,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """A finite real number in [low, high] (open at `low` / `high` with `open_low` / `open_high`)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not np.isfinite(value)
    ):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    below = value <= low if open_low else value < low if low is not None else False
    above = value >= high if open_high else value > high if high is not None else False
    if (low is not None and below) or (high is not None and above):
        interval = (
            f"{'(' if open_low else '['}{low if low is not None else '-inf'}, "
            f"{high if high is not None else 'inf'}{')' if open_high else ']'}"
        )
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")


def slot_exists(adata: AnnData, store: str, name: str) -> bool:
    if store in ("obs", "var"):
        return name in getattr(adata, store).columns
    return name in getattr(adata, store)


def claim_slots(
    adata: AnnData, tool: str, key_added: str, record: str, slots: Iterable[tuple[str, str]]
) -> bool:
    """Refuse to write over slots another call made; True when this is a rerun of `tool` in `key_added`.

    `record` is the ``uns`` entry in which the tool notes that it wrote this namespace (``uns[record]
    ["params"]["tool"]``, or ``uns[record]["tool"]``). Slots (``(store, name)``, e.g. ``("obs", "cicl")``)
    may be overwritten only when that record names `tool`: a rerun with the same `key_added` replaces its own
    results and logs it. Any other existing slot (a labels column, another tool's model) is refused with an
    error naming it and `key_added`.
    """
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"{tool}: key_added must be a non-empty string, got {key_added!r}.")
    owner = _owner(adata.uns.get(record))
    taken = [f"{store}[{name!r}]" for store, name in slots if slot_exists(adata, store, name)]
    if not taken:
        return False
    if owner == tool:
        logg.info(f"    {tool}: replacing the results of an earlier call with key_added={key_added!r}")
        return True
    made_by = f" (written by {owner})" if owner else ""
    raise ValueError(
        f"{tool}: key_added={key_added!r} would overwrite {', '.join(taken)}{made_by}, which this tool did not "
        f"write. Pass another key_added, or delete those slots first."
    )


def _owner(record) -> str | None:
    if not hasattr(record, "get"):
        return None
    params = record.get("params")
    tool = params.get("tool") if hasattr(params, "get") else None
    tool = tool if tool is not None else record.get("tool")
    return None if tool is None else str(tool)
