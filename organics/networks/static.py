"""Static ORGaNICs layers: the circuit's fixed point as a layer's output (static MNIST, Table 1).

A layer drives an n-dimensional ORGaNICs circuit with its input x and outputs the circuit's
fixed point y_s. Its circuit parameters (Table 4 of the paper, as we read it):

- input drive ``z = W_zx x / ||W_zx x||`` (L2-normalised per sample, so ``||z|| = 1``: the
  drive is bounded whatever the input, as in the regime of Fig. 4);
- input gain ``b = sigmoid(W_bx x + c_b)`` in (0, 1), one per sample and neuron;
- normalization gain ``b0 = sigmoid(beta)`` (learned bias), semi-saturation constant
  ``sigma = exp(log_sigma) > 0``, normalization weights ``W = exp(log_W) >= 0``;
- recurrent weights either ``W_r = I`` (closed-form DN fixed point,
  :func:`organics.circuit.dn_fixed_point`) or learned, ``W_r = V / max(1, ||V||_2)`` so that its
  largest singular value is at most 1, with the fixed point found by a fixed number of
  iterations of Algorithm 1 (:func:`unrolled_fixed_point`), differentiable end to end;
- time constants ``tau_y = tau_a = 2`` ms: they do not change the fixed point, only the
  Jacobian of the dynamics there (Fig. 5).

:class:`StaticORGaNICs` stacks circuit layers (128 and 64 neurons by default) under a linear
readout; the MLP baseline is in :mod:`organics.networks.baselines`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..circuit import CircuitTensors, absolute_residual, dn_fixed_point
from ..solver import algorithm1_update

__all__ = [
    "CircuitLayer",
    "CircuitState",
    "StaticORGaNICs",
    "constrain_spectral_norm",
    "fixed_point_residual",
    "unrolled_fixed_point",
]


class CircuitState(NamedTuple):
    """One layer's circuit for a batch: its fixed point ``(y, a)``, drive ``z`` and parameters ``p``.

    ``y, a, z`` have shape (B, n); ``p.b`` has shape (B, n) (the input gain depends on the
    sample), the other parameters are shared by the batch.
    """

    y: torch.Tensor
    a: torch.Tensor
    z: torch.Tensor
    p: CircuitTensors


def constrain_spectral_norm(V: torch.Tensor) -> torch.Tensor:
    """``W_r = V / max(1, sigma_max(V))``: the largest singular value of ``W_r`` is at most 1.

    Leaves ``V`` unchanged when its spectral norm is already <= 1; differentiable.
    """
    return V / torch.clamp(torch.linalg.matrix_norm(V, ord=2), min=1.0)


def unrolled_fixed_point(z: torch.Tensor, p: CircuitTensors, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 in torch: a fixed number of iterations, batched and differentiable through the unrolled loop.

    Starting from the ``W_r = I`` (divisive-normalization) fixed point, repeat
    :func:`organics.solver.algorithm1_update`::

        y <- (I - diag(1 - sqrt(a+)) W_r)^{-1} (b z)
        a <- (sigma b0)^2 + W (a y^2)

    Parameters
    ----------
    z : torch.Tensor, shape (B, n)
        Input drives.
    p : CircuitTensors
        Parameters of the main model (``p.b`` of shape (n,) or (B, n)).
    iterations : int
        Number of iterations (>= 0); the paper's Fig. 4 finds 10-15 enough.

    Returns
    -------
    y, a : torch.Tensor, shape (B, n)
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if p.rectified:
        raise ValueError("Algorithm 1 is defined for the main model (p.rectified must be False)")
    y, a = dn_fixed_point(z, p.b, p.b0, p.sigma, p.W)
    for _ in range(iterations):
        y, a = algorithm1_update(y, a, z, p)
    return y, a


def fixed_point_residual(state: CircuitState) -> torch.Tensor:
    """Absolute residual (max-norm of the drift) at a layer's state, per sample (B,)."""
    return absolute_residual(state.y, state.a, state.z, state.p)


