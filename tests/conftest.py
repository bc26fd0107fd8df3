"""Marks the book's tests (notebooks under nbval, the built book in Chromium) with ``book``.

``python -m pytest -m "not book"`` is the quick loop: the package's own tests only.
"""

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb" or item.path.name in ("test_book.py", "test_notebooks.py"):
            item.add_marker(pytest.mark.book)
