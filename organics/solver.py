"""Integration of the circuit and its fixed points.

- :func:`simulate`: accurate adaptive integration with :func:`scipy.integrate.solve_ivp`.
- :func:`integrate`: batched fixed-step (Euler or RK4) integration in torch.
- :func:`fixed_point_by_simulation`: integrate until the drift vanishes.
- :func:`iterate_fixed_point`: the paper's iterative algorithm (Algorithm 1) for general W_r,
  one update of which, :func:`algorithm1_update`, also serves the batched torch layers of
  :mod:`organics.networks.static`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.integrate import solve_ivp

from .circuit import Circuit, CircuitTensors, _sqrt, absolute_residual, dn_fixed_point, drift, relu

__all__ = [
    "ConvergenceError",
    "Trajectory",
    "FixedPoint",
    "simulate",
    "integrate",
    "fixed_point_by_simulation",
    "iterate_fixed_point",
    "algorithm1_update",
]


class ConvergenceError(RuntimeError):
    """A fixed-point computation did not reach its tolerance."""


@dataclass(frozen=True)
class Trajectory:
    """A simulated trajectory: times ``t`` (T,), states ``y`` and ``a`` (T, n)."""

    t: NDArray
    y: NDArray
    a: NDArray


@dataclass(frozen=True)
class FixedPoint:
    """A fixed point and how it was found.

    Attributes
    ----------
    y, a : ndarray, shape (n,)
        The fixed point.
    iterations : int
        Iterations (Algorithm 1) or integration rounds (simulation) used.
    absolute_residual : float
        Max-norm of the drift at ``(y, a)`` (:func:`organics.circuit.absolute_residual`).
    history : ndarray, shape (iterations + 1, 2n)
        The iterates ``[y, a]`` (Algorithm 1), or the end state of each round (simulation).
    """

    y: NDArray
    a: NDArray
    iterations: int
    absolute_residual: float
    history: NDArray


def _initial_state(circuit: Circuit, y0: ArrayLike | None, a0: ArrayLike | None) -> NDArray:
    y0 = np.zeros(circuit.n) if y0 is None else np.asarray(y0, dtype=np.float64)
    a0 = np.zeros(circuit.n) if a0 is None else np.asarray(a0, dtype=np.float64)
    for name, v in (("y0", y0), ("a0", a0)):
        if v.shape != (circuit.n,):
            raise ValueError(f"{name} must have shape ({circuit.n},), got shape {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} must be finite (no NaN or inf)")
    return np.concatenate([y0, a0])


def simulate(
    circuit: Circuit,
    z: ArrayLike,
    t_end: float,
    *,
    y0: ArrayLike | None = None,
    a0: ArrayLike | None = None,
    t_eval: ArrayLike | None = None,
    method: str = "LSODA",
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> Trajectory:
    """Integrate the circuit from ``(y0, a0)`` (zeros by default) over ``[0, t_end]``.

    Solves ``d[y, a]/dt = Circuit.rhs`` with :func:`scipy.integrate.solve_ivp` (stiff-capable
    ``LSODA`` by default: time constants may differ by orders of magnitude).
    """
    if not t_end > 0:
        raise ValueError(f"t_end must be > 0, got {t_end}")
    z = circuit.check_input(z)
    if z.ndim != 1:
        raise ValueError(f"simulate takes one input z of shape ({circuit.n},), got {z.shape}")
    sol = solve_ivp(
        circuit.rhs,
        (0.0, t_end),
        _initial_state(circuit, y0, a0),
        method=method,
        t_eval=t_eval,
        rtol=rtol,
        atol=atol,
        args=(z,),
    )
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    return Trajectory(sol.t, sol.y[: circuit.n].T, sol.y[circuit.n :].T)


def integrate(
    circuit: Circuit,
    z: torch.Tensor,
    dt: float,
    steps: int,
    *,
    y0: torch.Tensor | None = None,
    a0: torch.Tensor | None = None,
    method: str = "rk4",
    return_trajectory: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched fixed-step integration in torch (differentiable).

    Parameters
    ----------
    circuit : Circuit
    z : torch.Tensor, shape (batch, n)
        Input drives; the dtype and device of ``z`` are used throughout.
    dt : float
        Step size (same units as the time constants).
    steps : int
        Number of steps.
    y0, a0 : torch.Tensor, shape (batch, n), optional
        Initial states (zeros by default).
    method : {"euler", "rk4"}
        Explicit Euler ``x += dt f(x)`` or classical fourth-order Runge-Kutta.
    return_trajectory : bool
        Also return the states at every step, shape (steps + 1, batch, n).

    Returns
    -------
    y, a : torch.Tensor, shape (batch, n)
        Final states (followed by the trajectories of y and a if requested).
    """
    if not dt > 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if method not in ("euler", "rk4"):
        raise ValueError(f"method must be 'euler' or 'rk4', got {method!r}")
    if z.shape[-1] != circuit.n:
        raise ValueError(f"z must have shape (batch, {circuit.n}), got {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("z must be finite (no NaN or inf)")
    p = circuit.tensors(z.dtype, z.device)
    y = torch.zeros_like(z) if y0 is None else y0
    a = torch.zeros_like(z) if a0 is None else a0

    def f(y: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return drift(y, a, z, p)

    ys, as_ = [y], [a]
    for _ in range(steps):
        k1y, k1a = f(y, a)
        if method == "euler":
            y, a = y + dt * k1y, a + dt * k1a
        else:
            k2y, k2a = f(y + 0.5 * dt * k1y, a + 0.5 * dt * k1a)
            k3y, k3a = f(y + 0.5 * dt * k2y, a + 0.5 * dt * k2a)
            k4y, k4a = f(y + dt * k3y, a + dt * k3a)
            y = y + dt / 6 * (k1y + 2 * k2y + 2 * k3y + k4y)
            a = a + dt / 6 * (k1a + 2 * k2a + 2 * k3a + k4a)
        if return_trajectory:
            ys.append(y)
            as_.append(a)
    if return_trajectory:
        return y, a, torch.stack(ys), torch.stack(as_)
    return y, a


def fixed_point_by_simulation(
    circuit: Circuit,
    z: ArrayLike,
    *,
    y0: ArrayLike | None = None,
    a0: ArrayLike | None = None,
    tol: float = 1e-9,
    max_rounds: int = 20,
) -> FixedPoint:
    """Fixed point reached by integrating the circuit until its drift vanishes.

    Integrates in rounds of ``200 max(tau_y, tau_a)`` until the max-norm of the drift is
    below ``tol``.

    Raises
    ------
    ConvergenceError
        If the drift is still above ``tol`` after ``max_rounds`` rounds (the trajectory
        may approach a limit cycle or diverge).
    """
    z = circuit.check_input(z)
    horizon = 200.0 * float(max(circuit.tau_y.max(), circuit.tau_a.max()))
    state = _initial_state(circuit, y0, a0)
    history = [state]
    for rounds in range(1, max_rounds + 1):
        traj = simulate(circuit, z, horizon, y0=state[: circuit.n], a0=state[circuit.n :], t_eval=[horizon])
        state = np.concatenate([traj.y[-1], traj.a[-1]])
        history.append(state)
        if not np.all(np.isfinite(state)):
            raise ConvergenceError("simulation diverged (non-finite state)")
        res = absolute_residual(state[: circuit.n], state[circuit.n :], z, circuit)
        if res < tol:
            return FixedPoint(state[: circuit.n], state[circuit.n :], rounds, res, np.array(history))
    raise ConvergenceError(
        f"no fixed point after {max_rounds} rounds of length {horizon:g}: residual {res:.3e} > tol {tol:.1e}"
    )


def iterate_fixed_point(
    circuit: Circuit,
    z: ArrayLike,
    *,
    tol: float = 1e-10,
    max_iter: int = 200,
    raise_on_failure: bool = True,
) -> FixedPoint:
    """The paper's iterative algorithm (Algorithm 1) for the fixed point with a general W_r.

    Starting from the ``W_r = I`` estimate (the divisive-normalization fixed point), alternate::

        y <- (I - diag(1 - sqrt(a)) W_r)^{-1} (b z)
        a <- (sigma b0)^2 + W (a y^2)

    (:func:`algorithm1_update`) until the absolute residual falls below ``tol``. Only for
    the main model.

    Raises
    ------
    ConvergenceError
        If ``raise_on_failure`` and the tolerance is not reached in ``max_iter`` iterations
        (the message gives the last residual).
    """
    if circuit.rectified:
        raise ValueError("Algorithm 1 is defined for the main model; use fixed_point_by_simulation")
    z = circuit.check_input(z)
    y, a = dn_fixed_point(z, circuit.b, circuit.b0, circuit.sigma, circuit.W)
    history = [np.concatenate([y, a])]
    res = absolute_residual(y, a, z, circuit)
    k = 0
    while not res < tol and k < max_iter:  # a NaN residual is not converged
        k += 1
        y, a = algorithm1_update(y, a, z, circuit)
        history.append(np.concatenate([y, a]))
        if not np.all(np.isfinite(history[-1])):
            raise ConvergenceError(f"Algorithm 1 diverged at iteration {k}")
        res = absolute_residual(y, a, z, circuit)
    if not res < tol and raise_on_failure:
        raise ConvergenceError(f"Algorithm 1 did not converge in {max_iter} iterations: residual {res:.3e}")
    return FixedPoint(y, a, k, res, np.array(history))


def algorithm1_update(y: Any, a: Any, z: Any, p: Circuit | CircuitTensors) -> tuple[Any, Any]:
    """One iteration of Algorithm 1 (main model), for NumPy arrays or batched torch tensors::

        y <- (I - diag(1 - sqrt(a+)) W_r)^{-1} (b z)
        a <- (sigma b0)^2 + W (a y^2)

    The new ``a`` uses the new ``y``. ``y, a, z`` have shape (..., n); ``p.b`` is shared (n,)
    or per sample (..., n). Differentiable in torch.
    """
    gain = 1 - _sqrt(relu(a))
    n = p.W_r.shape[-1]
    if isinstance(z, torch.Tensor):
        eye = torch.eye(n, dtype=z.dtype, device=z.device)
        solve = torch.linalg.solve
    else:
        eye, solve = np.eye(n), np.linalg.solve
    y = solve(eye - gain[..., :, None] * p.W_r, (p.b * z)[..., None])[..., 0]
    a = (p.sigma * p.b0) ** 2 + (a * y**2) @ p.W.T
    return y, a
