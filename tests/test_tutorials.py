"""Every notebook in tutorials/ runs top to bottom, so the tutorials cannot rot.

The notebooks are executed on a copy in a temporary folder: the outputs stored in the repository are the
ones rendered for readers and are refreshed with ``jupyter execute --inplace tutorials/*.ipynb``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 1200


def needs_shared_data(path: Path) -> bool:
    """A notebook that reads ../shared/datasets says so in its metadata (``scext.needs_data``)."""
    return bool(json.loads(path.read_text())["metadata"].get("scext", {}).get("needs_data", False))


def test_every_tutorial_is_listed_in_the_tutorials_readme():
    listed = (TUTORIALS / "README.md").read_text()
    assert NOTEBOOKS, "tutorials/ holds no notebook"
    for path in NOTEBOOKS:
        assert path.name in listed, f"{path.name} is missing from tutorials/README.md"


@pytest.mark.tutorial
@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=[pytest.mark.data] if needs_shared_data(p) else [], id=p.stem) for p in NOTEBOOKS],
)
def test_tutorial_runs_top_to_bottom(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
