"""Sphinx extension: each notebook executes under its own time limit per cell, for the current mode.

The limits live in `book/execution_timeouts.yml` (notebook path relative to the book's root ->
``{quick: seconds, full: seconds}``); the mode is ``$ORGANICS_MODE`` (quick by default). At
`source-read` the notebook's metadata gets ``mystnb: {execution_timeout: limit}``, myst-nb's
per-notebook override of `execute.timeout`, so a full-mode build allows the hours its training
cells need while a quick build stops a hung cell within minutes. The execution cache is not
affected (jupyter-cache hashes the code cells and the kernelspec only). nbval reads the same file
(tests/notebook_limits.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from sphinx.application import Sphinx

LIMITS_FILE = "book/execution_timeouts.yml"


def limits(root: Path) -> dict:
    """The limits of `book/execution_timeouts.yml`, by notebook path relative to `root`."""
    return yaml.safe_load((root / LIMITS_FILE).read_text())


def limit_for(root: Path, notebook: str, mode: str | None = None) -> int | None:
    """The limit of one cell of `notebook` (relative to `root`) in `mode` (default: $ORGANICS_MODE)."""
    entry = limits(root).get(notebook)
    return None if entry is None else int(entry[mode or os.environ.get("ORGANICS_MODE", "quick")])


def set_timeout(app: Sphinx, docname: str, source: list[str]) -> None:
    path = Path(app.env.doc2path(docname))
    if path.suffix != ".ipynb":
        return
    limit = limit_for(Path(app.srcdir), path.relative_to(app.srcdir).as_posix())
    if limit is None:
        return
    notebook = json.loads(source[0])
    notebook.setdefault("metadata", {}).setdefault("mystnb", {})["execution_timeout"] = limit
    source[0] = json.dumps(notebook, ensure_ascii=False)


def setup(app: Sphinx) -> dict:
    app.connect("source-read", set_timeout)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
