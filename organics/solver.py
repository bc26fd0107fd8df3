"""Integration of the circuit and its fixed points.

- :func:`simulate`: accurate adaptive integration with :func:`scipy.integrate.solve_ivp`.
- :func:`integrate`: batched fixed-step (Euler or RK4) integration in torch.
- :func:`fixed_point_by_simulation`: integrate until the drift vanishes.
- :func:`iterate_fixed_point`: the paper's iterative algorithm (Algorithm 1) for general W_r,
  one update of which, :func:`algorithm1_update`, also serves the batched torch layers of
  :mod:`organics.networks.static`.
- Algorithm 1 can stop on :func:`organics.circuit.relative_residual` (the drift relative to the
  size of its terms), the criterion that stays meaningful when the modulators ``a`` are large.
- :func:`newton_fixed_points`: Newton's method from many starts at once, to search for fixed
  points other than the one Algorithm 1 finds.
- :func:`anderson`: Anderson acceleration of any batched fixed-point iteration in torch (the
  static layers' sweeps and their adjoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.integrate import solve_ivp

from ._checks import check_choice, check_count, check_nonnegative, check_positive
from .circuit import (
    Circuit,
    CircuitTensors,
    _sqrt,
    absolute_residual,
    dn_fixed_point,
    drift,
    relative_residual,
    relu,
)

__all__ = [
    "ConvergenceError",
    "Trajectory",
    "FixedPoint",
    "simulate",
    "integrate",
    "fixed_point_by_simulation",
    "iterate_fixed_point",
    "algorithm1_update",
    "newton_fixed_points",
    "anderson",
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
    relative_residual : float
        The drift relative to the size of its terms at ``(y, a)`` (:func:`~organics.circuit.relative_residual`).
    """

    y: NDArray
    a: NDArray
    iterations: int
    absolute_residual: float
    history: NDArray
    relative_residual: float = float("nan")


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
    check_positive("t_end", t_end)
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
    check_positive("dt", dt)
    check_count("steps", steps, 0)
    check_choice("method", method, ("euler", "rk4"))
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
    check_positive("tol", tol)
    check_count("max_rounds", max_rounds)
    horizon = 200.0 * float(max(circuit.tau_y.max(), circuit.tau_a.max()))
    state = _initial_state(circuit, y0, a0)
    history = [state]
    for rounds in range(1, max_rounds + 1):
        traj = simulate(circuit, z, horizon, y0=state[: circuit.n], a0=state[circuit.n :], t_eval=[horizon])
        state = np.concatenate([traj.y[-1], traj.a[-1]])
        history.append(state)
        if not np.all(np.isfinite(state)):
            raise ConvergenceError("simulation diverged (non-finite state)")
        y, a = state[: circuit.n], state[circuit.n :]
        res = absolute_residual(y, a, z, circuit)
        if res < tol:
            return FixedPoint(y, a, rounds, res, np.array(history), relative_residual(y, a, z, circuit))
    raise ConvergenceError(
        f"no fixed point after {max_rounds} rounds of length {horizon:g}: residual {res:.3e} > tol {tol:.1e}"
    )


