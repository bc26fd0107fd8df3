"""pytest plugin (`-p notebook_reuse` in pyproject's addopts): the book build reuses the notebooks nbval executed.

Each chapter used to run twice in one session: cell by cell under nbval, then once more in the
book build of tests/test_book.py (its execution cache starts empty on CI). This plugin

1. runs the notebooks' nbval items before the items of tests/test_book.py (the rest keeps its order);
2. records the kernel messages each cell item receives (nbval keeps the outputs only coalesced:
   all the text of a stream moved to its first place), and rebuilds from them the outputs as
   myst-nb's executor (nbclient) records them, in the order they came;
3. when every code cell of a notebook passed (a cell nbval skipped only if it is tagged
   `skip-execution`, which the build does not execute either), stores the notebook with those
   outputs and execution counts in the jupyter cache of that build
   (`_build/book-<mode>/_build/.jupyter_cache`) and stamps the cache with the key of
   book/_ext/execution_key.py, so that the build takes the notebook from the cache instead of
   executing it again (myst-nb matches it on the code cells and the kernelspec).

A notebook with a failed, deselected or unrun cell, an error output, or outputs that nbclient
would record differently (`clear_output`, `update_display_data` or display ids: progress bars,
live displays; comm messages: widgets) is not stored: the build executes it as before. Neither
when the package, results or mode (the execution key) changed while it ran, nor when `organics`
is not imported from this checkout. tests/test_book.py checks that the build executed none of
the notebooks stored here again (`stored_notebooks`).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODE = os.environ.get("ORGANICS_MODE", "quick")
BUILD_DIR = ROOT / "_build" / f"book-{MODE}"
"""Where tests/test_book.py builds the book (`jupyter-book build --path-output BUILD_DIR`)."""
SKIP_TAG = "skip-execution"  # nbclient's `skip_cells_with_tag`: cells the build does not execute
OUTPUT_TYPES = {"stream", "display_data", "execute_result", "error"}
QUIET_TYPES = {"status", "execute_input"}


def cache_dir() -> Path:
    """The jupyter cache of the book build: `execute.cache` of _config.yml, else myst-nb's default
    (the parent of the HTML output folder, `BUILD_DIR/_build/html`, then `.jupyter_cache`)."""
    configured = ((yaml.safe_load((ROOT / "_config.yml").read_text()) or {}).get("execute") or {}).get("cache")
    return (ROOT / configured).resolve() if configured else BUILD_DIR / "_build" / ".jupyter_cache"


@functools.cache
def _execution_key_module():
    """book/_ext/execution_key.py, the book's own rule for the cache's key."""
    spec = importlib.util.spec_from_file_location("book_execution_key", ROOT / "book" / "_ext" / "execution_key.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def _build_environment():
    """The variables as the build sees them: tests/test_book.py sets ORGANICS_MODE to MODE."""
    previous = os.environ.get("ORGANICS_MODE")
    os.environ["ORGANICS_MODE"] = MODE
    try:
        yield
    finally:
        if previous is None:
            del os.environ["ORGANICS_MODE"]
        else:
            os.environ["ORGANICS_MODE"] = previous


def current_key() -> str:
    """The execution key the build will compute now (book/_ext/execution_key.py, default settings)."""
    module = _execution_key_module()
    with _build_environment():
        return module.execution_key(ROOT, module.DEFAULT_FILES, module.DEFAULT_ENV)


@dataclass
class NotebookRun:
    """What the cell items of one notebook did in this session."""

    items: list = field(default_factory=list)  # its cell items, in the session's order
    outputs: dict = field(default_factory=dict)  # cell_num -> outputs (passed cells)
    skipped: set = field(default_factory=set)  # cell_num of cells nbval skipped
    problem: str | None = None  # why the notebook is not stored
    key: str | None = None  # the execution key when its first cell started
    started: float | None = None


RUNS = pytest.StashKey[dict]()  # notebook path -> NotebookRun
STORED = pytest.StashKey[dict]()  # notebook path -> the execution key stamped on the cache with it
NOT_STORED = pytest.StashKey[dict]()  # notebook path -> why not
MESSAGES = "_notebook_reuse_messages"  # attribute of nbval's notebook collector while a cell runs


def stored_notebooks(config: pytest.Config) -> dict[Path, str]:
    """The notebooks stored in the build's cache in this session, with the key stamped on it."""
    return dict(config.stash.get(STORED, {}))


