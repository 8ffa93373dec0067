"""The documentation: every public name is documented and listed in the API reference, and the Sphinx site
builds with warnings as errors.

The checks on sources run in a second. The build (marked ``docs``; deselect with ``-m "not docs"``) runs
``sphinx-build -W`` into a temporary folder, about 15 s, and needs the ``doc`` extra
(``pip install -e ".[doc]"``). It never reaches the network and never executes a notebook.
"""

from __future__ import annotations

import dataclasses
import html
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import scext

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API_PAGE = DOCS / "api.md"
MODULES = ("tl", "pl", "models", "metrics", "datasets")
SECTION_RULE = re.compile(r"-{3,}")
# Tracker numbers mean nothing to a reader: papers are cited by authors, title, venue and year.
TRACKER_NUMBER = re.compile(r"\bpaper 0\d\d\b|\bissue \d+\b|\bissue #\d+", re.IGNORECASE)


def public_names(module_name: str) -> list[str]:
    """``__all__`` of ``scext.<module_name>``, the names a user is promised (without one: the functions and
    classes the module defines under names without a leading underscore)."""
    module = importlib.import_module(f"scext.{module_name}")
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    ]


def public_objects():
    for module_name in MODULES:
        module = importlib.import_module(f"scext.{module_name}")
        for name in public_names(module_name):
            yield f"{module_name}.{name}", getattr(module, name)


PUBLIC = list(public_objects())


def numpydoc_sections(doc: str) -> dict[str, list[str]]:
    """The lines of each numpydoc section (``Parameters``, ``Returns``, ...) of a dedented docstring."""
    lines = doc.splitlines()
    sections: dict[str, list[str]] = {}
    current = None
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and SECTION_RULE.fullmatch(lines[i + 1].strip()) and line.strip():
            current = line.strip()
            sections[current] = []
        elif current is not None and not SECTION_RULE.fullmatch(line.strip()):
            sections[current].append(line)
    return sections


def documented_parameters(doc: str) -> set[str]:
    """Names in the Parameters section; ``a, b`` documents both, ``name : type`` is allowed."""
    names = set()
    for line in numpydoc_sections(doc).get("Parameters", []):
        if line and not line[0].isspace():
            names.update(part.strip().lstrip("*") for part in line.split(" : ")[0].split(","))
    return names


