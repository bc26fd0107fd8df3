"""Every chapter notebook is publishable: runs on Colab, takes the run mode as a parameter, has no outputs."""

import importlib.util
import json

import pytest
import yaml
from book_pages import ROOT, book_config, toc_notebooks


def load_colab_cell():
    """`book/_ext/colab_cell.py`, which generates the Colab install cell from `_config.yml` and `pyproject.toml`."""
    spec = importlib.util.spec_from_file_location("colab_cell", ROOT / "book" / "_ext" / "colab_cell.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


colab_cell = load_colab_cell()


def code_cells(path):
    notebook = json.loads(path.read_text())
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


NOTEBOOKS = pytest.mark.parametrize("path", toc_notebooks(), ids=lambda path: path.name)


@NOTEBOOKS
def test_first_code_cell_installs_organics_on_colab(path):
    first = code_cells(path)[0]
    assert "".join(first["source"]) == colab_cell.colab_cell_source(), f"run `{colab_cell.FIX}` to regenerate it"
    assert "remove-cell" in first["metadata"].get("tags", []), "the install cell is hidden from the HTML book"


def test_colab_cell_installs_the_release_over_colabs_torch():
    """The cell clones the tag of pyproject's version from the repository (never main) and keeps Colab's torch."""
    tomllib = pytest.importorskip("tomllib")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    source = colab_cell.colab_cell_source()
    assert f'repo = "{book_config()["repository"]["url"]}"' in source and f"--branch v{version} {{repo}} " in source
    assert "@main" not in source and "--branch main" not in source
    pip_lines = [line.strip() for line in source.splitlines() if line.strip().startswith("%pip")]
    assert pip_lines[0].startswith("%pip install --quiet --no-deps "), "the package must not pull its torch pin"
    assert not any("torch" in line for line in pip_lines), pip_lines
    assert colab_cell.main(["--check"]) == 0


@NOTEBOOKS
def test_parameters_cell_reads_the_run_mode(path):
    tagged = [cell for cell in code_cells(path) if "parameters" in cell["metadata"].get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell is tagged `parameters`"
    assert 'os.environ.get("ORGANICS_MODE", "quick")' in "".join(tagged[0]["source"])


@NOTEBOOKS
def test_saved_without_outputs(path):
    for cell in code_cells(path):
        assert cell["outputs"] == [] and cell["execution_count"] is None, "clear with nbconvert --clear-output"


def test_every_notebook_is_a_page_of_the_book():
    assert sorted((ROOT / "book").glob("*.ipynb")) == sorted(toc_notebooks())


def test_binder_environment_installs_the_package_with_pyproject_pins():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict))
    assert {line for line in pip if "==" in line} == {pin for pin in project["dependencies"] if "==" in pin}
    extras = [line.removeprefix("-e .[").removesuffix("]") for line in pip if line.startswith("-e .[")]
    assert extras and all(extra in project["optional-dependencies"] for extra in extras)


def load_book_timings():
    """`benchmarks/book_timings.py`, which measures the chapters and renders the table of reproducing.md."""
    spec = importlib.util.spec_from_file_location("book_timings", ROOT / "benchmarks" / "book_timings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@NOTEBOOKS
def test_notebook_declares_a_time_limit_per_mode(path):
    """Each chapter's cell limit (book/execution_timeouts.yml) is a few times its measured quick run, never none."""
    from notebook_limits import cell_timeout

    timings = json.loads((ROOT / "results" / "book_timings.json").read_text())["notebooks"]
    relative = path.relative_to(ROOT).as_posix()
    quick, full = cell_timeout(path, "quick"), cell_timeout(path, "full")
    assert quick is not None and full is not None, f"{relative} has no limit in book/execution_timeouts.yml"
    measured = timings[relative]["quick"]["seconds"]
    assert 2 * measured <= quick <= 1200, (relative, measured, quick)
    assert full >= quick


def test_build_applies_the_time_limits_of_the_mode():
    """The book's extension and nbval's plugin read the same limits for the mode they run in."""
    spec = importlib.util.spec_from_file_location(
        "execution_timeouts", ROOT / "book" / "_ext" / "execution_timeouts.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from notebook_limits import cell_timeout

    for path in toc_notebooks():
        relative = path.relative_to(ROOT).as_posix()
        for mode in ("quick", "full"):
            assert module.limit_for(ROOT, relative, mode) == cell_timeout(path, mode)


def test_reproducing_page_shows_the_measured_execution_times():
    """The execution-time table of reproducing.md is the one rendered from results/book_timings.json."""
    book_timings = load_book_timings()
    timings = json.loads(book_timings.TIMINGS.read_text())
    assert set(timings["notebooks"]) == {path.relative_to(ROOT).as_posix() for path in toc_notebooks()}
    assert all("quick" in modes for modes in timings["notebooks"].values())
    text = (ROOT / "book" / "reproducing.md").read_text()
    table = text.split(book_timings.START, 1)[1].split(book_timings.END, 1)[0].strip()
    assert table == book_timings.render_table(timings), "run `python benchmarks/book_timings.py --render`"