def iterate_fixed_point(
    circuit: Circuit,
    z: ArrayLike,
    *,
    tol: float = 1e-10,
    rtol: float | None = None,
    max_iter: int = 200,
    raise_on_failure: bool = True,
) -> FixedPoint:
    """The paper's iterative algorithm (Algorithm 1) for the fixed point with a general W_r.

    Starting from the ``W_r = I`` estimate (the divisive-normalization fixed point), alternate::

        y <- (I - diag(1 - sqrt(a)) W_r)^{-1} (b z)
        a <- (sigma b0)^2 + W (a y^2)

    (:func:`algorithm1_update`) until converged: the absolute residual (max-norm of the drift)
    is below ``tol``, or, if ``rtol`` is given, the :func:`~organics.circuit.relative_residual` is below ``rtol``.
    Only for the main model.

    Parameters
    ----------
    circuit : Circuit
        Main model, any ``W_r``.
    z : array_like, shape (n,)
        Input drive.
    tol : float
        Absolute criterion on ``max |dy/dt|, |da/dt|`` (1/ms). An absolute tolerance cannot be
        met when ``a`` is large: the drift is computed from terms of size up to
        ``|1 - sqrt(a)| |W_r| |y|`` and ``W (a y^2)``, whose rounding error alone exceeds
        ``tol`` once they pass about ``tol / eps`` (``eps = 2.2e-16``).
    rtol : float, optional
        Relative criterion on :func:`~organics.circuit.relative_residual`, met at any scale down to a few
        ``eps`` (``1e-12`` is a safe choice). ``None`` (default) keeps the absolute criterion
        alone.
    max_iter : int
        Largest number of iterations.
    raise_on_failure : bool
        Raise :class:`ConvergenceError` when not converged; otherwise return the last iterate.

    Raises
    ------
    ConvergenceError
        If the iterates overflow, or if ``raise_on_failure`` and neither criterion is met in
        ``max_iter`` iterations (the message gives the last residuals).
    ValueError
        For the rectified model, or if ``tol`` or ``rtol`` is not finite and >= 0.
    """
    if circuit.rectified:
        raise ValueError("Algorithm 1 is defined for the main model; use fixed_point_by_simulation")
    check_nonnegative("tol", tol)
    check_nonnegative("rtol", rtol, optional=True)
    z = circuit.check_input(z)
    y, a = dn_fixed_point(z, circuit.b, circuit.b0, circuit.sigma, circuit.W)
    history = [np.concatenate([y, a])]

    def residuals(y: NDArray, a: NDArray) -> tuple[float, float, bool]:
        res, rel = absolute_residual(y, a, z, circuit), relative_residual(y, a, z, circuit)
        return res, rel, bool(res < tol or (rtol is not None and rel < rtol))  # NaN: not converged

    res, rel, converged = residuals(y, a)
    k = 0
    while not converged and k < max_iter:
        k += 1
        y, a = algorithm1_update(y, a, z, circuit)
        history.append(np.concatenate([y, a]))
        if not np.all(np.isfinite(history[-1])):
            raise ConvergenceError(f"Algorithm 1 diverged at iteration {k}")
        res, rel, converged = residuals(y, a)
    if not converged and raise_on_failure:
        raise ConvergenceError(
            f"Algorithm 1 did not converge in {max_iter} iterations: residual {res:.3e}, relative residual {rel:.3e}"
        )
    return FixedPoint(y, a, k, res, np.array(history), rel)


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


def _batched_solve(A: NDArray, B: NDArray) -> NDArray:
    """``np.linalg.solve`` over a batch, with NaN for the singular systems instead of an error."""
    try:
        return np.linalg.solve(A, B)
    except np.linalg.LinAlgError:
        out = np.full(np.broadcast_shapes(A.shape[:-2], B.shape[:-2]) + B.shape[-2:], np.nan)
        for i in np.ndindex(out.shape[:-2]):
            try:
                out[i] = np.linalg.solve(A[i], B[i])
            except np.linalg.LinAlgError:
                pass
        return out


