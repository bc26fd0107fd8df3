"""Registry of trainable models: name -> factory.

A factory is any callable ``factory(in_features, n_classes, **kwargs) -> torch.nn.Module``
whose module maps a batch ``x`` (``(B, in_features)`` for static tasks, ``(B, T, in_features)``
for sequential ones) to logits ``(B, n_classes)``.

Model modules register their factories at import with :func:`register_model`. This module
imports nothing from the package, so any module can register without circular imports.
:func:`build_model` finds a name in three ways, in order:

1. a name already registered;
2. a name registered by one of the package's modules, found by importing the ``organics``
   submodules not imported yet (model modules are imported lazily, on first need);
3. a ``"package.module:attribute"`` path to a factory.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["build_model", "model_names", "register_model"]

_FACTORIES: dict[str, Callable[..., Any]] = {}


def register_model(name: str, factory: Callable[..., Any]) -> None:
    """Register ``factory`` under ``name`` (re-registering a name replaces its factory).

    Raises
    ------
    ValueError
        If ``name`` is empty or contains ``":"`` (reserved for ``module:attribute`` paths),
        or ``factory`` is not callable.
    """
    if not name or ":" in name:
        raise ValueError(f"name must be non-empty and free of ':', got {name!r}")
    if not callable(factory):
        raise ValueError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
    _FACTORIES[name] = factory


def _import_package_modules() -> dict[str, str]:
    """Import every ``organics`` submodule not imported yet; return import errors by module."""
    package = importlib.import_module(__package__)
    errors = {}
    for info in pkgutil.iter_modules(package.__path__, prefix=f"{__package__}."):
        if info.name in sys.modules:
            continue
        try:
            importlib.import_module(info.name)
        except Exception as err:  # reported to the caller if the name stays unknown
            errors[info.name] = f"{type(err).__name__}: {err}"
    return errors


def model_names() -> list[str]:
    """Names of all models the package's modules register (imports them if needed)."""
    _import_package_modules()
    return sorted(_FACTORIES)


def build_model(name: str, in_features: int, n_classes: int = 10, **kwargs: Any) -> Any:
    """Build the model registered as ``name`` (or at the path ``"module:attribute"``).

    Raises
    ------
    ValueError
        If ``name`` is neither registered by any package module nor a valid path; the
        message lists the known names and any package module that failed to import.
    """
    if name not in _FACTORIES and ":" not in name:
        errors = _import_package_modules()
        if name not in _FACTORIES:
            detail = "".join(f"\n  {mod} failed to import: {msg}" for mod, msg in errors.items())
            raise ValueError(f"model {name!r} is not registered; known models: {sorted(_FACTORIES)}{detail}")
    if name in _FACTORIES:
        factory = _FACTORIES[name]
    else:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"model path {name!r} does not name an importable factory: {err}") from err
    return factory(in_features=in_features, n_classes=n_classes, **kwargs)
