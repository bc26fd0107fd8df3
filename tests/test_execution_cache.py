"""The book never shows stale outputs, and its download button gives the executed notebook.

`book/_ext/execution_key.py` keys myst-nb's execution cache on `organics/**/*.py`, `results/` and
`$ORGANICS_MODE` besides the notebooks' code; `book/_ext/executed_downloads.py` puts the executed
notebooks under `_sources/`. Both are checked on a tiny book built in a temporary folder: one
notebook that imports the temporary copy of the package (PYTHONPATH) and prints a token drawn
afresh at every execution, so the page shows whether the notebook ran again or came from the cache.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from book_pages import ROOT

pytestmark = [pytest.mark.book, pytest.mark.timeout(600)]

EXT = ROOT / "book" / "_ext"
CONFIG = """\
title: Execution cache probe
only_build_toc_files: true
exclude_patterns: [_build, organics, results, _ext]
execute:
  execute_notebooks: cache
  timeout: 300
html:
  use_download_button: true
sphinx:
  local_extensions:
    execution_key: _ext
    executed_downloads: _ext
"""
PROBE = [
    "import uuid\n\nimport organics\n\nprint(f'imported from {organics.__file__}')",
    "print(f'token {uuid.uuid4().hex}')",
]


def load_extension(name: str):
    if str(EXT) not in sys.path:  # the extensions import each other, as in the build (book/_ext on the path)
        sys.path.insert(0, str(EXT))
    spec = importlib.util.spec_from_file_location(name, EXT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_book(folder: Path) -> None:
    """A one-page book beside copies of the package, a results folder and the two extensions."""
    shutil.copytree(ROOT / "organics", folder / "organics", ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "results").mkdir()
    (folder / "results" / "metrics.jsonl").write_text('{"epoch": 0}\n')
    (folder / "_ext").mkdir()
    for name in ("execution_key", "executed_downloads"):
        shutil.copy(EXT / f"{name}.py", folder / "_ext")
    (folder / "_config.yml").write_text(CONFIG)
    (folder / "_toc.yml").write_text("format: jb-book\nroot: probe\n")
    cells = [
        {"cell_type": "markdown", "id": "title", "metadata": {}, "source": ["# Probe"]},
        *(
            {"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": src}
            for i, src in enumerate(PROBE)
        ),
    ]
    kernel = {"display_name": "Python 3", "language": "python", "name": "python3"}
    notebook = {"cells": cells, "metadata": {"kernelspec": kernel}, "nbformat": 4, "nbformat_minor": 5}
    (folder / "probe.ipynb").write_text(json.dumps(notebook, indent=1))


def build(folder: Path, mode: str = "quick", everything: bool = False) -> str:
    """Build the book (warnings as errors) and return the token its page shows."""
    jupyter_book = shutil.which("jupyter-book")
    assert jupyter_book, "jupyter-book is not installed: run `bash install.sh`"
    command = [jupyter_book, "build", str(folder), "-W", "-n", "--keep-going", *(["--all"] if everything else [])]
    env = os.environ | {"PYTHONPATH": str(folder), "ORGANICS_MODE": mode}
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    page = (folder / "_build" / "html" / "probe.html").read_text()
    assert f"imported from {folder / 'organics' / '__init__.py'}" in page, "the notebook imports the copy"
    return re.search(r"token ([0-9a-f]{32})", page).group(1)


def test_a_changed_package_or_mode_executes_the_notebooks_again(tmp_path):
    make_book(tmp_path)
    first = build(tmp_path)
    assert build(tmp_path, everything=True) == first, "unchanged inputs: the page comes from the cache"

    with open(tmp_path / "organics" / "circuit.py", "a") as module:
        module.write("# a comment changes nothing the notebook computes, but it is another package\n")
    after_edit = build(tmp_path)  # an incremental build: Sphinx must read the notebook again
    assert after_edit != first, "a change to organics/ did not execute the notebook again"

    assert build(tmp_path, mode="full", everything=True) != after_edit, "a new ORGANICS_MODE reused the cache"

    # the download button: the page's _sources/probe.ipynb is the notebook as executed for it, both
    # after an execution and after a build that took the notebook from the cache
    for cached in (False, True):
        if cached:
            assert build(tmp_path, mode="full", everything=True) == downloaded_token(tmp_path)
        page = (tmp_path / "_build" / "html" / "probe.html").read_text()
        assert downloaded_token(tmp_path) == re.search(r"token ([0-9a-f]{32})", page).group(1), cached
    assert load_extension("executed_downloads").TOOLTIP in page


def downloaded_token(folder: Path) -> str:
    """The token printed in the outputs of the page's downloadable notebook (_sources/probe.ipynb)."""
    downloaded = json.loads((folder / "_build" / "html" / "_sources" / "probe.ipynb").read_text())
    outputs = "".join(
        "".join(output.get("text", "")) for cell in downloaded["cells"] for output in cell.get("outputs", [])
    )
    return re.search(r"token ([0-9a-f]{32})", outputs).group(1)


def test_the_key_covers_package_results_and_mode(tmp_path, monkeypatch):
    execution_key = load_extension("execution_key")
    (tmp_path / "organics" / "__pycache__").mkdir(parents=True)
    (tmp_path / "organics" / "circuit.py").write_text("x = 1\n")
    (tmp_path / "results" / "run").mkdir(parents=True)
    (tmp_path / "results" / "run" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "book.md").write_text("# not an input\n")
    monkeypatch.setenv("ORGANICS_MODE", "quick")

    def key() -> str:
        return execution_key.execution_key(tmp_path, execution_key.DEFAULT_FILES, execution_key.DEFAULT_ENV)

    keys = [key()]
    (tmp_path / "organics" / "__pycache__" / "circuit.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "book.md").write_text("# still not an input\n")
    assert key() == keys[0], "bytecode and files outside organics/ and results/ are not inputs"
    (tmp_path / "organics" / "circuit.py").write_text("x = 2\n")
    keys.append(key())
    (tmp_path / "results" / "run" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    keys.append(key())
    (tmp_path / "results" / "run" / "metrics.jsonl").rename(tmp_path / "results" / "run" / "other.jsonl")
    keys.append(key())
    monkeypatch.setenv("ORGANICS_MODE", "full")
    keys.append(key())
    monkeypatch.delenv("ORGANICS_MODE")
    keys.append(key())
    assert len(set(keys)) == len(keys), "every change of an input changes the key"
