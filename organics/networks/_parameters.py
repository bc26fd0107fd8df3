"""What the cell and the static layer share in how they declare and initialise their parameters."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._checks import check_choice

NORMALIZATIONS = ("pooling", "exp_uniform")


def check_choices(options: Any, choices: dict[str, tuple[str, ...]]) -> None:
    """Raise ``ValueError`` naming the first field of ``options`` whose value is not among its choices."""
    for name, allowed in choices.items():
        check_choice(name, getattr(options, name), allowed)


def register(module: nn.Module, name: str, value: torch.Tensor, *, learned: bool) -> None:
    """Register ``value`` on ``module`` as a learned parameter or as a fixed buffer (saved, not trained)."""
    if learned:
        module.register_parameter(name, nn.Parameter(value))
    else:
        module.register_buffer(name, value)


def initial_log_W(n: int, normalization: str) -> torch.Tensor:
    """``log_W`` at initialisation: ``-log n`` everywhere (``"pooling"``, ``W = 1/n``), or ``U(-1, 0)`` off the
    diagonal and 0 on it (``"exp_uniform"``, the paper-era ``W = exp(log_W)`` in ``[1/e, 1]`` with a unit diagonal)."""
    if normalization == "pooling":
        return torch.full((n, n), -math.log(n))
    return torch.empty(n, n).uniform_(-1.0, 0.0).fill_diagonal_(0.0)
