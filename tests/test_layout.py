"""The package's layout: one home per concept, no import cycle, no upward import."""

import ast
from pathlib import Path

import pytest

import organics

PACKAGE = Path(organics.__file__).parent
CIRCUIT_MATHS = {"circuit", "solver", "stability", "oscillator", "planar", "sampling"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from a import b`` counts as ``a.b`` when b is a module)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = {t for t in targets if t.startswith("organics") and _is_module(t)} - {name}
    return graph


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join([*path, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_no_upward_import():
    graph = _imports()
    for module, targets in graph.items():
        short = module.removeprefix("organics.")
        if short in CIRCUIT_MATHS:
            assert not any(t.startswith("organics.networks") for t in targets), f"{module} imports networks"
        if short.startswith("networks"):
            upward = {t for t in targets if t.split(".")[1] in {"train", "runs", "experiments", "data", "benchmark"}}
            assert not upward, f"{module} imports {upward}"
        if short == "networks.scan":
            allowed = {"organics.circuit", "organics.networks.cell", "organics.networks._kernels"}
            allowed |= {"organics.networks._compiled_steps"}  # the numba engine's passes
            allowed |= {"organics._checks"}  # the shared argument checks (standard library only)
            assert targets <= allowed | {"organics.networks._persistent"}, targets


def test_every_concept_has_one_home():
    modules = {_module_name(path) for path in PACKAGE.rglob("*.py")}
    for gone in ("model", "registry", "monitor", "rnn_stability", "fast_rnn", "layers", "rnn", "_rnn_kernels"):
        assert f"organics.{gone}" not in modules
    for present in (
        "circuit",
        "sampling",
        "experiments",
        "runs",
        "networks.cell",
        "networks.scan",
        "networks.rnn",
        "networks.static",
        "networks.baselines",
        "networks.stability",
    ):
        assert f"organics.{present}" in modules


def test_package_docstring_has_the_glossary():
    doc = organics.__doc__
    for term in ("drift", "fixed point", "absolute residual", "relative residual", "time constant", "step size"):
        assert term in doc
