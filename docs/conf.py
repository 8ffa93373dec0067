"""Sphinx configuration of the scext documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html``. Nothing here reaches the network: no
intersphinx inventories are fetched, and the tutorials are rendered from their stored outputs
(``nb_execution_mode = "off"``), never executed.
"""

from __future__ import annotations

import shutil
import warnings
from datetime import date
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).parent


def _copy_tutorials() -> None:
    """Copy the notebooks of ``tutorials/`` into ``docs/tutorials/`` (git-ignored), where Sphinx reads them.

    Copies rather than links: MyST resolves a notebook's relative links from its real path, so a symbolic
    link would point them outside the documentation. A copy is only rewritten when the notebook changed.
    """
    source, target = HERE.parent / "tutorials", HERE / "tutorials"
    notebooks = {path.name: path for path in source.glob("*.ipynb")}
    for stale in target.glob("*.ipynb"):
        if stale.name not in notebooks:
            stale.unlink()
    for name, path in notebooks.items():
        copy = target / name
        if not copy.exists() or copy.read_bytes() != path.read_bytes():
            shutil.copyfile(path, copy)


_copy_tutorials()

# sphinx-autodoc-typehints calls a Sphinx API that Sphinx 9 deprecates; harmless, and not ours to fix
warnings.filterwarnings("ignore", message=".*set_application.*", category=DeprecationWarning)

# -- Project ---------------------------------------------------------------------------------------------

project = "scext"
author = "scext developers"
copyright = f"{date.today():%Y}, {author}"  # noqa: A001
release = _version("scext")
version = release

# -- General ---------------------------------------------------------------------------------------------

extensions = [
    "myst_nb",  # Markdown pages (MyST) and notebooks; includes myst_parser
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # numpydoc-style docstrings
    "sphinx_autodoc_typehints",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}  # autosummary writes .rst
master_doc = "index"
default_role = "py:obj"  # `scext.tl.kratos` links; an unknown name renders as code, without a warning
pygments_style = "default"
nitpicky = False

# -- autodoc / autosummary / napoleon -------------------------------------------------------------------

autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_custom_sections = [("Writes", "returns_style")]
typehints_defaults = "braces"
always_document_param_types = False
typehints_document_rtype = True

# -- MyST / myst-nb --------------------------------------------------------------------------------------

myst_enable_extensions = [
    "amsmath",
    "colon_fence",
    "deflist",
    "dollarmath",
    "html_image",
    "html_admonition",
]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks carry their outputs; building the docs never runs them
nb_merge_streams = True
nb_output_stderr = "show"

# -- HTML ------------------------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "scext"
html_theme_options = {
    "repository_url": "https://github.com/scext/scext",
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
}
html_show_sphinx = False
