"""Static ORGaNICs layers: the circuit's steady state as a layer's output (static MNIST, Table 1).

A layer drives an n-dimensional ORGaNICs circuit with its input x and outputs the circuit's
fixed point y_s. Its circuit parameters (Table 4 of the paper, as we read it):

- input drive ``z = W_zx x / ||W_zx x||`` (L2-normalised per sample, so ``||z|| = 1``: the
  drive is bounded whatever the input, as in the regime of Fig. 4);
- input gain ``b = sigmoid(W_bx x + c_b)`` in (0, 1), one per sample and neuron;
- normalization gain ``b0 = sigmoid(beta)`` (learned bias), semi-saturation constant
  ``sigma = exp(log_sigma) > 0``, normalization weights ``W = exp(log_W) >= 0``;
- recurrent weights either ``W_r = I`` (closed-form DN steady state, :func:`dn_steady_state`)
  or learned, ``W_r = V / max(1, ||V||_2)`` so that its largest singular value is at most 1,
  with the steady state found by a fixed number of iterations of Algorithm 1
  (:func:`iterate_steady_state`), differentiable end to end;
- time constants ``tau_y = tau_a = 2`` ms: they do not change the fixed point, only the
  Jacobian of the dynamics there (Fig. 5).

Models: ``"organics2"`` (:class:`StaticORGaNICs`, two circuit layers of 128 and 64 neurons
and a linear readout) and the baseline ``"mlp"`` (:class:`MLP`, 784-300-100-10 with ReLU,
a parameter count close to that of ``organics2``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .model import CircuitTensors, dn_steady_state, drift
from .registry import register_model

__all__ = [
    "CircuitLayer",
    "CircuitState",
    "MLP",
    "StaticORGaNICs",
    "constrain_spectral_norm",
    "iterate_steady_state",
    "steady_state_residual",
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


def iterate_steady_state(z: torch.Tensor, p: CircuitTensors, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 in torch: a fixed number of iterations, batched and differentiable.

    Starting from the ``W_r = I`` (divisive-normalization) steady state, repeat::

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
    y, a = dn_steady_state(z, p.b, p.b0, p.sigma, p.W)
    bz = (p.b * z).unsqueeze(-1)
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    for _ in range(iterations):
        gain = 1 - torch.sqrt(torch.clamp(a, min=0))
        y = torch.linalg.solve(eye - gain.unsqueeze(-1) * p.W_r, bz).squeeze(-1)
        a = (p.sigma * p.b0) ** 2 + (a * y**2) @ p.W.T
    return y, a


def steady_state_residual(state: CircuitState) -> torch.Tensor:
    """Max-norm over neurons of the drift ``(dy/dt, da/dt)`` at the state, per sample (B,)."""
    dy, da = drift(state.y, state.a, state.z, state.p)
    return torch.maximum(dy.abs().amax(-1), da.abs().amax(-1))


class CircuitLayer(nn.Module):
    """A layer whose output is the steady state ``y_s`` of an n-dimensional ORGaNICs circuit.

    Parameters
    ----------
    in_features : int
        Input dimension.
    n : int
        Number of principal neurons (the circuit has 2n state variables).
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
        in_features: int,
        n: int,
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
        for name, value in (("in_features", in_features), ("n", n)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("sigma", sigma), ("tau_y", tau_y), ("tau_a", tau_a)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.recurrence = recurrence
        self.iterations = iterations
        self.W_zx = nn.Linear(in_features, n, bias=False)
        self.W_bx = nn.Linear(in_features, n)
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
        """The drive ``z`` (B, n) and the circuit parameters for a batch ``x`` (B, in_features)."""
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
            y, a = dn_steady_state(z, p.b, p.b0, p.sigma, p.W)
        else:
            y, a = iterate_steady_state(z, p, self.iterations if iterations is None else iterations)
        return CircuitState(y, a, z, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Steady-state response ``y_s`` (B, n) of the circuit driven by ``x`` (B, in_features)."""
        return self.fixed_point(x).y


class StaticORGaNICs(nn.Module):
    """Stacked circuit layers and a linear readout: ``logits = W_o y_s^(L) + c_o``.

    Parameters
    ----------
    in_features : int
        Input dimension (784 for MNIST).
    n_classes : int
        Number of classes.
    hidden : sequence of int
        Neurons per circuit layer (the paper: about 128 and 64).
    **layer_kwargs
        Passed to every :class:`CircuitLayer` (``recurrence``, ``iterations``, ``sigma``,
        ``tau_y``, ``tau_a``).
    """

    def __init__(
        self, in_features: int, n_classes: int = 10, hidden: Sequence[int] = (128, 64), **layer_kwargs
    ) -> None:
        super().__init__()
        if len(hidden) == 0:
            raise ValueError("hidden must list at least one layer size")
        sizes = [in_features, *hidden]
        self.layers = nn.ModuleList(CircuitLayer(i, o, **layer_kwargs) for i, o in pairwise(sizes))
        self.readout = nn.Linear(sizes[-1], n_classes)

    def fixed_points(self, x: torch.Tensor, iterations: int | None = None) -> list[CircuitState]:
        """Each layer's circuit state for a batch; layer k+1 is driven by layer k's ``y``."""
        states = []
        h = x
        for layer in self.layers:
            states.append(layer.fixed_point(h, iterations))
            h = states[-1].y
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) for a batch of flat images ``x`` (B, in_features)."""
        h = x
        for layer in self.layers:
            h = layer(h)
        return self.readout(h)


class MLP(nn.Module):
    """Multilayer perceptron baseline with ReLU hidden units (784-300-100-10 by default)."""

    def __init__(self, in_features: int, n_classes: int = 10, hidden: Sequence[int] = (300, 100)) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        blocks: list[nn.Module] = []
        for i, o in pairwise(sizes):
            blocks += [nn.Linear(i, o), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(sizes[-1], n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) for a batch ``x`` (B, in_features)."""
        return self.net(x)


register_model("organics2", StaticORGaNICs)
register_model("mlp", MLP)
