"""Sphinx extension: a chapter's download button gives the notebook as executed for the book.

sphinx-book-theme's download menu offers, for a page made from an `.ipynb`, the copy of its source
that Sphinx puts in `_sources/` (this book's notebooks are committed without outputs), and only for
pages written as MyST Markdown notebooks the executed notebook; no option changes that. myst-nb
writes every notebook it has executed (or taken from the execution cache) to
`<output>/_build/jupyter_execute/<page>.ipynb`. At the end of an HTML build this extension copies
each of them over the page's `_sources/<page>.ipynb`, so that the `.ipynb` entry of the menu downloads
the notebook with the outputs the page shows, and says so in its tooltip. The launch buttons
(Binder, Colab) still open the notebook from the repository.
"""

from __future__ import annotations

import shutil
from pathlib import Path

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


def copy_executed_notebooks(app: Sphinx, exception: Exception | None) -> None:
    """Put the executed notebooks in place of the copies of their sources under `_sources/`."""
    if exception is not None or app.builder.format != "html" or not getattr(app.builder, "copysource", False):
        return
    executed_dir = Path(app.outdir).parent / "jupyter_execute"
    copied = 0
    for docname in sorted(app.env.found_docs):
        executed = executed_dir / f"{docname}.ipynb"
        if not is_notebook(app, docname) or not executed.exists():
            continue
        target = Path(app.outdir) / "_sources" / f"{docname}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(executed, target)
        copied += 1
    LOGGER.info(f"executed_downloads: {copied} executed notebooks in _sources/")


def setup(app: Sphinx) -> dict:
    app.connect("html-page-context", label_download, priority=600)  # the theme adds its buttons at 501
    app.connect("build-finished", copy_executed_notebooks)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
