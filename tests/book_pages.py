"""The book's pages as listed in `_toc.yml`, and its settings in `_config.yml` (test helper)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def book_config() -> dict:
    """The parsed `_config.yml` of the book."""
    return yaml.safe_load((ROOT / "_config.yml").read_text())


def toc_documents() -> list[str]:
    """Every document of `_toc.yml` in reading order, as paths without suffix (`book/intro`, ...)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    documents = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                documents.append(entry["file"])
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key, []))

    walk([toc])
    return documents


def source_of(document: str) -> Path:
    """The source file (`.ipynb` or `.md`) of a `_toc.yml` document."""
    for suffix in (".ipynb", ".md"):
        path = ROOT / f"{document}{suffix}"
        if path.exists():
            return path
    raise FileNotFoundError(f"_toc.yml names {document!r}, which has no .ipynb or .md source")


def toc_notebooks() -> list[Path]:
    """The notebooks among the book's pages."""
    return [path for path in map(source_of, toc_documents()) if path.suffix == ".ipynb"]
