"""scext: deep-learning methods for single-cell RNA-seq, in the Scanpy / AnnData ecosystem."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scext")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from . import datasets, metrics, models, pl, tl  # noqa: E402
from ._settings import settings  # noqa: E402

__all__ = ["datasets", "metrics", "models", "pl", "settings", "tl", "__version__"]