def newton_fixed_points(
    circuit: Circuit,
    z: ArrayLike,
    a0: ArrayLike,
    *,
    rtol: float = 1e-10,
    max_iter: int = 60,
) -> tuple[NDArray, NDArray, NDArray]:
    """Fixed points of the main model by Newton's method from many starts at once.

    The y-equation is linear in ``y`` given ``a``, so the fixed points are the roots of a
    function of ``a`` alone. With ``a = exp(u)`` (which keeps ``a > 0``)::

        y(a) = (I - diag(1 - sqrt(a)) W_r)^{-1} (b z)
        H(u) = -1 + ((sigma b0)^2 + W (a y(a)^2)) / a = 0,

    solved by Newton steps on ``u``, using ``dy/da = -(I - diag(1 - sqrt(a)) W_r)^{-1}
    diag((W_r y) / (2 sqrt(a)))``, each step shortened (halved up to 10 times, and capped at a
    factor ``e^2`` in ``a``) until ``|H|`` decreases. A start converges when the
    :func:`~organics.circuit.relative_residual` of the full drift at ``(y(a), a)`` falls below ``rtol``; starts
    that stall or leave the floating-point range do not.

    Parameters
    ----------
    circuit : Circuit
        Main model, any ``W_r``.
    z : array_like, shape (n,)
        Input drive.
    a0 : array_like, shape (S, n)
        Starting modulators, ``a0 > 0``, one row per start.
    rtol : float
        Convergence criterion on the relative residual.
    max_iter : int
        Newton steps per start.

    Returns
    -------
    y, a : ndarray, shape (S, n)
        The last iterate of each start.
    converged : ndarray of bool, shape (S,)
        Whether that iterate is a fixed point to ``rtol``. Distinct starts may converge to
        the same fixed point.

    Raises
    ------
    ValueError
        For the rectified model, or if ``a0`` has the wrong shape or is not finite and > 0.
    """
    if circuit.rectified:
        raise ValueError("newton_fixed_points is defined for the main model")
    z = circuit.check_input(z)
    a0 = np.asarray(a0, dtype=np.float64)
    if a0.ndim != 2 or a0.shape[1] != circuit.n:
        raise ValueError(f"a0 must have shape (S, {circuit.n}), got shape {a0.shape}")
    if not np.all(np.isfinite(a0) & (a0 > 0)):
        raise ValueError("a0 must be finite and > 0")
    eye = np.eye(circuit.n)
    bz, c = circuit.b * z, (circuit.sigma * circuit.b0) ** 2

    def evaluate(u: NDArray) -> tuple[NDArray, NDArray, NDArray, NDArray]:
        a = np.exp(u)
        M = eye - (1 - np.sqrt(a))[:, :, None] * circuit.W_r
        y = _batched_solve(M, np.broadcast_to(bz, a.shape)[:, :, None])[:, :, 0]
        return a, M, y, -1 + (c + (a * y**2) @ circuit.W.T) / a

    with np.errstate(all="ignore"):
        u = np.log(a0)
        a, M, y, h = evaluate(u)
        merit = np.where(np.isfinite(h).all(1), (h**2).sum(1), np.inf)
        for _ in range(max_iter):
            done = relative_residual(y, a, np.broadcast_to(z, y.shape), circuit) < rtol
            if np.all(done | ~np.isfinite(merit)):
                break
            dy_da = _batched_solve(M, eye * (-(y @ circuit.W_r.T) / (2 * np.sqrt(a)))[:, None, :])
            dq_da = circuit.W * (y**2)[:, None, :] + circuit.W @ ((2 * a * y)[:, :, None] * dy_da)
            dh_du = dq_da * a[:, None, :] / a[:, :, None] - eye * (h + 1)[:, None, :]
            step = np.clip(_batched_solve(dh_du, -h[:, :, None])[:, :, 0], -2, 2)
            step = np.where(np.isfinite(step) & ~done[:, None], step, 0)
            accepted = np.zeros(len(u), dtype=bool)
            for _ in range(11):
                trial_a, trial_M, trial_y, trial_h = evaluate(u + step)
                trial_merit = np.where(np.isfinite(trial_h).all(1), (trial_h**2).sum(1), np.inf)
                better = (trial_merit < merit) & (step != 0).any(1)
                u = np.where(better[:, None], u + step, u)
                a, y, h = (
                    np.where(better[:, None], new, old) for new, old in ((trial_a, a), (trial_y, y), (trial_h, h))
                )
                M = np.where(better[:, None, None], trial_M, M)
                merit = np.where(better, trial_merit, merit)
                accepted |= better
                step = np.where(accepted[:, None], 0, step / 2)
                if not np.any(step):
                    break
            if not np.any(accepted):
                break
        converged = relative_residual(y, a, np.broadcast_to(z, y.shape), circuit) < rtol
    return y, a, converged