class CircuitLayer(nn.Module):
    """A layer whose output is the fixed point ``y_s`` of an n-dimensional ORGaNICs circuit.

    Parameters
    ----------
    input_size : int
        Input dimension.
    hidden_size : int
        Number n of principal neurons (the circuit has 2n state variables).
    recurrence : {"learned", "identity"}
        Learned ``W_r`` with largest singular value <= 1 (initialised to I), or ``W_r = I``.
    iterations : int
        Iterations of Algorithm 1 in the forward pass (learned ``W_r`` only).
    sigma : float
        Initial semi-saturation constant.
    tau_y, tau_a : float
        Time constants (ms) of the circuit, used only for its Jacobian.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        recurrence: str = "learned",
        iterations: int = 15,
        sigma: float = 0.1,
        tau_y: float = 2.0,
        tau_a: float = 2.0,
    ) -> None:
        super().__init__()
        if recurrence not in ("learned", "identity"):
            raise ValueError(f"recurrence must be 'learned' or 'identity', got {recurrence!r}")
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        n = hidden_size
        for name, value in (("sigma", sigma), ("tau_y", tau_y), ("tau_a", tau_a)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.recurrence = recurrence
        self.iterations = iterations
        self.W_zx = nn.Linear(input_size, n, bias=False)
        self.W_bx = nn.Linear(input_size, n)
        self.b0_logit = nn.Parameter(torch.zeros(n))
        self.log_sigma = nn.Parameter(torch.full((n,), math.log(sigma)))
        self.log_W = nn.Parameter(torch.full((n, n), -math.log(n)))
        self.V_r = nn.Parameter(torch.eye(n)) if recurrence == "learned" else None
        self.register_buffer("tau_y", torch.full((n,), float(tau_y)))
        self.register_buffer("tau_a", torch.full((n,), float(tau_a)))

    @property
    def W_r(self) -> torch.Tensor:
        """Recurrent weights: ``V_r / max(1, ||V_r||_2)``, or the identity."""
        if self.V_r is None:
            return torch.eye(self.log_W.shape[0], dtype=self.log_W.dtype, device=self.log_W.device)
        return constrain_spectral_norm(self.V_r)

    def circuit(self, x: torch.Tensor) -> tuple[torch.Tensor, CircuitTensors]:
        """The drive ``z`` (B, n) and the circuit parameters for a batch ``x`` (B, input_size)."""
        z = F.normalize(self.W_zx(x), dim=-1)
        p = CircuitTensors(
            b=torch.sigmoid(self.W_bx(x)),
            b0=torch.sigmoid(self.b0_logit),
            sigma=torch.exp(self.log_sigma),
            tau_y=self.tau_y,
            tau_a=self.tau_a,
            W=torch.exp(self.log_W),
            W_r=self.W_r,
            rectified=False,
        )
        return z, p

    def fixed_point(self, x: torch.Tensor, iterations: int | None = None) -> CircuitState:
        """The circuit's fixed point for a batch ``x``.

        ``iterations`` overrides the number of Algorithm 1 iterations (learned ``W_r``);
        with ``W_r = I`` the closed form is exact and ``iterations`` is ignored.
        """
        z, p = self.circuit(x)
        if self.V_r is None:
            y, a = dn_fixed_point(z, p.b, p.b0, p.sigma, p.W)
        else:
            y, a = unrolled_fixed_point(z, p, self.iterations if iterations is None else iterations)
        return CircuitState(y, a, z, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fixed-point response ``y_s`` (B, n) of the circuit driven by ``x`` (B, input_size)."""
        return self.fixed_point(x).y


class StaticORGaNICs(nn.Module):
    """Stacked circuit layers and a linear readout: ``logits = W_o y_s^(L) + c_o``.

    Parameters
    ----------
    input_size : int
        Input dimension (784 for MNIST).
    hidden_sizes : sequence of int
        Neurons per circuit layer (the paper: about 128 and 64).
    num_classes : int
        Number of logits.
    **layer_kwargs
        Passed to every :class:`CircuitLayer` (``recurrence``, ``iterations``, ``sigma``,
        ``tau_y``, ``tau_a``).
    """

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (128, 64),
        num_classes: int = 10,
        **layer_kwargs,
    ) -> None:
        super().__init__()
        if len(hidden_sizes) == 0:
            raise ValueError("hidden_sizes must list at least one layer size")
        sizes = [input_size, *hidden_sizes]
        self.layers = nn.ModuleList(CircuitLayer(i, o, **layer_kwargs) for i, o in pairwise(sizes))
        self.readout = nn.Linear(sizes[-1], num_classes)

    def fixed_points(self, x: torch.Tensor, iterations: int | None = None) -> list[CircuitState]:
        """Each layer's circuit state for a batch; layer k+1 is driven by layer k's ``y``."""
        states = []
        h = x
        for layer in self.layers:
            states.append(layer.fixed_point(h, iterations))
            h = states[-1].y
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for a batch of flat images ``x`` (B, input_size)."""
        h = x
        for layer in self.layers:
            h = layer(h)
        return self.readout(h)
