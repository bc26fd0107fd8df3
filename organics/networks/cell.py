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
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from .._checks import check_choice, check_count, check_positive
from ..circuit import CircuitTensors, drift, relu
from ._parameters import NORMALIZATIONS, check_choices, initial_log_W, register

__all__ = [
    "INITIAL_GAIN",
    "PRESETS",
    "TAU_MAX",
    "CellOptions",
    "CellState",
    "ORGaNICsCell",
    "cell_options",
    "check_sequence",
]

TAU_MAX = {"y": 0.02, "a": 0.005, "b": 0.1, "b0": 0.1}
"""Largest step size ``dt/tau`` of each state variable (the learned one is ``tau_max sigmoid(p)``)."""

INITIAL_GAIN = 0.5
"""Initial value of both gains b and b0, sigmoid(0), their resting value for zero drive."""


class CellState(NamedTuple):
    """State of the cell: principal neurons y, modulators a, input gain b, normalization gain b0."""

    y: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    b0: torch.Tensor


def _uniform(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


RECURRENCES = ("free", "identity", "identity_plus_sn")
DRIVES = ("relu", "signed")
STEP_SIZES = ("learned", "learned_normal", "fixed")
INITIAL_STATES = ("rest", "random")


@dataclass(frozen=True)
class CellOptions:
    """How an :class:`ORGaNICsCell` is parametrised and initialised (the defaults are this package's first cell).

    Attributes
    ----------
    rectified : bool
        Rectified model ``r(y) = y+`` (the paper's, Eq. 102) instead of the main model ``r(y) = y``.
    recurrence : {"free", "identity", "identity_plus_sn"}
        ``W_r = V_r`` learned freely (``V_r`` initialised to a random orthogonal matrix);
        ``W_r = I``; or ``W_r = I + V_r / sigma_max(V_r)`` with ``V_r`` initialised to I, so
        ``||W_r - I||_2 = 1`` throughout training and ``W_r = 2I`` at initialisation. The
        largest singular value is computed exactly (``torch.linalg.matrix_norm(V_r, 2)``, whose
        gradient is stable), not estimated by power iteration as ``torch.nn.utils.parametrizations
        .spectral_norm`` does: the readable cell and every engine of the scan then compute the
        same ``W_r`` with no hidden state to keep in step or to save, and one SVD of an n x n
        matrix per sequence batch costs nothing beside the T steps.
    drive : {"relu", "signed"}
        Input drive ``z = relu(W_zx x)`` or ``z = W_zx x``.
    unit_norm_drive : bool
        Divide the initial ``W_zx`` (uniform in ``+-1/sqrt(fan_in)``) by its largest singular value.
    sigma : float
        Initial (or fixed) semi-saturation constant of every neuron.
    learn_sigma : bool
        Whether ``sigma = exp(log_sigma)`` is learned.
    normalization : {"pooling", "exp_uniform"}
        ``W = clamp(exp(log_W), 0, 1)`` with ``log_W = -log n`` (uniform pooling ``W = 1/n``); or
        ``W = exp(log_W)`` unclamped with ``log_W ~ U(-1, 0)`` off the diagonal and 0 on it.
    gain_bias : bool
        Whether the gain drives have learned biases ``c_b, c_b0`` (else they are 0).
    step_sizes : {"learned", "learned_normal", "fixed"}
        ``dt/tau = tau_max sigmoid(p)`` with ``p`` learned from 0, learned from ``N(0, 1)``, or
        fixed at ``p = 1`` (the paper's "fixed time constants").
    initial_state : {"rest", "random"}
        ``y = 0``, ``b = b0 = 1/2``, ``a = (sigma b0)^2`` (the rest state without input); or fixed
        random buffers shared by all sequences: ``y = u/||u||`` with ``u ~ U(0, 1)^n``,
        ``a ~ U(0, 1)^n``, ``b ~ U(0, 1)^n``, ``b0 = 1``.
    """

    rectified: bool = False
    recurrence: str = "free"
    drive: str = "relu"
    unit_norm_drive: bool = False
    sigma: float = 0.1
    learn_sigma: bool = True
    normalization: str = "pooling"
    gain_bias: bool = True
    step_sizes: str = "learned"
    initial_state: str = "rest"

    def __post_init__(self) -> None:
        check_choices(
            self,
            dict(
                recurrence=RECURRENCES,
                drive=DRIVES,
                normalization=NORMALIZATIONS,
                step_sizes=STEP_SIZES,
                initial_state=INITIAL_STATES,
            ),
        )
        check_positive("sigma", self.sigma)


PRESETS = {
    "original": CellOptions(),
    "paper": CellOptions(
        rectified=True,
        recurrence="identity_plus_sn",
        drive="signed",
        unit_norm_drive=True,
        sigma=1.0,
        learn_sigma=False,
        normalization="exp_uniform",
        gain_bias=False,
        step_sizes="learned_normal",
        initial_state="random",
    ),
}
"""Named cell configurations, ``"original"`` (this package's first cell, the default) and ``"paper"``
(the paper-era cell of the authors' first public code, Table 2's learned-time-constant rows;
``step_sizes="fixed"`` gives its fixed-time-constant rows)."""


def cell_options(preset: str = "original", **overrides: Any) -> CellOptions:
    """``PRESETS[preset]`` with ``overrides`` (any :class:`CellOptions` field) applied.

    Raises
    ------
    ValueError
        For an unknown preset or option, or an option value out of range.
    """
    check_choice("preset", preset, tuple(PRESETS))
    unknown = sorted(set(overrides) - {f.name for f in fields(CellOptions)})
    if unknown:
        raise ValueError(f"unknown cell options {unknown}; options are {[f.name for f in fields(CellOptions)]}")
    return replace(PRESETS[preset], **overrides)


class ORGaNICsCell(nn.Module):
    """One explicit Euler step of ORGaNICs with dynamic gains (see the module docstring).

    Parameters
    ----------
    input_size : int
        Dimension of each input x_t (1 for pixel-by-pixel MNIST).
    hidden_size : int
        Number n of principal neurons y (and of modulators a).
    options : CellOptions, optional
        Parametrisation and initialisation; :data:`PRESETS` ``["original"]`` if omitted.

    Notes
    -----
    Learned parameters and their initialisation (the options say which are fixed buffers instead):

    - ``W_zx, W_bx, W_b0x`` (n, input_size), ``W_by, W_ba, W_b0y, W_b0a`` (n, n): uniform in
      ``+-1/sqrt(fan_in)`` (PyTorch's default for linear layers); gain biases ``c_b, c_b0`` (n,): 0.
    - ``V_r`` (n, n): recurrent weights, see ``CellOptions.recurrence``.
    - ``log_W`` (n, n): normalization weights, see ``CellOptions.normalization``.
    - ``log_sigma`` (n,): ``sigma = exp(log_sigma)``.
    - ``p_y, p_a, p_b, p_b0`` (n,): step sizes ``dt/tau = tau_max sigmoid(p)`` with ``tau_max``
      from :data:`TAU_MAX`.

    The random draws happen in this order (so a seed fixes the cell): the three input weights,
    the four gain weights, ``V_r`` (free recurrence), ``log_W`` (exp_uniform), ``p``
    (learned_normal), the initial-state buffers (random).
    """

    def __init__(self, input_size: int, hidden_size: int, options: CellOptions | None = None) -> None:
        super().__init__()
        check_count("input_size", input_size)
        check_count("hidden_size", hidden_size)
        n = hidden_size
        self.input_size = input_size
        self.hidden_size = n
        self.options = opt = options or PRESETS["original"]
        self.rectified = opt.rectified
        W_zx = _uniform((n, input_size), input_size)
        if opt.unit_norm_drive:
            W_zx = W_zx / torch.linalg.matrix_norm(W_zx, ord=2)
        self.W_zx = nn.Parameter(W_zx)
        self.W_bx = nn.Parameter(_uniform((n, input_size), input_size))
        self.W_b0x = nn.Parameter(_uniform((n, input_size), input_size))
        register(self, "c_b", torch.zeros(n), learned=opt.gain_bias)
        register(self, "c_b0", torch.zeros(n), learned=opt.gain_bias)
        self.W_by = nn.Parameter(_uniform((n, n), n))
        self.W_ba = nn.Parameter(_uniform((n, n), n))
        self.W_b0y = nn.Parameter(_uniform((n, n), n))
        self.W_b0a = nn.Parameter(_uniform((n, n), n))
        if opt.recurrence == "free":
            self.V_r = nn.Parameter(nn.init.orthogonal_(torch.empty(n, n)))
        elif opt.recurrence == "identity_plus_sn":
            self.V_r = nn.Parameter(torch.eye(n))
        self.log_W = nn.Parameter(initial_log_W(n, opt.normalization))
        register(self, "log_sigma", torch.full((n,), math.log(opt.sigma)), learned=opt.learn_sigma)
        for name in ("p_y", "p_a", "p_b", "p_b0"):
            p = {"learned": torch.zeros, "learned_normal": torch.randn, "fixed": torch.ones}[opt.step_sizes](n)
            register(self, name, p, learned=opt.step_sizes != "fixed")
        if opt.initial_state == "random":
            u = torch.rand(n)
            self.register_buffer("y_init", u / u.norm())
            self.register_buffer("a_init", torch.rand(n))
            self.register_buffer("b_init", torch.rand(n))
            self.register_buffer("b0_init", torch.ones(n))

    @property
    def W_r(self) -> torch.Tensor:
        """Recurrent weights (``CellOptions.recurrence``): ``V_r``, ``I`` or ``I + V_r / sigma_max(V_r)``."""
        recurrence = self.options.recurrence
        if recurrence == "free":
            return self.V_r
        eye = torch.eye(self.hidden_size, dtype=self.log_W.dtype, device=self.log_W.device)
        if recurrence == "identity":
            return eye
        return eye + self.V_r / torch.linalg.matrix_norm(self.V_r, ord=2)

    @property
    def W(self) -> torch.Tensor:
        """Normalization weights, ``clamp(exp(log_W), 0, 1)`` (pooling) or ``exp(log_W)`` (exp_uniform)."""
        W = torch.exp(self.log_W)
        return torch.clamp(W, 0.0, 1.0) if self.options.normalization == "pooling" else W

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
        """The state before the first input, each of shape (batch, n) (``CellOptions.initial_state``)."""
        zeros = self.log_W.new_zeros(batch, self.hidden_size)
        if self.options.initial_state == "random":
            return CellState(zeros + self.y_init, zeros + self.a_init, zeros + self.b_init, zeros + self.b0_init)
        gain = zeros + INITIAL_GAIN
        return CellState(zeros, zeros + (self.sigma * INITIAL_GAIN) ** 2, gain, gain)

    def drive(self, x: torch.Tensor) -> torch.Tensor:
        """Input drive ``z = relu(W_zx x)`` or ``z = W_zx x`` (``CellOptions.drive``), ``x`` (..., input_size)."""
        z = x @ self.W_zx.T
        return relu(z) if self.options.drive == "relu" else z

    def circuit(self, b: torch.Tensor, b0: torch.Tensor) -> CircuitTensors:
        """The circuit's parameters at the current gains, with unit time constants."""
        one = self.log_W.new_ones(())
        return CircuitTensors(b, b0, self.sigma, one, one, self.W, self.W_r, self.rectified)

    def forward(self, x: torch.Tensor, state: CellState) -> CellState:
        """One explicit Euler step from ``state`` driven by the input ``x`` of shape (batch, input_size)."""
        y, a, b, b0 = state
        z = self.drive(x)
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
