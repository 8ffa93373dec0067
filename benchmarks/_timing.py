"""Shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this folder is on the path)."""

from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def fit_seconds(model_class):
    """Within the block, time every ``model_class.fit`` call; yields the list the seconds are appended to.

    The tools build and train their model inside one call, so this is how a benchmark separates training
    from preprocessing and inference without changing the tool. The original method is restored on exit.
    """
    seconds: list[float] = []
    fit = model_class.fit

    def timed_fit(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fit(self, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    model_class.fit = timed_fit
    try:
        yield seconds
    finally:
        model_class.fit = fit
