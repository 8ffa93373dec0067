from __future__ import annotations

import contextvars
import functools
import os

import torch
import torch.distributed as dist

from .._settings import settings


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a user's device argument into a `torch.device`, failing early when it is not there.

    ``"auto"`` defers to `scext.settings.device`, then to the first CUDA device if present, else the CPU.
    In a `torch.distributed` process group (torchrun, one process per GPU) it is this process's GPU,
    ``cuda:$LOCAL_RANK``. MPS is never chosen automatically (several ops scext needs are missing or slow
    there).
    """
    if isinstance(device, str) and device == "auto":
        device = settings.device
    if isinstance(device, str) and device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if not (dist.is_available() and dist.is_initialized()):
            return torch.device("cuda:0")
        # torchrun sets LOCAL_RANK; other launchers (mp.spawn) may not, and then ranks fill GPUs in turn.
        # An index past the last GPU is reported below rather than wrapped onto a GPU another rank uses.
        fallback = dist.get_rank() % torch.cuda.device_count()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", fallback)))
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a device torch knows; use 'auto', 'cpu' or 'cuda'."
        ) from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was asked for, but torch sees no CUDA device (torch {torch.__version__}). "
                "Use device='cpu', or install a CUDA build of torch (README, 'Set-up')."
            )
        index = resolved.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)."
            )
        resolved = torch.device("cuda", index)
    elif resolved.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device={device!r} was asked for, but MPS is not available here.")
    elif resolved.type != "cpu":
        raise ValueError(f"device={device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'mps'.")
    return resolved


# the caller's torch thread count while a tool decorated with `keeps_torch_threads` runs
_CALLER_THREADS: contextvars.ContextVar[int | None] = contextvars.ContextVar("caller_threads", default=None)


def keeps_torch_threads(function):
    """Run `function` with torch's intra-op thread count held at the caller's, and give it back after.

    The first parallel numba call of a process (Scanpy's ``normalize_total`` or ``neighbors``, pynndescent,
    UMAP) starts numba's OpenMP layer, which resets the OpenMP thread count torch shares with it to numba's
    own. A tool whose preprocessing or read-out makes that call would otherwise train with, and leave the
    caller with, numba's count instead of the one set by ``torch.set_num_threads``.
    `scext.train.train_loop` sets the caller's count again before training (`restore_caller_threads`).
    """

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        token = _CALLER_THREADS.set(threads)
        try:
            return function(*args, **kwargs)
        finally:
            _CALLER_THREADS.reset(token)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    return wrapper


def restore_caller_threads() -> None:
    """Inside a `keeps_torch_threads` tool: set torch's thread count back to the caller's, if it moved."""
    threads = _CALLER_THREADS.get()
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