def anderson(
    step: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    converged: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    depth: int = 5,
    max_iter: int = 100,
    regularization: float = 1e-4,
    slow: float = 0.5,
) -> tuple[torch.Tensor, int, bool]:
    """The fixed-point iteration ``x <- step(x)``, rows of a batch on their own, with Anderson acceleration once slow.

    Plain steps ``x <- f = step(x)`` run while each shrinks the batch's largest residual
    ``|f - x|`` by at least the factor ``slow``; from the first that does not, the iteration
    keeps the last ``m = depth`` images ``f_i`` and residuals ``g_i = f_i - x_i`` and mixes the
    images with the weights that best cancel the residuals::

        x <- sum_i alpha_i f_i,    alpha = argmin ||sum_i alpha_i g_i||  subject to  sum_i alpha_i = 1,

    i.e. ``alpha = H^{-1} 1 / (1^T H^{-1} 1)`` with ``H = G G^T + lambda diag(G G^T)`` (``G`` the
    m x d matrix of residuals of the row, ``lambda = regularization``); a row whose mixture is
    not finite (all its residuals zero) takes the plain step. On a linear iteration this is
    GMRES in disguise; where a plain iteration contracts slowly (a spectral radius near 1) it
    needs far fewer steps. A mixing step costs several times a cheap ``step``, hence the plain
    steps while they are fast.

    Parameters
    ----------
    step : callable
        The iteration, (B, d) -> (B, d), rows independent.
    x : torch.Tensor, shape (B, d)
        Starting point.
    converged : callable
        ``converged(f, r)`` with ``f = step(x)`` and ``r = max |f - x|`` per row (B,) -> bool
        tensor (B,): whether a row has converged.
    depth : int
        Iterates kept (``m``).
    max_iter : int
        Largest number of ``step`` evaluations.
    regularization : float
        ``lambda`` above.
    slow : float
        Contraction factor per plain step below which mixing is not worth its cost.

    Returns
    -------
    x : torch.Tensor, shape (B, d)
        The first iterate whose step ``converged`` accepts for every row; otherwise the iterate
        whose step left the finite range, or the one after ``max_iter`` steps.
    iterations : int
        ``step`` evaluations used.
    converged : bool
        Whether every row converged (False also if the iterates stopped being finite).
    """
    check_count("depth", depth)
    check_count("max_iter", max_iter)
    B, d = x.shape
    F, G = x.new_zeros(B, depth, d), x.new_zeros(B, depth, d)  # the images f_i and residuals g_i kept
    H = x.new_zeros(B, depth, depth)  # G G^T with its diagonal scaled by 1 + lambda; a row and column per step
    ones = x.new_ones(B, depth, 1)
    mixed, largest = 0, float("inf")  # mixing steps so far; the largest residual of the last plain step
    for k in range(1, max_iter + 1):
        f = step(x)
        g = f - x
        r = g.abs().amax(-1)
        if bool(converged(f, r).all()):
            return x, k, True
        if not mixed:
            residual = float(r.max())
            if not math.isfinite(residual):
                return x, k, False
            if residual <= slow * largest:  # fast enough: a plain step
                x, largest = f, residual
                continue
        i, m = mixed % depth, min(mixed + 1, depth)
        mixed += 1
        F[:, i], G[:, i] = f, g
        h = (G * g[:, None]).sum(-1)  # the new row of G G^T
        if not math.isfinite(float(h[:, i].sum())):  # |g|^2: not finite iff f is not (or overflows)
            return x, k, False
        H[:, i], H[:, :, i] = h, h
        H[:, i, i] *= 1 + regularization
        w = torch.linalg.solve_ex(H[:, :m, :m], ones[:, :m])[0]
        alpha = w / w.sum(1, keepdim=True)
        x = torch.where(torch.isfinite(alpha).all(1), (alpha * F[:, :m]).sum(1), f)
    return x, max_iter, False
