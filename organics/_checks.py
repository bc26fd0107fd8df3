"""Argument checks shared across the package: one-line ``ValueError`` messages that name the parameter."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection


def is_integer(value: object) -> bool:
    """An integer (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_choice(name: str, value: object, choices: Collection) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices`` (listed in the message)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_count(name: str, value: object, low: int = 1, high: int | None = None, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer in ``[low, high]``.

    ``high`` None: no upper bound; ``optional``: None is allowed too.
    """
    if optional and value is None:
        return
    if not (is_integer(value) and value >= low and (high is None or value <= high)):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bounds}{' or None' if optional else ''}, got {value!r}")


def check_positive(name: str, value: float | None, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is finite and > 0 (or None, if ``optional``)."""
    if optional and value is None:
        return
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be finite and > 0{' or None' if optional else ''}, got {value}")


def check_nonnegative(name: str, value: float | None, optional: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is finite and >= 0 (or None, if ``optional``)."""
    if optional and value is None:
        return
    if not 0 <= value < math.inf:
        raise ValueError(f"{name} must be finite and >= 0{' or None' if optional else ''}, got {value}")
