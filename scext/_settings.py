"""Package-wide defaults; verbosity is Scanpy's own (`sc.settings.verbosity`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ScextSettings:
    """Defaults that every `scext.tl` function falls back to.

    Attributes
    ----------
    device
        Used when a tool is called with ``device="auto"``: ``"auto"`` picks the first CUDA device when
        there is one, else the CPU. Any value a tool accepts (``"cpu"``, ``"cuda:1"``) may be set here.
    progress_bar
        Show a tqdm bar over training epochs. A tool's own ``progress_bar`` argument wins when given.
    """

    device: str = "auto"
    progress_bar: bool = True


settings = ScextSettings()
