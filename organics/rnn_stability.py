"""Local stability of a trained ORGaNICs RNN along an input sequence (sequential MNIST, Fig. 7).

One step of :class:`organics.rnn.ORGaNICsCell` is an explicit Euler step of the circuit
(:func:`organics.model.drift` with unit time constants) with per-neuron step sizes
``dt_y = dt/tau_y`` and ``dt_a = dt/tau_a``. Measured in input steps (``dt = 1``), the cell
therefore integrates the continuous-time circuit

    tau_y dy/dt = -y + b z + (1 - sqrt(a+)) W_r r(y),     tau_a da/dt = -a + (sigma b0)^2 + W (a+ r(y)^2)

with ``tau_y = 1/dt_y`` and ``tau_a = 1/dt_a`` (in steps), at the gains ``b, b0`` of the
current step. Freezing the gains at step t gives one :class:`organics.model.Circuit` per step
and sample; the largest real part of its Jacobian (:func:`organics.stability.jacobian`) at the
current state ``(y_t, a_t)`` says whether the circuit, linearised there, contracts
(``< 0``) or expands (``> 0``) perturbations of the state. The Euler map of the step has the
Jacobian ``I + J`` with this ``J`` (in units of 1/step), see :func:`euler_step_jacobian`.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray

from .model import Circuit
from .rnn import ORGaNICsCell
from .stability import jacobian, spectral_abscissa

__all__ = [
    "CellTrajectory",
    "SequenceStability",
    "cell_trajectory",
    "euler_step_jacobian",
    "frozen_circuit",
    "stability_along_sequence",
]


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

    Uses the readable step :meth:`ORGaNICsCell.forward` (no gradients), so the gains b and b0,
    which :meth:`organics.rnn.ORGaNICsRNN.run` does not return, are recorded too.
    """
    if x.ndim != 3 or x.shape[-1] != cell.input_size or x.shape[1] < 1:
        raise ValueError(f"x must have shape (batch, T >= 1, {cell.input_size}), got {tuple(x.shape)}")
    states = []
    with torch.no_grad():
        state = cell.initial_state(x.shape[0])
        for t in range(x.shape[1]):
            state = cell(x[:, t], state)
            states.append(state)
    return CellTrajectory(*(torch.stack([getattr(s, f) for s in states], 1) for f in CellTrajectory._fields))


def frozen_circuit(cell: ORGaNICsCell, b: torch.Tensor, b0: torch.Tensor) -> Circuit:
    """The continuous-time circuit one step of ``cell`` integrates, at gains ``b, b0`` of shape (n,).

    Time is measured in input steps: ``tau_y = 1/dt_y``, ``tau_a = 1/dt_a`` with the cell's
    learned step sizes ``dt/tau = tau_max sigmoid(p)``; ``W = clamp(exp(log_W), 0, 1)``,
    ``sigma = exp(log_sigma)`` and ``W_r`` as learned (float64).
    """
    with torch.no_grad():
        dt_y, dt_a, _, _ = cell.step_sizes()

        def f64(t: torch.Tensor) -> NDArray:
            return t.detach().double().cpu().numpy()

        return Circuit(
            W=f64(cell.W),
            b=f64(b),
            b0=f64(b0),
            sigma=f64(cell.sigma),
            tau_y=1.0 / f64(dt_y),
            tau_a=1.0 / f64(dt_a),
            W_r=f64(cell.W_r),
            rectified=cell.rectified,
        )


def euler_step_jacobian(cell: ORGaNICsCell, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> NDArray:
    """Jacobian ``d(y', a')/d(y, a)`` of one step of ``cell`` at one state (shapes (n,)), by autograd.

    With the gains frozen, it equals ``I + J`` where ``J`` is the Jacobian of
    :func:`frozen_circuit` (time in steps); the input does not enter it. Returned in float64.
    """
    n = cell.hidden_size
    cell64 = copy.deepcopy(cell).double()
    x = torch.zeros(1, cell.input_size, dtype=torch.float64)
    b64 = b.detach().double()[None]

    def step(s: torch.Tensor) -> torch.Tensor:
        state = cell64.initial_state(1)._replace(y=s[None, :n], a=s[None, n:], b=b64)
        new = cell64(x, state)
        return torch.cat([new.y[0], new.a[0]])

    s0 = torch.cat([y.detach().double(), a.detach().double()])
    return torch.autograd.functional.jacobian(step, s0).numpy()


def stability_along_sequence(cell: ORGaNICsCell, x: torch.Tensor, every: int = 1) -> SequenceStability:
    """Largest real part of the frozen circuit's Jacobian at the state after every ``every``-th input.

    For each sample i and step t in ``every - 1, 2 every - 1, ..., T - 1`` (and always the last
    step), builds :func:`frozen_circuit` at the gains ``b_t, b0_t`` and evaluates
    ``max Re lambda(J(y_t, a_t))`` with :func:`organics.stability.jacobian`.

    Parameters
    ----------
    cell : ORGaNICsCell
    x : torch.Tensor, shape (batch, T, input_size)
    every : int
        Stride between evaluated steps, ``>= 1``.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    traj = cell_trajectory(cell, x)
    T = x.shape[1]
    steps = np.unique(np.r_[np.arange(every - 1, T, every), T - 1])
    max_real = np.empty((x.shape[0], len(steps)))
    for i in range(x.shape[0]):
        for k, t in enumerate(steps):
            circuit = frozen_circuit(cell, traj.b[i, t], traj.b0[i, t])
            y_t, a_t = (v[i, t].double().numpy() for v in (traj.y, traj.a))
            max_real[i, k] = spectral_abscissa(jacobian(circuit, y_t, a_t))
    return SequenceStability(steps, max_real)
