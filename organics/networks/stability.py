"""Stability of trained networks: at a static layer's fixed points (Figs. 5, 6) and along sequences (Fig. 7).

Both are built on :func:`organics.stability.jacobian`, the Jacobian ``J = d(dy/dt, da/dt)/d(y, a)``
of the circuit (shape (2n, 2n), batched over samples and steps). A state is locally
asymptotically stable when the largest real part of J's eigenvalues (the spectral abscissa,
:func:`organics.stability.spectral_abscissa`) is negative (indirect method of Lyapunov).

**Static layers.** :func:`layer_stability` evaluates J at each layer's fixed point, refined in
float64 by Algorithm 1, for every input of a batch.

**The RNN along a sequence.** One step of :class:`~organics.networks.cell.ORGaNICsCell` is an
explicit Euler step of the circuit with per-neuron step sizes ``dt_y = dt/tau_y`` and
``dt_a = dt/tau_a``. Measured in input steps (``dt = 1``), the cell therefore integrates the
continuous-time circuit

    tau_y dy/dt = -y + b z + (1 - sqrt(a+)) W_r r(y),     tau_a da/dt = -a + (sigma b0)^2 + W (a+ r(y)^2)

with ``tau_y = 1/dt_y`` and ``tau_a = 1/dt_a`` (in steps), at the gains of the current step.
:func:`frozen_circuit` is that circuit; J does not depend on the gains ``b, b0`` (they enter
the drift additively or through constants), so one circuit serves every step. The Euler map of
the step has the Jacobian ``I + J`` with this J (in units of 1/step).
:func:`stability_along_sequence` evaluates J at the state after each input.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from .._checks import check_count
from ..circuit import CircuitTensors
from ..stability import jacobian, spectral_abscissa
from .cell import CellState, ORGaNICsCell, check_sequence
from .static import fixed_point_residual

__all__ = [
    "CellTrajectory",
    "LayerStability",
    "SequenceStability",
    "cell_trajectory",
    "frozen_circuit",
    "layer_stability",
    "stability_along_sequence",
]


class LayerStability(NamedTuple):
    """Per-sample stability of one layer's circuit: ``max_real`` and fixed-point ``absolute_residual``, (B,)."""

    max_real: torch.Tensor
    absolute_residual: torch.Tensor


def layer_stability(model: nn.Module, x: torch.Tensor, iterations: int = 100) -> list[LayerStability]:
    """Largest real part of the Jacobian's eigenvalues at each layer's fixed point, per input.

    The model (any module with a ``fixed_points(x, iterations)`` method returning one
    :class:`~organics.networks.static.CircuitState` per layer, e.g.
    :class:`~organics.networks.static.StaticORGaNICs`) is copied to float64 and its fixed points
    refined with ``iterations`` iterations of Algorithm 1, so the Jacobian is evaluated at the
    fixed point itself (``absolute_residual`` reports how closely).

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
    return [LayerStability(spectral_abscissa(jacobian(s.p, s.y, s.a)), fixed_point_residual(s)) for s in states]


class CellTrajectory(NamedTuple):
    """All four state variables after each input, each of shape (batch, T, n)."""

    y: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    b0: torch.Tensor


class SequenceStability(NamedTuple):
    """``max_real[i, k]``: largest real part (1/step) of the Jacobian of sample i after input ``steps[k]``."""

    steps: NDArray
    max_real: NDArray


def cell_trajectory(cell: ORGaNICsCell, x: torch.Tensor) -> CellTrajectory:
    """Run ``cell`` over ``x`` (batch, T, input_size) from its initial state; every state after each input.

    Uses the readable step :meth:`~organics.networks.cell.ORGaNICsCell.forward` (no gradients), so the gains b and b0,
    which :meth:`organics.networks.rnn.ORGaNICsRNN.run` does not return, are recorded too.
    """
    check_sequence(x, cell.input_size)
    states: list[CellState] = []
    with torch.no_grad():
        state = cell.initial_state(x.shape[0])
        for t in range(x.shape[1]):
            state = cell(x[:, t], state)
            states.append(state)
    return CellTrajectory(*(torch.stack([getattr(s, f) for s in states], 1) for f in CellTrajectory._fields))


def frozen_circuit(cell: ORGaNICsCell, b: torch.Tensor, b0: torch.Tensor) -> CircuitTensors:
    """The continuous-time circuit one step of ``cell`` integrates, at gains ``b, b0``, in float64.

    Time is measured in input steps: ``tau_y = 1/dt_y``, ``tau_a = 1/dt_a`` with the cell's
    step sizes ``dt/tau = tau_max sigmoid(p)``; ``W``, ``sigma`` and ``W_r`` as learned.
    """
    with torch.no_grad():
        dt_y, dt_a, _, _ = cell.step_sizes()
        p = cell.circuit(b, b0)._replace(tau_y=1 / dt_y, tau_a=1 / dt_a)
    return CircuitTensors(*(t.detach().double() for t in p[:-1]), p.rectified)


def stability_along_sequence(cell: ORGaNICsCell, x: torch.Tensor, every: int = 1) -> SequenceStability:
    """Largest real part of the frozen circuit's Jacobian at the state after every ``every``-th input.

    For each sample i and step t in ``every - 1, 2 every - 1, ..., T - 1`` (and always the last
    step), evaluates ``max Re lambda(J(y_t, a_t))`` of :func:`frozen_circuit` in float64.

    Parameters
    ----------
    cell : ORGaNICsCell
    x : torch.Tensor, shape (batch, T, input_size)
    every : int
        Stride between evaluated steps, ``>= 1``.
    """
    check_count("every", every)
    traj = cell_trajectory(cell, x)
    T = x.shape[1]
    steps = np.unique(np.r_[np.arange(every - 1, T, every), T - 1])
    at = torch.as_tensor(steps, device=x.device)
    p = frozen_circuit(cell, traj.b[:, at], traj.b0[:, at])
    max_real = spectral_abscissa(jacobian(p, traj.y[:, at].double(), traj.a[:, at].double()))
    return SequenceStability(steps, max_real.cpu().numpy())
