"""The API reference page (`book/api.md`) covers every public name of the package, through autodoc."""

import importlib
import inspect
import pkgutil
import re

import pytest
from book_pages import ROOT, book_config, toc_documents
from sphinx.pycode import ModuleAnalyzer

import organics

API_PAGE = ROOT / "book" / "api.md"


def public_modules() -> list[str]:
    """`organics` and every module below it whose name has no part starting with an underscore."""
    found = [info.name for info in pkgutil.walk_packages(organics.__path__, "organics.")]
    return ["organics", *(name for name in found if not any(part.startswith("_") for part in name.split(".")))]


def documented_names() -> dict[str, set[str] | None]:
    """Module -> the names the page documents in its section (None: all of its own, `:members:` alone).

    A section is an ``automodule`` directive, its ``:members:`` option, and the ``py:`` entries
    (re-exports, linking to where they are defined) that follow it.
    """
    sections: dict[str, set[str] | None] = {}
    module = None
    for line in API_PAGE.read_text().splitlines():
        if match := re.fullmatch(r"\.\. automodule:: (\S+)", line):
            module = match[1]
            sections[module] = set()
        elif match := re.fullmatch(r"   :members:(.*)", line):
            listed = {name.strip() for name in match[1].split(",") if name.strip()}
            sections[module] = listed or None
        elif match := re.fullmatch(r"\.\. py:\w+:: (\w+)", line):
            if sections[module] is not None:
                sections[module].add(match[1])
    return sections


def defined_in(module, name: str) -> bool:
    """Whether `module.name` is documented by `:members:` in its own section (not a re-export)."""
    obj = getattr(module, name)
    return not (inspect.isclass(obj) or inspect.isfunction(obj)) or obj.__module__ == module.__name__


def test_autodoc_reads_numpy_docstrings():
    extensions = book_config()["sphinx"]["extra_extensions"]
    assert {"sphinx.ext.autodoc", "sphinx.ext.napoleon"} <= set(extensions)
    assert "book/api" in toc_documents()


@pytest.mark.parametrize("module_name", public_modules())
def test_every_public_name_is_on_the_page(module_name):
    sections = documented_names()
    assert module_name in sections, f"book/api.md has no `.. automodule:: {module_name}`"
    module = importlib.import_module(module_name)
    assert hasattr(module, "__all__"), f"{module_name} has no __all__"
    documented = sections[module_name]
    for name in module.__all__:
        if documented is None:
            if not defined_in(module, name):
                pytest.fail(f"{module_name}.{name} is re-exported: list it in book/api.md (`.. py:...:: {name}`)")
        else:
            assert name in documented, f"book/api.md does not document {module_name}.{name}"
    if documented is not None:
        assert documented <= set(module.__all__), f"book/api.md names {documented - set(module.__all__)}"


@pytest.mark.parametrize("module_name", public_modules())
def test_data_without_docstring_has_its_own_directive(module_name):
    """`automodule` skips module data that has no docstring: such names need an `autodata` line."""
    module = importlib.import_module(module_name)
    docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
    text = API_PAGE.read_text()
    for name in module.__all__:
        obj = getattr(module, name)
        is_data = not (inspect.isclass(obj) or inspect.isfunction(obj))
        if is_data and ("", name) not in docs and defined_in(module, name):
            assert f".. autodata:: {module_name}.{name}\n" in text, f"book/api.md lacks autodata for {name}"