def notebooks_not_stored(config: pytest.Config) -> dict[Path, str]:
    """The notebooks that ran under nbval in this session but were not stored, with the reason."""
    return dict(config.stash.get(NOT_STORED, {}))


def _is_cell(item: pytest.Item) -> bool:
    return type(item).__name__ == "IPyNbCell" and hasattr(item, "cell_num")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RUNS] = {}
    config.stash[STORED] = {}
    config.stash[NOT_STORED] = {}
    try:
        from nbval.plugin import IPyNbFile
    except ImportError:
        return
    original = IPyNbFile.get_kernel_message

    @functools.wraps(original)
    def recording(self, *args, **kwargs):
        message = original(self, *args, **kwargs)
        recorded = getattr(self, MESSAGES, None)
        if recorded is not None:
            recorded.append(message)
        return message

    IPyNbFile.get_kernel_message = recording
    config.add_cleanup(lambda: setattr(IPyNbFile, "get_kernel_message", original))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The notebooks' items first, before those of tests/test_book.py; the rest keeps its order."""
    first_build = next((i for i, item in enumerate(items) if item.path.name == "test_book.py"), None)
    if first_build is None:
        return
    notebooks = [item for item in items[first_build:] if item.path.suffix == ".ipynb"]
    others = [item for item in items[first_build:] if item.path.suffix != ".ipynb"]
    items[first_build:] = notebooks + others


