"""Sphinx extension: a chapter's download button gives the notebook as executed for the book.

sphinx-book-theme's download menu offers, for a page made from an `.ipynb`, the copy of its source
that Sphinx puts in `_sources/` (this book's notebooks are committed without outputs), and only for
pages written as MyST Markdown notebooks the executed notebook; no option changes that. At the
end of an HTML build this extension writes, over each notebook page's `_sources/<page>.ipynb`, the
notebook as executed for the page: the source merged with its outputs from the execution cache
(where myst-nb took it from there: its own copy in `<output>/_build/jupyter_execute/` then lacks
the outputs), else myst-nb's copy of the notebook it executed. So the `.ipynb` entry of the menu
downloads the notebook with the outputs the page shows, and its tooltip says so. The launch buttons
(Binder, Colab) still open the notebook from the repository.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from execution_key import cache_path  # the same folder rule as the cache key's (book/_ext is on the path)
from jupyter_cache import get_cache
from sphinx.application import Sphinx
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)
TOOLTIP = "Download the notebook as executed for this page (with its outputs)"


def is_notebook(app: Sphinx, docname: str) -> bool:
    return Path(app.env.doc2path(docname)).suffix == ".ipynb"


def label_download(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Retitle the `.ipynb` entry of a notebook page's download menu (after the theme made it)."""
    if pagename not in app.env.found_docs or not is_notebook(app, pagename):
        return
    for group in context.get("header_buttons", []):
        for button in group.get("buttons", []):
            if button.get("label") == "download-source-button":
                button["tooltip"] = TOOLTIP


def executed_notebook(app: Sphinx, docname: str) -> nbformat.NotebookNode | None:
    """The notebook as executed for the page: from the execution cache if it holds it, else myst-nb's copy."""
    if app.config["nb_execution_mode"] == "cache" and cache_path(app).exists():
        source = nbformat.read(app.env.doc2path(docname), as_version=4)
        try:
            return get_cache(cache_path(app)).merge_match_into_notebook(source)[1]
        except KeyError:  # executed afresh (e.g. with errors allowed), not cached
            pass
    executed = Path(app.outdir).parent / "jupyter_execute" / f"{docname}.ipynb"
    return nbformat.read(executed, as_version=4) if executed.exists() else None


def copy_executed_notebooks(app: Sphinx, exception: Exception | None) -> None:
    """Put the executed notebooks in place of the copies of their sources under `_sources/`."""
    if exception is not None or app.builder.format != "html" or not getattr(app.builder, "copysource", False):
        return
    copied = 0
    for docname in sorted(app.env.found_docs):
        notebook = executed_notebook(app, docname) if is_notebook(app, docname) else None
        if notebook is None:
            continue
        target = Path(app.outdir) / "_sources" / f"{docname}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, target)
        copied += 1
    LOGGER.info(f"executed_downloads: {copied} executed notebooks in _sources/")


def setup(app: Sphinx) -> dict:
    app.connect("html-page-context", label_download, priority=600)  # the theme adds its buttons at 501
    app.connect("build-finished", copy_executed_notebooks)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
