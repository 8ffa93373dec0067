from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(random_state: int) -> tuple[np.random.Generator, torch.Generator]:
    """Seed Python, numpy and torch, and return fresh generators for splits and minibatch order.

    The same `random_state` gives the same numbers twice on the CPU. On CUDA, some kernels (atomic adds in
    scatter/index operations, cuBLAS split-K) are not bit-reproducible; results agree to float tolerance.
    """
    if not isinstance(random_state, (int, np.integer)) or isinstance(random_state, bool):
        raise ValueError(f"random_state must be an int, got {random_state!r}.")
    random.seed(int(random_state))
    np.random.seed(int(random_state) % 2**32)  # noqa: NPY002 - third-party code draws from the global state
    torch.manual_seed(int(random_state))
    generator = torch.Generator()
    generator.manual_seed(int(random_state))
    return np.random.default_rng(int(random_state)), generator


def preserves_global_rng(function):
    """Run `function` with the caller's global random states (Python, numpy, torch CPU and CUDA) restored after.

    Tools seed the global generators for third-party code that draws from them (weight initialisation,
    UMAP); the caller's own random streams are left as they were, whatever the tool drew or raised.
    """
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        python_state, numpy_state = random.getstate(), np.random.get_state()  # noqa: NPY002
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            try:
                return function(*args, **kwargs)
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)  # noqa: NPY002

    return wrapper
