"""Parameter descriptions shared by every tool, written once (as scanpy's ``_doc_params``).

A docstring names a fragment as ``{layer}`` on a line of its own, indented like a parameter name;
`doc_params` fills it in. Only the names below are replaced, so other braces in a docstring stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

FRAGMENTS = {
    "layer": """\
layer, use_raw
    Read expression from ``adata.layers[layer]`` or ``adata.raw`` instead of ``adata.X``.""",
    "device": """\
device
    ``"auto"`` (`scext.settings.device`, else the first CUDA device if there is one, else the CPU),
    ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a `torch.device`. Results are copied to the CPU at the end.""",
    "random_state": """\
random_state
    Seeds the weights, the minibatch order and every random draw. The same value gives the same numbers
    twice on the CPU; on CUDA, results agree to float tolerance only.""",
    "progress_bar": """\
progress_bar
    Show a bar over epochs; defaults to `scext.settings.progress_bar`.""",
    "key_added": """\
key_added
    Prefix of every slot written.""",
    "copy": """\
copy
    Return a copy with the results instead of writing to `adata`.""",
    "keep_model": """\
keep_model
    Store the trained model in ``adata.uns[key_added]["model"]`` (it survives ``write_h5ad`` /
    ``read_h5ad``), so that ``Model.from_adata`` and ``tl.<tool>_predict(new, adata)`` can use it.""",
    "show_save": """\
show
    Show the plot; defaults to ``sc.settings.autoshow``.
save
    ``True`` or a file-name suffix (e.g. ``"_pbmc.pdf"``), saved under ``sc.settings.figdir`` as Scanpy
    does.
return_fig
    Return the figure.""",
    "predict_model": """\
model
    A trained model object, or the reference AnnData the tool was run on (the model is read from
    ``uns[key]``).
key
    Where the model lives in the reference AnnData.
key_added
    Prefix of the slots written; defaults to `key`.""",
}


def doc_params(function: Callable) -> Callable:
    """Fill the shared fragments into `function`'s docstring, at the indentation of the placeholder."""
    doc = function.__doc__ or ""
    lines = []
    for line in doc.splitlines():
        name = line.strip()[1:-1] if line.strip().startswith("{") and line.strip().endswith("}") else None
        if name in FRAGMENTS:
            indent = line[: len(line) - len(line.lstrip())]
            lines.extend(indent + part if part else part for part in FRAGMENTS[name].splitlines())
        else:
            lines.append(line)
    function.__doc__ = "\n".join(lines)
    return function
