"""The first code cell of every chapter: on Colab, install this book's release of `organics`.

The cell is generated from the project's single sources and written into every notebook of
`book/` by this script; `tests/test_notebooks.py` checks that each notebook holds exactly it:

- the repository: `repository.url` of `_config.yml` (the book's launch and repository buttons
  read the same key);
- the release: `version` of `pyproject.toml`, installed from the git tag `v{version}`;
- the light dependencies: `pyproject.toml`'s `dependencies` without torch and torchvision, which
  Colab preinstalls (with its own CUDA build): the package goes in with `--no-deps`, so pip never
  replaces Colab's torch by the pinned one (several GB); and myst-nb, whose `glue` the chapters
  use to put computed numbers into their text (:data:`NOTEBOOK_NEEDS`).

The cell clones the tagged release (a shallow clone: the committed `results/` come with it, which
chapters 6 to 8 read), installs the package from it and moves into its `book/` folder, where the
chapters find the repository as they do in a checkout.

    python book/_ext/colab_cell.py            # rewrite the cell in every notebook of book/
    python book/_ext/colab_cell.py --check    # exit 1 if a notebook's cell differs
    python book/_ext/colab_cell.py --check --tag v0.1.0   # and the tag must be the release's

Outside Colab the cell does nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CLONE = "/content/organics"
COLAB_PROVIDES = {"torch", "torchvision"}  # preinstalled on Colab: never reinstalled over its own
NOTEBOOK_NEEDS = ["myst-nb>=1,<2"]  # what the chapters import beyond the package and Colab has: myst_nb's glue
FIX = "python book/_ext/colab_cell.py"


def repository_url(root: Path = ROOT) -> str:
    """The repository's public address: `repository.url` of the book's `_config.yml`."""
    return yaml.safe_load((root / "_config.yml").read_text())["repository"]["url"]


def project(root: Path = ROOT) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]


def release_tag(root: Path = ROOT) -> str:
    """The git tag of the release the notebooks install: `v` and pyproject's version."""
    return f"v{project(root)['version']}"


def light_dependencies(root: Path = ROOT) -> list[str]:
    """pyproject's dependencies, less those Colab preinstalls (torch, torchvision)."""
    name = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")
    return [dep for dep in project(root)["dependencies"] if name.match(dep).group(0).lower() not in COLAB_PROVIDES]


def colab_cell_source(root: Path = ROOT) -> str:
    """The source of the first code cell of every notebook."""
    tag, url = release_tag(root), repository_url(root)
    requirements = " ".join(f'"{dep}"' for dep in [*light_dependencies(root), *NOTEBOOK_NEEDS])
    return (
        "import os\n"
        "import sys\n"
        "\n"
        f'if "google.colab" in sys.modules:  # on Colab: organics {tag}, its results, and Colab\'s own torch\n'
        f'    if not os.path.isdir("{CLONE}"):\n'
        f'        repo = "{url}"\n'
        f"        !git -c advice.detachedHead=false clone --quiet --depth 1 --branch {tag} {{repo}} {CLONE}\n"
        f"    %pip install --quiet --no-deps {CLONE}\n"
        f"    %pip install --quiet {requirements}\n"
        f"    %cd {CLONE}/book"
    )


def notebooks(root: Path = ROOT) -> list[Path]:
    return sorted((root / "book").glob("*.ipynb"))


def first_code_cell(notebook: dict) -> dict:
    return next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")


def split_lines(source: str) -> list[str]:
    """A cell's source as nbformat stores it: lines that keep their newline, the last without."""
    return source.splitlines(keepends=True)


def write(path: Path, source: str) -> bool:
    """Put `source` into the notebook's first code cell (the file's JSON layout kept); True if it changed."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    cell = first_code_cell(notebook)
    if "".join(cell["source"]) == source:
        return False
    cell["source"] = split_lines(source)
    path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook's cell differs")
    parser.add_argument("--tag", help="with --check: the git tag being published, which must be the release's")
    args = parser.parse_args(argv)
    source = colab_cell_source()
    problems = []
    if args.tag is not None and args.tag != release_tag():
        problems.append(f"tag {args.tag} is not the release tag {release_tag()} of pyproject.toml's version")
    for path in notebooks():
        if args.check:
            if "".join(first_code_cell(json.loads(path.read_text(encoding="utf-8")))["source"]) != source:
                problems.append(f"{path.relative_to(ROOT)}: the Colab cell is not the generated one (run `{FIX}`)")
        elif write(path, source):
            print(f"rewrote the Colab cell of {path.relative_to(ROOT)}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