def signature_parameters(obj) -> list[str]:
    """The parameters a user passes: those of a function, or of a class's constructor."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in parameters if p.name != "self" and p.kind not in skip]


def api_entries() -> set[str]:
    """The ``module.name`` lines of the autosummary tables in docs/api.md."""
    text = API_PAGE.read_text()
    return set(re.findall(r"^\s+((?:tl|pl|models|metrics|datasets)\.\w+|settings)\s*$", text, re.MULTILINE))


@pytest.mark.parametrize("module_name", MODULES)
def test_public_module_declares_all(module_name):
    assert hasattr(importlib.import_module(f"scext.{module_name}"), "__all__")


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_in_the_api_reference(module_name):
    names = {f"{module_name}.{name}" for name in public_names(module_name)}
    entries = {entry for entry in api_entries() if entry.startswith(f"{module_name}.")}
    assert not names - entries, f"add to docs/api.md: {sorted(names - entries)}"
    assert not entries - names, f"docs/api.md lists names that are not public: {sorted(entries - names)}"


@pytest.mark.parametrize("qualname, obj", PUBLIC, ids=[qualname for qualname, _ in PUBLIC])
def test_public_name_has_a_docstring_with_every_parameter(qualname, obj):
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"scext.{qualname} has no docstring"
    parameters = signature_parameters(obj)
    if not parameters:
        return
    documented = documented_parameters(doc)
    missing = [name for name in parameters if name not in documented]
    assert not missing, f"scext.{qualname}: parameters missing from the docstring's Parameters: {missing}"
    unknown = sorted(documented - set(parameters) - {"**kwargs", "kwargs"})
    assert not unknown, f"scext.{qualname}: the docstring documents parameters it does not take: {unknown}"


def test_settings_are_documented():
    assert "settings" in api_entries()
    doc = inspect.getdoc(type(scext.settings))
    attributes = numpydoc_sections(doc).get("Attributes", [])
    documented = {line.split(" : ")[0].strip() for line in attributes if line and not line[0].isspace()}
    fields = {field.name for field in dataclasses.fields(scext.settings)}
    assert fields <= documented, f"document in ScextSettings' Attributes: {sorted(fields - documented)}"


def test_every_tutorial_is_in_the_docs():
    index = (DOCS / "tutorials" / "index.md").read_text()
    for notebook in sorted((ROOT / "tutorials").glob("*.ipynb")):
        assert re.search(rf"^{re.escape(notebook.stem)}$", index, re.MULTILINE), (
            f"list {notebook.stem} in the toctree of docs/tutorials/index.md"
        )


def test_every_benchmark_table_is_included():
    """A table a benchmark script writes is included from its file, never copied by hand."""
    page = (DOCS / "benchmarks.md").read_text()
    for table in sorted((ROOT / "benchmarks" / "tables").glob("*.md")):
        assert f"../benchmarks/tables/{table.name}" in page, f"include benchmarks/tables/{table.name}"


def user_facing_texts():
    yield "README.md", (ROOT / "README.md").read_text()
    for page in sorted(DOCS.rglob("*.md")):
        if "_build" not in page.parts and "generated" not in page.parts:
            yield str(page.relative_to(ROOT)), page.read_text()
    for qualname, obj in public_objects():
        yield f"scext.{qualname}", inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for name, member in vars(obj).items():
                if not name.startswith("_") and getattr(member, "__doc__", None):
                    yield f"scext.{qualname}.{name}", inspect.getdoc(member) or ""
    for module_name in MODULES:
        yield f"scext.{module_name}", importlib.import_module(f"scext.{module_name}").__doc__ or ""


def test_no_tracker_numbers_in_user_facing_text():
    found = [
        f"{where}: {match.group(0)!r}"
        for where, text in user_facing_texts()
        for match in TRACKER_NUMBER.finditer(text)
    ]
    assert not found, "cite the paper (authors, title, venue, year) instead of:\n" + "\n".join(found)


# -- the build ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    pytest.importorskip("sphinx", reason='the docs need the doc extra: pip install -e ".[doc]"')
    pytest.importorskip("myst_nb", reason='the docs need the doc extra: pip install -e ".[doc]"')
    out = tmp_path_factory.mktemp("docs")
    command = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",  # every warning fails the build: a broken reference, a bad docstring, a missing page
        "--keep-going",  # ... after reporting all of them
        "-b",
        "html",
        "-d",
        str(out / "doctrees"),
        str(DOCS),
        str(out / "html"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    return result, out / "html"


@pytest.mark.docs
def test_docs_build_without_warnings(built_docs):
    result, html_dir = built_docs
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stderr[-6000:]}"
    for page in ("index", "api", "benchmarks", "large_data", "changelog", "contributing", "user_guide"):
        assert (html_dir / f"{page}.html").exists(), page
    for notebook in (ROOT / "tutorials").glob("*.ipynb"):
        assert (html_dir / "tutorials" / f"{notebook.stem}.html").exists(), notebook.name


@pytest.mark.docs
@pytest.mark.parametrize("qualname, obj", PUBLIC, ids=[qualname for qualname, _ in PUBLIC])
def test_api_page_lists_every_parameter(built_docs, qualname, obj):
    """The rendered page of each public function or class names each of its parameters."""
    result, html_dir = built_docs
    assert result.returncode == 0, "the build failed; see test_docs_build_without_warnings"
    page = html_dir / "generated" / f"scext.{qualname}.html"
    assert page.exists(), f"no API page for scext.{qualname}"
    text = html.unescape(page.read_text())
    listed = set(re.findall(r"<strong>([\w*]+)</strong>", text))
    missing = [name for name in signature_parameters(obj) if name not in listed]
    assert not missing, f"the API page of scext.{qualname} does not list {missing}"
