"""Sphinx extension: the notebooks' execution cache is only reused for the same package, results and mode.

With `execute_notebooks: cache`, myst-nb looks each notebook up in a jupyter-cache keyed on the
notebook's code cells alone: after a change to `organics/` or `results/`, or under another
`ORGANICS_MODE`, a build would show the outputs of the old code. This extension keys the whole
cache on the inputs the notebooks read besides their own code:

- the files matched by `execution_key_files` (globs relative to the book's root; by default
  every `organics/**/*.py` and the records and best models under `results/`), path and content;
- the values of the environment variables named by `execution_key_env` (by default
  `ORGANICS_MODE`).

At `builder-inited` (before any notebook is read: myst-nb opens the cache while parsing each
notebook) it hashes them and compares the hash with the stamp `execution_key.txt` kept inside
the cache folder (`<output>/_build/.jupyter_cache`, or `execute.cache` if set). When they
differ it empties the cache, writes the new stamp, and (at `env-get-outdated`) has Sphinx read
every document again, so that each notebook is executed afresh even in an incremental build and
the pages gluing their numbers show the new ones. Only
`nb_execution_mode = "cache"` is concerned: `force` always executes and `off` never does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

LOGGER = logging.getLogger(__name__)
STAMP = "execution_key.txt"
DEFAULT_FILES = ["organics/**/*.py", "results/**/*.json", "results/**/*.jsonl", "results/**/best.pt"]
"""What the chapters read: the package, the runs' records and best models (a run's ``last.pt``, its
temporary files and logs change during training without changing what a chapter shows)."""
DEFAULT_ENV = ["ORGANICS_MODE"]


def execution_key(root: Path, patterns: list[str], env_names: list[str]) -> str:
    """sha256 over the matched files (relative path and content, in path order) and the named variables."""
    digest = hashlib.sha256()
    files = {path for pattern in patterns for path in root.glob(pattern) if path.is_file()}
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        if "__pycache__" in path.parts:
            continue
        digest.update(f"file {path.relative_to(root).as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for name in env_names:
        value = os.environ.get(name)
        digest.update(f"env {name}={'<unset>' if value is None else value}\0".encode())
    return digest.hexdigest()


def cache_path(app: Sphinx) -> Path:
    """The jupyter-cache folder myst-nb uses (myst_nb.sphinx_ext.create_mystnb_config's rule)."""
    configured = app.config["nb_execution_cache_path"]
    return Path(configured).resolve() if configured else Path(app.outdir).parent.joinpath(".jupyter_cache").resolve()


def check_key(app: Sphinx) -> None:
    """Empty the execution cache when the package, the results or the mode changed since it was filled."""
    app.execution_key_changed = False
    if app.config["nb_execution_mode"] != "cache":
        return
    key = execution_key(Path(app.srcdir), app.config.execution_key_files, app.config.execution_key_env)
    cache = cache_path(app)
    stamp = cache / STAMP
    previous = stamp.read_text().strip() if stamp.exists() else None
    if previous == key:
        return
    if cache.exists():
        LOGGER.info(f"execution_key: the package, results or mode changed: emptying the execution cache {cache}")
        shutil.rmtree(cache)
    cache.mkdir(parents=True)
    stamp.write_text(key + "\n")
    app.execution_key_changed = True


def documents_to_reread(app: Sphinx, env: BuildEnvironment, added, changed, removed) -> list[str]:
    """With a new key, every document is read again: the notebooks execute afresh, and the pages
    that glue their numbers (the landing page's status table) show the new ones."""
    if not getattr(app, "execution_key_changed", False):
        return []
    return sorted(doc for doc in env.found_docs if doc not in added)


def setup(app: Sphinx) -> dict:
    app.add_config_value("execution_key_files", DEFAULT_FILES, "env", [list])
    app.add_config_value("execution_key_env", DEFAULT_ENV, "env", [list])
    # after myst-nb's own builder-inited handler (priority 500), before any document is read
    app.connect("builder-inited", check_key, priority=600)
    app.connect("env-get-outdated", documents_to_reread)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
