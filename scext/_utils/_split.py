from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask drawing `fraction` of each class (rounded), always leaving one cell of a class out.

    Unlike scikit-learn's stratified splitters this accepts classes of one or two cells: a class of one cell
    stays whole on the unmasked side, so tiny classes are still trained on.
    """
    mask = np.zeros(len(labels), dtype=bool)
    if fraction <= 0:
        return mask
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        n_drawn = min(int(round(fraction * len(members))), len(members) - 1)
        if n_drawn > 0:
            mask[rng.choice(members, size=n_drawn, replace=False)] = True
    return mask
