"""Warnings that point at the user's line, whatever scext wrappers lie between."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent.parent)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` attributed to the first caller outside scext.

    A fixed `stacklevel` goes stale whenever a decorator (``renamed_arguments``, ``preserves_global_rng``)
    adds a frame; the warning would then name scext's wrapper instead of the user's call.
    """
    frame, level = sys._getframe(1), 2
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
