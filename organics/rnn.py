"""ORGaNICs as a recurrent neural network: one explicit Euler step of the circuit per input.

The cell integrates the circuit (:func:`organics.model.drift`) with one explicit Euler step per
element of the input sequence, with dynamic gains and learned step sizes (the paper's
sequential-MNIST model, Table 2)::

    z   = relu(W_zx x)
    b   <- b  + dt_b  (-b  + sigmoid(W_bx x + c_b + W_by y + W_ba a))
    b0  <- b0 + dt_b0 (-b0 + sigmoid(W_b0x x + c_b0 + W_b0y y + W_b0a a))
    y   <- y  + dt_y  (-y + b z + (1 - sqrt(a+)) W_r r(y))
    a   <- a  + dt_a  (-a + (sigma b0)^2 + W (a+ r(y)^2))

with ``r(y) = y`` (main model) or ``r(y) = y+`` (rectified model), all four updates computed
from the state before the step, and per-neuron step sizes ``dt/tau = tau_max sigmoid(p)``.

:class:`ORGaNICsCell` is the readable definition (one step, plain autograd);
:class:`ORGaNICsRNN` runs it over a sequence, by default through the fast whole-sequence
implementation of :mod:`organics.fast_rnn`, which computes the same function and gradients.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .model import CircuitTensors, drift, relu
from .registry import register_model

__all__ = [
    "TAU_MAX",
    "CellState",
    "ORGaNICsCell",
    "ORGaNICsRNN",
    "LSTMClassifier",
    "RNNTrajectory",
    "parameter_table",
]

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


class RNNTrajectory(NamedTuple):
    """States after each input: ``y`` and ``a`` of shape (batch, T, hidden_size)."""

    y: torch.Tensor
    a: torch.Tensor


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


IMPLEMENTATIONS = ("auto", "reference", "fast")


def _check_sequence(x: torch.Tensor, input_size: int) -> None:
    if x.ndim != 3 or x.shape[-1] != input_size:
        raise ValueError(f"x must have shape (batch, T, {input_size}), got {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x needs at least one sequence and one time step, got shape {tuple(x.shape)}")


class ORGaNICsRNN(nn.Module):
    """Sequence classifier: an :class:`ORGaNICsCell` run over the input, read out linearly from the final y.

    Parameters
    ----------
    input_size : int
        Dimension of each input x_t (1 for sequential MNIST).
    hidden_size : int
        Number of principal neurons (128 in the paper's Table 2).
    num_classes : int
        Number of logits.
    rectified : bool
        Rectified model instead of the main model.
    impl : {"auto", "reference", "fast"}
        ``"reference"`` loops over :meth:`ORGaNICsCell.forward` with plain autograd;
        ``"fast"`` uses :func:`organics.fast_rnn.organics_scan` (hand-written backpropagation
        through time, fused CUDA kernels on a GPU); ``"auto"`` takes the fast path wherever it
        supports the input (float32 and float64 on CPU and CUDA) and the reference otherwise.
    """

    def __init__(
        self,
        input_size: int = 1,
        hidden_size: int = 128,
        num_classes: int = 10,
        rectified: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.cell = ORGaNICsCell(input_size, hidden_size, rectified)
        self.readout = nn.Linear(hidden_size, num_classes)
        self.impl = impl

    @property
    def impl(self) -> str:
        """Which implementation runs the recurrence: "auto", "reference" or "fast"."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {value!r}")
        self._impl = value

    def _use_fast(self, x: torch.Tensor) -> bool:
        from .fast_rnn import supports

        if self.impl == "fast":
            if not supports(x):
                raise ValueError(f"impl='fast' needs float32 or float64 input, got {x.dtype}")
            return True
        return self.impl == "auto" and supports(x)

    def run(self, x: torch.Tensor, return_trajectory: bool = False) -> tuple[torch.Tensor, RNNTrajectory | None]:
        """Final ``y`` (batch, n) after the whole sequence and, if asked, the trajectory of y and a.

        Parameters
        ----------
        x : torch.Tensor, shape (batch, T, input_size)
            Batch-first input sequences, any length T >= 1.
        return_trajectory : bool
            Also return :class:`RNNTrajectory` with y and a after each input, shape (batch, T, n).
        """
        _check_sequence(x, self.cell.input_size)
        if self._use_fast(x):
            from .fast_rnn import organics_scan

            return organics_scan(self.cell, x, return_trajectory)
        state = self.cell.initial_state(x.shape[0])
        ys, as_ = [], []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            if return_trajectory:
                ys.append(state.y)
                as_.append(state.a)
        trajectory = RNNTrajectory(torch.stack(ys, 1), torch.stack(as_, 1)) if return_trajectory else None
        return state.y, trajectory

    def forward(
        self, x: torch.Tensor, return_trajectory: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, RNNTrajectory]:
        """Logits (batch, num_classes) from the final y; with the trajectory if ``return_trajectory``."""
        y, trajectory = self.run(x, return_trajectory)
        logits = self.readout(y)
        return (logits, trajectory) if return_trajectory else logits

    def parameter_count(self) -> int:
        """Number of learned scalars (the paper's Table 2 column "# params")."""
        return sum(p.numel() for p in self.parameters())


class LSTMClassifier(nn.Module):
    """Baseline: ``nn.LSTM`` (batch first) over the sequence and a linear readout of the final hidden state."""

    def __init__(self, input_size: int = 1, hidden_size: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.readout = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, num_classes) for input sequences x of shape (batch, T, input_size)."""
        _check_sequence(x, self.lstm.input_size)
        _, (h, _) = self.lstm(x)
        return self.readout(h[-1])

    def parameter_count(self) -> int:
        """Number of learned scalars."""
        return sum(p.numel() for p in self.parameters())


def parameter_table(model: nn.Module) -> str:
    """A plain-text table of a model's parameters: name, shape, count, and the total (cf. Table 2)."""
    rows = [(name, "x".join(map(str, p.shape)), p.numel()) for name, p in model.named_parameters()]
    width = max([len(r[0]) for r in rows] + [len("total")])
    lines = [f"{'parameter':<{width}}  {'shape':>10}  {'count':>8}"]
    lines += [f"{name:<{width}}  {shape:>10}  {count:>8,}" for name, shape, count in rows]
    lines.append(f"{'total':<{width}}  {'':>10}  {sum(r[2] for r in rows):>8,}")
    return "\n".join(lines)


def _organics_rnn(
    in_features: int, n_classes: int, hidden_size: int = 128, rectified: bool = False, impl: str = "auto"
) -> ORGaNICsRNN:
    return ORGaNICsRNN(in_features, hidden_size, n_classes, rectified=rectified, impl=impl)


def _lstm(in_features: int, n_classes: int, hidden_size: int = 128) -> LSTMClassifier:
    return LSTMClassifier(in_features, hidden_size, n_classes)


register_model("organics_rnn", _organics_rnn)
register_model("lstm", _lstm)
