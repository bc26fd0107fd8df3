"""pytest plugin (`-p notebook_limits` in pyproject's addopts): every notebook cell gets its chapter's time limit.

Each chapter declares the limit of one cell, by mode, in ``book/execution_timeouts.yml`` (the book
build applies the same file: ``book/_ext/execution_timeouts.py``). Under nbval a cell that runs
longer is interrupted by nbval ("Timeout of N seconds exceeded executing cell", naming the
notebook and the cell); pytest-timeout stops the item a minute later as a backstop. A plugin
rather than a conftest, so that it also applies when a notebook is run on its own
(``python -m pytest book/06_static_mnist.ipynb``).
"""

import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
TIMEOUTS = ROOT / "book" / "execution_timeouts.yml"
BACKSTOP = 60  # seconds beyond nbval's own limit before pytest-timeout stops the item
CELL_TIMEOUT = pytest.StashKey[int]()


def cell_timeout(path: Path, mode: str | None = None) -> int | None:
    """The limit of one cell of the notebook at `path` in `mode` (default: $ORGANICS_MODE)."""
    try:
        relative = Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return None
    entry = (yaml.safe_load(TIMEOUTS.read_text()) or {}).get(relative)
    return None if entry is None else int(entry[mode or os.environ.get("ORGANICS_MODE", "quick")])


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb" and (limit := cell_timeout(item.path)) is not None:
            item.add_marker(pytest.mark.timeout(limit + BACKSTOP))
            item.stash[CELL_TIMEOUT] = limit


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """nbval reads its cell limit from --nbval-cell-timeout: give it the chapter's for this cell."""
    limit = item.stash.get(CELL_TIMEOUT, None)
    option = item.config.option
    if limit is None or not hasattr(option, "nbval_cell_timeout"):
        yield
        return
    previous = option.nbval_cell_timeout
    option.nbval_cell_timeout = limit
    try:
        yield
    finally:
        option.nbval_cell_timeout = previous
