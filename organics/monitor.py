"""Stability monitor: eigenvalues of the circuit Jacobian at a trained layer's fixed point (Figs. 5, 6).

For the state ``s = (y, a)`` of an n-dimensional circuit, the Jacobian

    J = d(dy/dt, da/dt) / d(y, a),     shape (2n, 2n),

is computed per sample with :func:`torch.func.jacrev` over :func:`organics.model.drift`
(vectorised over the batch with :func:`torch.func.vmap`), so it holds for the main and the
rectified model and any ``W_r``. The fixed point is locally asymptotically stable when the
largest real part of the eigenvalues of J is negative (indirect method of Lyapunov).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from .layers import CircuitState, steady_state_residual
from .model import drift

__all__ = ["LayerStability", "circuit_jacobian", "largest_real_part", "layer_stability"]


class LayerStability(NamedTuple):
    """Per-sample stability of one layer's circuit: ``max_real`` and fixed-point ``residual``, (B,)."""

    max_real: torch.Tensor
    residual: torch.Tensor


def circuit_jacobian(state: CircuitState) -> torch.Tensor:
    """Jacobian ``d(dy/dt, da/dt)/d(y, a)`` of the circuit at ``(state.y, state.a)``, shape (B, 2n, 2n).

    Rows and columns are ordered ``[y_1..y_n, a_1..a_n]``. ``state.p.b`` may be shared,
    shape (n,), or per sample, shape (B, n); the other parameters are shared by the batch.
    """
    y, a, z, p = state
    b = p.b.expand_as(z)

    def velocity(y_i: torch.Tensor, a_i: torch.Tensor, z_i: torch.Tensor, b_i: torch.Tensor) -> torch.Tensor:
        dy, da = drift(y_i, a_i, z_i, p._replace(b=b_i))
        return torch.cat([dy, da])

    jac_y, jac_a = torch.func.vmap(torch.func.jacrev(velocity, argnums=(0, 1)))(y, a, z, b)
    return torch.cat([jac_y, jac_a], dim=-1)


def largest_real_part(jacobian: torch.Tensor) -> torch.Tensor:
    """``max_k Re(lambda_k)`` over the eigenvalues of each matrix in a batch (B, m, m) -> (B,)."""
    return torch.linalg.eigvals(jacobian).real.amax(-1)


def layer_stability(model: nn.Module, x: torch.Tensor, iterations: int = 100) -> list[LayerStability]:
    """Largest real part of the Jacobian's eigenvalues at each layer's fixed point, per input.

    The model (any module with a ``fixed_points(x, iterations)`` method returning one
    :class:`~organics.layers.CircuitState` per layer, e.g. :class:`~organics.layers.StaticORGaNICs`)
    is copied to float64 and its fixed points refined with ``iterations`` iterations of
    Algorithm 1, so the Jacobian is evaluated at the fixed point itself (``residual`` reports
    how closely: max-norm of the drift there).

    Parameters
    ----------
    model : nn.Module
    x : torch.Tensor
        A batch of inputs.
    iterations : int
        Algorithm 1 iterations used to refine the fixed points.
    """
    if not hasattr(model, "fixed_points"):
        raise ValueError(f"model must have a fixed_points method, {type(model).__name__} has none")
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        states = model64.fixed_points(x.double(), iterations)
    return [
        LayerStability(largest_real_part(circuit_jacobian(state)), steady_state_residual(state)) for state in states
    ]
