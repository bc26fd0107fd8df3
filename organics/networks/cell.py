"""The ORGaNICs cell: one explicit Euler step of the circuit per input, the readable definition.

The cell integrates the circuit (:func:`organics.circuit.drift`) with one explicit Euler step per
element of the input sequence, with dynamic gains and learned step sizes (the paper's
sequential-MNIST model, Table 2)::

    z   = relu(W_zx x)
    b   <- b  + dt_b  (-b  + sigmoid(W_bx x + c_b + W_by y + W_ba a))
    b0  <- b0 + dt_b0 (-b0 + sigmoid(W_b0x x + c_b0 + W_b0y y + W_b0a a))
    y   <- y  + dt_y  (-y + b z + (1 - sqrt(a+)) W_r r(y))
    a   <- a  + dt_a  (-a + (sigma b0)^2 + W (a+ r(y)^2))

with ``r(y) = y`` (main model) or ``r(y) = y+`` (rectified model), all four updates computed
from the state before the step, and per-neuron step sizes ``dt/tau = tau_max sigmoid(p)``.

:class:`ORGaNICsCell` is the readable definition (one step, plain autograd). The sequence
classifier :class:`organics.networks.rnn.ORGaNICsRNN` runs it over a sequence either step by step
(``impl="loop"``) or through the fast whole-sequence scan of :mod:`organics.networks.scan`,
which computes the same function and gradients.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..circuit import CircuitTensors, drift, relu

__all__ = ["INITIAL_GAIN", "TAU_MAX", "CellState", "ORGaNICsCell", "check_sequence"]

TAU_MAX = {"y": 0.02, "a": 0.005, "b": 0.1, "b0": 0.1}
"""Largest step size ``dt/tau`` of each state variable (the learned one is ``tau_max sigmoid(p)``)."""

INITIAL_GAIN = 0.5
"""Initial value of both gains b and b0: sigmoid(0), their resting value for zero drive."""


class CellState(NamedTuple):
    """State of the cell: principal neurons y, modulators a, input gain b, normalization gain b0."""

    y: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    b0: torch.Tensor


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class ORGaNICsCell(nn.Module):
    """One explicit Euler step of ORGaNICs with dynamic gains (see the module docstring).

    Parameters
    ----------
    input_size : int
        Dimension of each input x_t (1 for pixel-by-pixel MNIST).
    hidden_size : int
        Number n of principal neurons y (and of modulators a).
    rectified : bool
        Use the rectified model ``r(y) = y+`` instead of the main model ``r(y) = y``.

    Notes
    -----
    Learned parameters and their initialisation:

    - ``W_zx, W_bx, W_b0x`` (n, input_size), ``W_by, W_ba, W_b0y, W_b0a`` (n, n): uniform in
      ``+-1/sqrt(fan_in)`` (PyTorch's default for linear layers); biases ``c_b, c_b0`` (n,): 0.
    - ``W_r`` (n, n): a random orthogonal matrix.
    - ``W = clamp(exp(log_W), 0, 1)`` (n, n): ``log_W = -log n``, i.e. uniform pooling ``W = 1/n``.
    - ``sigma = exp(log_sigma)`` (n,): 0.1.
    - ``dt/tau = tau_max sigmoid(p)`` (n,) for y, a, b, b0 with ``tau_max`` from :data:`TAU_MAX`:
      ``p = 0``, i.e. half of ``tau_max``.

    Initial state (:meth:`initial_state`): ``y = 0``, gains ``b = b0 = 1/2`` (their resting value
    for zero drive), and ``a = (sigma b0)^2``, the modulators' fixed point for ``y = 0``.
    """

    def __init__(self, input_size: int, hidden_size: int, rectified: bool = False) -> None:
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        n = hidden_size
        self.input_size = input_size
        self.hidden_size = n
        self.rectified = bool(rectified)
        self.W_zx = _uniform((n, input_size), input_size)
        self.W_bx = _uniform((n, input_size), input_size)
        self.W_b0x = _uniform((n, input_size), input_size)
        self.c_b = nn.Parameter(torch.zeros(n))
        self.c_b0 = nn.Parameter(torch.zeros(n))
        self.W_by = _uniform((n, n), n)
        self.W_ba = _uniform((n, n), n)
        self.W_b0y = _uniform((n, n), n)
        self.W_b0a = _uniform((n, n), n)
        self.W_r = nn.Parameter(nn.init.orthogonal_(torch.empty(n, n)))
        self.log_W = nn.Parameter(torch.full((n, n), -math.log(n)))
        self.log_sigma = nn.Parameter(torch.full((n,), math.log(0.1)))
        self.p_y = nn.Parameter(torch.zeros(n))
        self.p_a = nn.Parameter(torch.zeros(n))
        self.p_b = nn.Parameter(torch.zeros(n))
        self.p_b0 = nn.Parameter(torch.zeros(n))

    @property
    def W(self) -> torch.Tensor:
        """Normalization weights ``W = clamp(exp(log_W), 0, 1)``."""
        return torch.clamp(torch.exp(self.log_W), 0.0, 1.0)

    @property
    def sigma(self) -> torch.Tensor:
        """Semi-saturation constants ``sigma = exp(log_sigma) > 0``."""
        return torch.exp(self.log_sigma)

    def step_sizes(self) -> CellState:
        """Per-neuron step sizes ``dt/tau = tau_max sigmoid(p)`` of y, a, b and b0."""
        return CellState(
            TAU_MAX["y"] * torch.sigmoid(self.p_y),
            TAU_MAX["a"] * torch.sigmoid(self.p_a),
            TAU_MAX["b"] * torch.sigmoid(self.p_b),
            TAU_MAX["b0"] * torch.sigmoid(self.p_b0),
        )

    def initial_state(self, batch: int) -> CellState:
        """``y = 0``, ``b = b0 = 1/2`` and ``a = (sigma b0)^2``, each of shape (batch, n)."""
        zeros = self.W_r.new_zeros(batch, self.hidden_size)
        gain = zeros + INITIAL_GAIN
        return CellState(zeros, zeros + (self.sigma * INITIAL_GAIN) ** 2, gain, gain)

    def circuit(self, b: torch.Tensor, b0: torch.Tensor) -> CircuitTensors:
        """The circuit's parameters at the current gains, with unit time constants."""
        one = self.W_r.new_ones(())
        return CircuitTensors(b, b0, self.sigma, one, one, self.W, self.W_r, self.rectified)

    def forward(self, x: torch.Tensor, state: CellState) -> CellState:
        """One explicit Euler step from ``state`` driven by the input ``x`` of shape (batch, input_size)."""
        y, a, b, b0 = state
        z = relu(x @ self.W_zx.T)
        b_drive = torch.sigmoid(x @ self.W_bx.T + self.c_b + y @ self.W_by.T + a @ self.W_ba.T)
        b0_drive = torch.sigmoid(x @ self.W_b0x.T + self.c_b0 + y @ self.W_b0y.T + a @ self.W_b0a.T)
        f_y, f_a = drift(y, a, z, self.circuit(b, b0))
        dt_y, dt_a, dt_b, dt_b0 = self.step_sizes()
        return CellState(
            y + dt_y * f_y,
            a + dt_a * f_a,
            b + dt_b * (b_drive - b),
            b0 + dt_b0 * (b0_drive - b0),
        )


def check_sequence(x: torch.Tensor, input_size: int) -> None:
    """Raise ``ValueError`` unless ``x`` is a batch-first sequence batch of shape (batch >= 1, T >= 1, input_size)."""
    if x.ndim != 3 or x.shape[-1] != input_size:
        raise ValueError(f"x must have shape (batch, T, {input_size}), got {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x needs at least one sequence and one time step, got shape {tuple(x.shape)}")
