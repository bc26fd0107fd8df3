"""Sphinx extension: every <script> appears once in a page of the book.

Sphinx 7 (the series jupyter-book 1 requires) writes an inline script that an extension
registers with `app.add_js_file(None, body=...)` twice into every page (fixed upstream in Sphinx 8
by sphinx-doc/sphinx#13402). For sphinx-thebe's `const THEBE_JS_URL = ...` the repetition is a
JavaScript SyntaxError in the console of every page; dropping the repeats removes it.
"""

from sphinx.application import Sphinx


def drop_repeated_scripts(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Keep the first of the page's scripts that share file name (None and "" alike) and attributes."""
    seen = set()
    unique = []
    for script in context.get("script_files", []):
        key = (script.filename or "", tuple(sorted(script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"][:] = unique


def setup(app: Sphinx) -> dict:
    app.connect("html-page-context", drop_repeated_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
