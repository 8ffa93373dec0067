"""Every notebook in tutorials/ runs top to bottom, so the tutorials cannot rot.

The notebooks are executed on copies, in a temporary folder: the outputs stored in the repository are the
ones rendered for readers and are refreshed with ``jupyter execute --inplace tutorials/*.ipynb``. The
selected notebooks run at the same time, each in its own single-threaded kernel: a notebook spends much
of its time in single-threaded code (numba compilation, UMAP, Python loops), so two cores finish the set
in about half the time of one after the other.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 1800
TEST_NAME = "test_tutorial_runs_top_to_bottom"


def needs_shared_data(path: Path) -> bool:
    """A notebook that reads ../shared/datasets says so in its metadata (``scext.needs_data``)."""
    return bool(json.loads(path.read_text())["metadata"].get("scext", {}).get("needs_data", False))


def execute(path: Path, workdir: Path) -> BaseException | None:
    """Run one notebook in a fresh kernel; the error it raised, or None."""
    notebook = nbformat.read(path, as_version=4)
    workdir.mkdir(parents=True, exist_ok=True)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    try:
        client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    except Exception as error:  # reported by the notebook's own test
        return error
    return None


@pytest.fixture(scope="session")
def tutorial_errors(request, tmp_path_factory) -> dict[str, BaseException | None]:
    """Execute every notebook whose test is selected and not skipped, concurrently; errors by file name."""
    selected = [
        item.callspec.params["path"]
        for item in request.session.items
        if item.originalname == TEST_NAME and item.get_closest_marker("skip") is None
    ]
    root = tmp_path_factory.mktemp("tutorials")
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # kernels inherit it: no oversubscription of the cores
    try:
        with ThreadPoolExecutor(max_workers=max(1, len(selected))) as pool:
            results = pool.map(lambda path: execute(path, root / path.stem), selected)
            return {path.name: error for path, error in zip(selected, results, strict=True)}
    finally:
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous


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
def test_tutorial_runs_top_to_bottom(path, tutorial_errors):
    error = tutorial_errors[path.name]
    if error is not None:
        raise error
