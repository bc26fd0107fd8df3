"""Every chapter notebook is publishable: runs on Colab, takes the run mode as a parameter, has no outputs."""

import json

import pytest
import yaml
from book_pages import ROOT, book_config, toc_notebooks


def colab_install_source() -> str:
    """The first code cell of every notebook: on Colab, install `organics` from the book's repository."""
    repository = book_config()["repository"]
    return (
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:  # on Colab, install the organics package from its repository\n'
        f'    %pip install --quiet "organics @ git+{repository["url"]}@{repository["branch"]}"'
    )


def code_cells(path):
    notebook = json.loads(path.read_text())
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


NOTEBOOKS = pytest.mark.parametrize("path", toc_notebooks(), ids=lambda path: path.name)


@NOTEBOOKS
def test_first_code_cell_installs_organics_on_colab(path):
    first = code_cells(path)[0]
    assert "".join(first["source"]) == colab_install_source()
    assert "remove-cell" in first["metadata"].get("tags", []), "the install cell is hidden from the HTML book"


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