def pytest_collection_finish(session: pytest.Session) -> None:
    runs = session.config.stash[RUNS]
    for item in session.items:
        if _is_cell(item):
            runs.setdefault(item.path.resolve(), NotebookRun()).items.append(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    if not _is_cell(item):
        yield
        return
    setattr(item.parent, MESSAGES, [])
    outcome = yield
    messages = getattr(item.parent, MESSAGES)
    setattr(item.parent, MESSAGES, None)
    run = item.config.stash[RUNS].get(item.path.resolve())
    if run is not None and run.problem is None and outcome.excinfo is None:  # failed or skipped: see makereport
        try:
            run.outputs[item.cell_num] = cell_outputs(messages)
        except ValueError as error:
            run.problem = f"cell {item.cell_num}: {error}"


def cell_outputs(messages: list[dict]) -> list:
    """The outputs of one cell execution, as nbclient records them (without coalescing streams).

    nbval reads the messages until the `idle` status of its request: the request is the parent
    of that last message. ValueError where nbclient would record something else than the outputs
    in the order they came.
    """
    if not messages or messages[-1]["msg_type"] != "status" or messages[-1]["content"]["execution_state"] != "idle":
        raise ValueError("its messages do not end with the kernel's idle status")
    request = messages[-1]["parent_header"].get("msg_id")
    outputs = []
    for message in messages:
        if message["parent_header"].get("msg_id") != request or message["msg_type"] in QUIET_TYPES:
            continue
        kind, content = message["msg_type"], message["content"]
        if kind not in OUTPUT_TYPES:
            raise ValueError(f"a {kind!r} message (nbclient would record the outputs differently)")
        if (content.get("transient") or {}).get("display_id"):
            raise ValueError("an output with a display id (nbclient would update it in place)")
        outputs.append(nbformat.v4.output_from_msg(message))
    return outputs


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    if not _is_cell(item):
        return
    report = outcome.get_result()
    run = item.config.stash[RUNS].get(item.path.resolve())
    if run is None:
        return
    if report.when == "setup" and run.started is None:
        run.started = time.monotonic()
        run.key = current_key()
    if run.problem is None:
        if report.failed or (report.skipped and report.when != "call") or hasattr(report, "wasxfail"):
            run.problem = f"cell {item.cell_num} {report.outcome} in {report.when}"
        elif report.skipped:
            run.skipped.add(item.cell_num)
            run.outputs.pop(item.cell_num, None)
    if report.when == "teardown" and item is run.items[-1]:
        finish(item.config, item.path.resolve(), item.parent.nb, run)


def finish(config: pytest.Config, path: Path, source: nbformat.NotebookNode, run: NotebookRun) -> None:
    """Store the executed notebook in the build's cache, or record why not."""
    try:
        notebook, key = executed_notebook(path, source, run)
    except ValueError as error:
        config.stash[NOT_STORED][path] = str(error)
        return
    store(notebook, path, key, time.monotonic() - run.started)
    config.stash[STORED][path] = key


def executed_notebook(path: Path, source: nbformat.NotebookNode, run: NotebookRun):
    """The notebook as nbval read it, with the outputs of its cells; ValueError if it cannot be used."""
    if run.problem:
        raise ValueError(run.problem)
    module = importlib.util.find_spec("organics")
    if module is None or not Path(module.origin).resolve().is_relative_to(ROOT / "organics"):
        raise ValueError(f"organics is not imported from {ROOT} (the execution key hashes that copy)")
    key = current_key()
    if key != run.key:
        raise ValueError("organics/, results/ or ORGANICS_MODE changed while it ran")
    notebook = copy.deepcopy(source)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    ran = {item.cell_num for item in run.items}
    if ran != set(range(len(code_cells))):
        raise ValueError(f"cells {sorted(set(range(len(code_cells))) - ran)} did not run (deselected?)")
    count = 0
    for number, cell in enumerate(code_cells):
        skip = SKIP_TAG in cell.metadata.get("tags", [])
        if number in run.skipped:
            if not skip:
                raise ValueError(f"cell {number} was skipped by nbval but the build would execute it")
            continue
        if skip:
            raise ValueError(f"cell {number} ran under nbval but is tagged {SKIP_TAG}: the build would not run it")
        outputs = run.outputs.get(number)
        if outputs is None:
            raise ValueError(f"cell {number} has no recorded outputs")
        if any(output.output_type == "error" for output in outputs):
            raise ValueError(f"cell {number} has an error output")
        count += 1
        cell.execution_count = count
        cell.outputs = outputs
        for output in outputs:
            if output.output_type == "execute_result":
                output.execution_count = count
    return notebook, key


def store(notebook: nbformat.NotebookNode, path: Path, key: str, seconds: float) -> None:
    """Put the notebook in the build's jupyter cache, the cache stamped with `key`.

    A cache stamped with another key (or none) is emptied first, as book/_ext/execution_key.py
    would: its other notebooks were executed with other code, results or mode.
    """
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    folder = cache_dir()
    stamp = folder / _execution_key_module().STAMP
    if not stamp.exists() or stamp.read_text().strip() != key:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        stamp.write_text(key + "\n")
    bundle = CacheBundleIn(notebook, str(path), data={"execution_seconds": seconds, "executed_by": "nbval"})
    get_cache(str(folder)).cache_notebook_bundle(bundle, check_validity=False, overwrite=True)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    stored, skipped = config.stash.get(STORED, {}), config.stash.get(NOT_STORED, {})
    if not stored and not skipped:
        return
    terminalreporter.section("notebook_reuse")
    terminalreporter.write_line(f"{len(stored)} notebook(s) executed under nbval stored in {cache_dir()}")
    for path, reason in sorted(skipped.items()):
        terminalreporter.write_line(f"not stored (the build executes it): {path.relative_to(ROOT)}: {reason}")
