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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_count, check_positive
from ..circuit import CircuitTensors, absolute_residual, dn_fixed_point, drift
from ..solver import ConvergenceError, algorithm1_update, anderson
from ..stability import jacobian
from ._fused import ADJOINT, SWEEP, fused_anderson, supports
from ._parameters import NORMALIZATIONS, check_choices, initial_log_W, register

__all__ = [
    "FRONT_END",
    "LAYER_PRESETS",
    "Autoencoder",
    "CircuitLayer",
    "LayerOptions",
    "CircuitState",
    "StaticORGaNICs",
    "authors_iteration",
    "constrain_spectral_norm",
    "SWEEPS",
    "ADJOINT_RTOL",
    "ENGINES",
    "SolveStats",
    "fixed_point_residual",
    "implicit_fixed_point",
    "solve_fixed_point",
    "sweep_update",
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
    check_count("iterations", iterations, 0)
    if p.rectified:
        raise ValueError("Algorithm 1 is defined for the main model (p.rectified must be False)")
    y, a = dn_fixed_point(z, p.b, p.b0, p.sigma, p.W)
    for _ in range(iterations):
        y, a = algorithm1_update(y, a, z, p)
    return y, a


def authors_iteration(z: torch.Tensor, p: CircuitTensors, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The steady-state iteration of the authors' paper-era code: NOT a fixed point of the circuit.

    Their static layer (``models/fixed_point/ff.py`` of the first public version, 10 iterations by
    default, backpropagated through) starts from ``a = (sigma b0)^2 + W (W_r (b z))^2``,
    ``y = W_r (b z) / sqrt(a)`` and repeats::

        y <- (I - diag(1 - a) W_r)^{-1} (b z)
        a <- (sigma b0)^2 + W (a y^2)

    (their code also adds 1e-10 to ``a``, left out here). Algorithm 1
    (:func:`unrolled_fixed_point`) has ``diag(1 - sqrt(a))`` where this has ``diag(1 - a)``. A
    limit ``(y, a)`` of this iteration satisfies the circuit's ``a``-equation, but its
    ``y``-equation reads ``y = b z + (1 - a) W_r y`` instead of ``y = b z + (1 - sqrt(a)) W_r y``,
    so the drift there (unit time constants) is::

        F_y = -y + b z + (1 - sqrt(a)) W_r y = (a - sqrt(a)) (W_r y),      F_a = 0,

    which vanishes only for neurons with ``a_i`` equal to 0 or 1 or ``(W_r y)_i = 0``. With
    ``W_r = I`` the limit is ``y = b z / a`` with ``a = (sigma b0)^2 + W ((b z)^2 / a)``
    (drift ``F_y = b z (1 - 1/sqrt(a))``), not the divisive-normalization fixed point
    ``y = b z / sqrt(a)`` (their code used the closed form there, and this iteration only for a
    learned ``W_r``, which starts at ``I``).

    Parameters
    ----------
    z : torch.Tensor, shape (B, n)
        Input drives.
    p : CircuitTensors
        Parameters of the main model (``p.b`` of shape (n,) or (B, n)); time constants unused.
    iterations : int
        Number of iterations (>= 0); 0 returns the starting estimate.

    Returns
    -------
    y, a : torch.Tensor, shape (B, n)
        Differentiable through the unrolled loop, as in the authors' training.
    """
    check_count("iterations", iterations, 0)
    if p.rectified:
        raise ValueError("the authors' iteration is defined for the main model (p.rectified must be False)")
    drive = p.b * z
    recurrent_drive = drive @ p.W_r.T
    a = (p.sigma * p.b0) ** 2 + recurrent_drive**2 @ p.W.T
    y = recurrent_drive / torch.sqrt(a)
    eye = torch.eye(p.W_r.shape[-1], dtype=z.dtype, device=z.device)
    for _ in range(iterations):
        y = torch.linalg.solve(eye - (1 - a)[..., :, None] * p.W_r, drive[..., None])[..., 0]
        a = (p.sigma * p.b0) ** 2 + (a * y**2) @ p.W.T
    return y, a


@dataclass
class SolveStats:
    """How a batch's fixed points were found, and (after the backward pass) how their gradient was.

    Attributes
    ----------
    iterations : int
        Iterations of the forward pass (sweeps and Algorithm 1 together).
    absolute_residual : float
        Largest absolute residual reached.
    method : {"sweep", "algorithm1"}
        The iteration that converged (:func:`solve_fixed_point`).
    adjoint_iterations : int or None
        Iterations of the backward pass's adjoint iteration (None before a backward pass).
    adjoint_fallback : bool
        Whether the adjoint iteration did not converge and the full 2n x 2n system was solved instead.
    engine : {"torch", "numba"}
        Which implementation ran the Anderson-accelerated sweeps and their adjoint (:data:`ENGINES`).
    """

    iterations: int
    absolute_residual: float
    method: str = "sweep"
    adjoint_iterations: int | None = None
    adjoint_fallback: bool = False
    engine: str = "torch"


def _unit_time(p: CircuitTensors) -> CircuitTensors:
    one = p.W.new_ones(())
    return p._replace(tau_y=one, tau_a=one)


def sweep_update(
    y: torch.Tensor, a: torch.Tensor, z: torch.Tensor, p: CircuitTensors
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 with its linear solve replaced by one sweep of the linear iteration from the current ``y``::

        y <- b z + (1 - sqrt(a+)) W_r y
        a <- (sigma b0)^2 + W (a y^2)

    (the new ``a`` uses the new ``y``, as in :func:`organics.solver.algorithm1_update`). Its fixed
    points are the circuit's; each iteration costs two matrix products where Algorithm 1 solves
    an n x n system per sample.
    """
    y = p.b * z + (1 - torch.sqrt(torch.clamp(a, min=0))) * (y @ p.W_r.mT)
    a = (p.sigma * p.b0) ** 2 + (a * y**2) @ p.W.mT
    return y, a


SWEEPS = 30
"""Iterations of :func:`sweep_update` (Anderson-accelerated once slow) that :func:`solve_fixed_point` tries
before Algorithm 1 takes over.

At batch 256 and n = 50 on a CPU an iteration of Algorithm 1 (an LU factorisation per sample)
costs about 20 plain sweeps (two matrix products) or 5 accelerated ones. At initialisation
(W_r = I) a handful of plain sweeps converge; at trained layers the slowest sample of a batch
can need 150 plain sweeps or more, and about 20 accelerated ones (measured at the 50- and
80-unit paper-era runs' best models)."""

ENGINES = ("auto", "torch", "numba")
"""Implementations of the Anderson-accelerated sweeps and of their adjoint (``engine`` of :func:`solve_fixed_point`).

``"torch"`` is the readable one, :func:`organics.solver.anderson` driving :func:`sweep_update`
(or the sweep's adjoint step); ``"numba"`` runs the same iteration as one compiled loop
(``organics.networks._fused``; CPU tensors in float32 or float64), several times faster at
the sizes of Table 1; ``"auto"`` takes ``"numba"`` where it can and ``"torch"`` otherwise (on a GPU)."""


def _engine(engine: str, z: torch.Tensor) -> str:
    """The implementation ``engine`` names for tensors like ``z`` (``"auto"`` resolved), or a ValueError."""
    check_choice("engine", engine, ENGINES)
    if engine == "auto":
        return "numba" if supports(z) else "torch"
    if engine == "numba" and not supports(z):
        got = f"{z.dtype} on {z.device}"
        raise ValueError(f"engine 'numba' needs numba and float32 or float64 tensors on the CPU, got {got}")
    return engine


def _sweeps(
    y: torch.Tensor, a: torch.Tensor, z: torch.Tensor, p: CircuitTensors, tol: float, max_iter: int, engine: str
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Anderson-accelerated :func:`sweep_update` from ``(y, a)`` until no entry moves by ``tol / 2`` or more: the
    last iterate, the sweeps used and whether the iterate is finite (:func:`organics.solver.anderson`, or its
    compiled twin for ``engine="numba"``)."""
    if engine == "numba":
        V = torch.stack([p.b * z, ((p.sigma * p.b0) ** 2).expand_as(z)])
        x, k, _ = fused_anderson(SWEEP, torch.stack([y, a]), p.W_r.mT, p.W.mT, V, atol=tol / 2, max_iter=max_iter)
        return x[0], x[1], k, bool(np.isfinite(x.numpy()).all())  # numpy's test: torch's costs 0.1 ms here
    n = z.shape[-1]

    def sweep(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(sweep_update(x[:, :n], x[:, n:], z, p), -1)

    def moved_less_than_half_tol(swept: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        return moved < tol / 2

    x, k, _ = anderson(sweep, torch.cat([y, a], -1), moved_less_than_half_tol, max_iter=max_iter)
    return x[:, :n], x[:, n:], k, bool(torch.isfinite(x).all())


def solve_fixed_point(
    z: torch.Tensor, p: CircuitTensors, *, tol: float | None = None, max_iter: int = 200, engine: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, SolveStats]:
    """The fixed point of every sample of a batch, without an autograd graph, checked by its residual.

    From the divisive-normalization fixed point, iterate :func:`sweep_update` with Anderson
    acceleration (:func:`organics.solver.anderson`; at most :data:`SWEEPS` sweeps, and at most
    half of ``max_iter``), then, where that has not converged, Algorithm 1
    (:func:`organics.solver.algorithm1_update`) from where the sweeps stopped, until the
    absolute residual ``max |F(y, a)|`` of every sample is below ``tol``, where ``F`` is the
    drift with unit time constants::

        F_y = -y + b z + (1 - sqrt(a+)) W_r y,      F_a = -a + (sigma b0)^2 + W (a y^2)

    The sweeps stop when a sweep moves no entry by ``tol / 2`` or more (``y' - y = F_y`` exactly,
    ``a' - a`` is ``F_a`` at the new ``y``, which differs: with ``tol`` itself, an Algorithm 1
    step often had to follow); the residual is then checked at the point returned.
    Where the sweeps leave the finite range, Algorithm 1 restarts from the divisive-normalization
    point. The :class:`SolveStats` say which iteration converged.

    Parameters
    ----------
    z : torch.Tensor, shape (B, n)
    p : CircuitTensors
        Main model; ``p.b`` shared (n,) or per sample (B, n).
    tol : float, optional
        Absolute residual to reach; 1e-5 in float32, 1e-11 in float64 by default.
    max_iter : int
        Iterations allowed, sweeps and Algorithm 1 together.
    engine : {"auto", "torch", "numba"}
        Implementation of the sweeps (:data:`ENGINES`); the result is the same fixed point to ``tol``.

    Raises
    ------
    organics.solver.ConvergenceError
        If some sample's residual is still above ``tol`` (or not finite) after ``max_iter``
        iterations: the message gives how many and the largest residual. A layer never returns
        a point that is not a fixed point.
    """
    if p.rectified:
        raise ValueError("Algorithm 1 is defined for the main model (p.rectified must be False)")
    check_positive("tol", tol, optional=True)
    check_count("max_iter", max_iter)
    if tol is None:
        tol = 1e-5 if z.dtype == torch.float32 else 1e-11
    unit, engine = _unit_time(p), _engine(engine, z)
    with torch.no_grad():
        y, a = dn_fixed_point(z, p.b, p.b0, p.sigma, p.W)
        k, method, sweeps = 0, "sweep", min(SWEEPS, max_iter // 2)
        if sweeps > 0:
            swept_y, swept_a, k, finite = _sweeps(y, a, z, unit, tol, sweeps, engine)
            if finite:
                y, a = swept_y, swept_a
        while True:
            residual = absolute_residual(y, a, z, unit)
            if bool((residual < tol).all()):
                return y, a, SolveStats(k, float(residual.max()), method, engine=engine)
            if k >= max_iter or (method == "algorithm1" and not bool(torch.isfinite(residual).all())):
                break
            y, a = algorithm1_update(y, a, z, unit)
            method, k = "algorithm1", k + 1
    failed = int((~(residual < tol)).sum())
    raise ConvergenceError(
        f"Algorithm 1 did not converge for {failed} of {len(z)} samples in {max_iter} iterations: "
        f"largest absolute residual {float(residual.max()):.3e} > tol {tol:.1e}"
    )


ADJOINT_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
"""The relative tolerance of the backward pass's adjoint iterations, by dtype.

They stop once no entry of a sample's adjoint moves by more than this times its largest entry.
In float32 an adjoint that the loss reaches through ``a`` stalls at a few 1e-6 (rounding in
``g + lam dT/ds``, whose terms cancel; measured at the trained 50-unit layer), hence 1e-5 there,
the order of the forward tolerance."""


def _moved_little(rtol: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The adjoint iterations' stopping rule for :func:`organics.solver.anderson`: no entry of a row moved by
    more than ``rtol`` times the row's largest entry."""

    def moved_little(stepped: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        return moved <= rtol * stepped.abs().amax(-1).clamp_min(1e-30)

    return moved_little


class _ImplicitFixedPoint(torch.autograd.Function):
    """The fixed point as a function of the circuit's parameters, differentiated implicitly.

    The fixed point ``s = (y, a)`` is a fixed point of the iteration that found it. Where that
    was the sweep ``T`` (:func:`sweep_update`), ``s = T(s, theta)`` and the implicit function
    theorem gives, for a loss L with ``g = dL/ds``,

        dL/dtheta = lam dT/dtheta,    lam (I - dT/ds) = g;

    the backward pass finds the row vector ``lam`` by the adjoint iteration
    ``lam <- g + lam dT/ds`` (it contracts at the rate the plain forward sweeps did, and is
    Anderson-accelerated the same way; each step two matrix products, :class:`_SweepAdjoint`),
    then ``lam dT/dtheta`` (:func:`_parameter_gradients`).
    Where Algorithm 1 found it, the same theorem is applied to Algorithm 1 (:class:`_Adjoint`).
    If the adjoint iteration does not converge, it solves ``(dF/ds)^T mu = -dL/ds`` with the
    full ``2n x 2n`` Jacobian of the drift (:func:`organics.stability.jacobian`, unit time
    constants) instead, and says so in the :class:`SolveStats`.
    """

    @staticmethod
    def forward(ctx, z, b, b0, sigma, W, W_r, tol, max_iter, engine, stats_out):  # noqa: ANN001, ANN205
        p = CircuitTensors(b, b0, sigma, W.new_ones(()), W.new_ones(()), W, W_r, False)
        y, a, stats = solve_fixed_point(z, p, tol=tol, max_iter=max_iter, engine=engine)
        stats_out.append(stats)
        ctx.stats, ctx.max_iter = stats, max_iter
        ctx.save_for_backward(y, a, z, b, b0, sigma, W, W_r)
        return y, a

    @staticmethod
    def backward(ctx, g_y, g_a):  # noqa: ANN001, ANN205
        if torch.is_grad_enabled():  # create_graph: the adjoint solve below is not differentiable again
            raise RuntimeError(
                "the implicit fixed point's gradient cannot be differentiated again (create_graph=True): "
                "use gradient='unrolled' for second derivatives"
            )
        y, a, *theta = ctx.saved_tensors
        z, b, b0, sigma, W, W_r = theta
        g_y = torch.zeros_like(y) if g_y is None else g_y
        g_a = torch.zeros_like(a) if g_a is None else g_a
        grads = None
        if ctx.stats.method == "sweep":
            adjoint = _SweepAdjoint(y, a, W, W_r)
            lam = adjoint.iterate(g_y, g_a, ctx.max_iter, ctx.stats, ctx.stats.engine)
            if lam is not None:
                _, l = adjoint.through_a(*lam)
                grads = _parameter_gradients(l, lam[1], y, a, adjoint.G, z, b, b0, sigma)
        else:
            adjoint = _Adjoint(y, a, W, W_r)
            w = adjoint.iterate(g_y, g_a, ctx.max_iter, ctx.stats)
            if w is not None:
                grads = adjoint.parameter_gradients(g_y, w, z, b, b0, sigma)
        if grads is None:
            ctx.stats.adjoint_fallback = True
            grads = _full_adjoint_gradients(y, a, theta, g_y, g_a)
        return (
            *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:6], strict=True)),
            None,
            None,
            None,
            None,
        )


class _SweepAdjoint:
    """The adjoint iteration ``lam <- g + lam dT/ds`` of the sweep ``T`` (:func:`sweep_update`) at its fixed point.

    With ``G = 1 - sqrt(a)``, ``P = W_r y`` (per sample) and ``lam = (l_y, l_a)``, the
    vector-Jacobian product of ``y' = b z + G P``, ``a' = (sigma b0)^2 + W (a y'^2)`` is, with
    ``m = l_a W`` and ``l = l_y + 2 m a y``::

        lam dT/dy = (l G) W_r,      lam dT/da = m y^2 - l P / (2 sqrt(a))

    (``a > 0`` at every fixed point): two matrix products per step.
    """

    def __init__(self, y: torch.Tensor, a: torch.Tensor, W: torch.Tensor, W_r: torch.Tensor) -> None:
        s = a.sqrt()
        self.W, self.W_r, self.G, self.y2, self.two_ay = W, W_r, 1 - s, y**2, 2 * a * y
        self.P_over_2s = (y @ W_r.mT) / (2 * s)

    def through_a(self, l_y: torch.Tensor, l_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``m = l_a W`` and ``l = l_y + 2 m a y``: what reaches ``y' = b z + G P`` directly and through ``a'``."""
        m = l_a @ self.W
        return m, l_y + m * self.two_ay

    def iterate(
        self, g_y: torch.Tensor, g_a: torch.Tensor, max_iter: int, stats: SolveStats, engine: str = "torch"
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``lam`` with ``lam (I - dT/ds) = (g_y, g_a)``, by the adjoint iteration with Anderson acceleration.

        Stops when an iteration moves no entry of a sample's ``lam`` by more than
        :data:`ADJOINT_RTOL` times its largest entry; None if that does not happen in ``max_iter``
        iterations. ``engine`` is ``"torch"`` or ``"numba"`` (:data:`ENGINES`).
        """
        rtol = ADJOINT_RTOL[g_y.dtype]
        if engine == "numba":
            V = torch.stack([g_y, g_a, self.two_ay, self.G, self.y2, self.P_over_2s])
            lam, stats.adjoint_iterations, converged = fused_anderson(
                ADJOINT, torch.stack([g_y, g_a]), self.W, self.W_r, V, rtol=rtol, max_iter=max_iter
            )
            return (lam[0], lam[1]) if converged else None
        n, g = g_y.shape[-1], torch.cat([g_y, g_a], -1)

        def adjoint_step(lam: torch.Tensor) -> torch.Tensor:
            m, l = self.through_a(lam[:, :n], lam[:, n:])
            return g + torch.cat([(l * self.G) @ self.W_r, m * self.y2 - l * self.P_over_2s], -1)

        lam, stats.adjoint_iterations, converged = anderson(adjoint_step, g, _moved_little(rtol), max_iter=max_iter)
        return (lam[:, :n], lam[:, n:]) if converged else None


class _Adjoint:
    """The backward pass of :class:`_ImplicitFixedPoint` through Algorithm 1 at a fixed point ``(y, a)``, written out.

    Algorithm 1 is a fixed-point iteration on the modulators alone: ``a <- Phi(a) =
    (sigma b0)^2 + W (a Y(a)^2)`` with ``Y(a) = (I - diag(1 - sqrt(a)) W_r)^{-1} (b z)``, and
    ``y = Y(a)``; the implicit function theorem gives, with ``g_y = dL/dy``, ``g_a = dL/da``,

        dL/dtheta = g_y dY/dtheta + w dPhi/dtheta,    w (I - dPhi/da) = g_y dY/da + g_a,

    with the partial derivatives at fixed ``a``, found by the adjoint iteration
    ``w <- v + w dPhi/da`` (each step a triangular solve with the LU factors of
    ``I - diag(1 - sqrt(a)) W_r``; autograd through the solve would form an n x n matrix per
    sample at every step).

    ``M = I - diag(1 - sqrt(a)) W_r`` is factorised once; ``Y(a) = M^{-1} (b z)`` has
    ``dY/da = -M^{-1} diag(h)`` with ``h = (W_r y) / (2 sqrt(a))``.
    """

    def __init__(self, y: torch.Tensor, a: torch.Tensor, W: torch.Tensor, W_r: torch.Tensor) -> None:
        self.y, self.a, self.W = y, a, W
        s = a.sqrt()
        self.gate = 1 - s
        eye = torch.eye(W_r.shape[-1], dtype=a.dtype, device=a.device)
        self.LU, self.pivots = torch.linalg.lu_factor(eye - self.gate[..., :, None] * W_r)
        self.h = (y @ W_r.T) / (2 * s)

    def solve_transposed(self, v: torch.Tensor) -> torch.Tensor:
        """``M^{-T} v`` for a batch of vectors (B, n)."""
        return torch.linalg.lu_solve(self.LU, self.pivots, v[..., None], adjoint=True)[..., 0]

    def through_Y(self, u: torch.Tensor) -> torch.Tensor:
        """The row vector ``u dY/da``."""
        return -self.solve_transposed(u) * self.h

    def through_Phi(self, w: torch.Tensor) -> torch.Tensor:
        """``w dPhi/da = (w W) diag(y^2) + ((w W) diag(2 a y)) dY/da``."""
        wW = w @ self.W
        return wW * self.y**2 + self.through_Y(wW * 2 * self.a * self.y)

    def iterate(self, g_y: torch.Tensor, g_a: torch.Tensor, max_iter: int, stats: SolveStats) -> torch.Tensor | None:
        """``w`` with ``w (I - dPhi/da) = g_y dY/da + g_a`` by ``w <- v + w dPhi/da``; None if it does not converge.

        Anderson-accelerated and stopped as :meth:`_SweepAdjoint.iterate` is.
        """
        v = self.through_Y(g_y) + g_a
        w, stats.adjoint_iterations, converged = anderson(
            lambda w: v + self.through_Phi(w), v, _moved_little(ADJOINT_RTOL[self.a.dtype]), max_iter=max_iter
        )
        return w if converged else None

    def parameter_gradients(
        self,
        g_y: torch.Tensor,
        w: torch.Tensor,
        z: torch.Tensor,
        b: torch.Tensor,
        b0: torch.Tensor,
        sigma: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """``g_y dY/dtheta + w dPhi/dtheta`` at fixed ``a`` for theta = (z, b, b0, sigma, W, W_r).

        ``Phi = (sigma b0)^2 + W (a Y^2)`` reaches ``Y`` too, so ``Y`` receives
        ``g = g_y + (w W) 2 a y``; ``u = M^{-T} g`` reaches ``b z`` (:func:`_parameter_gradients`).
        """
        y, a = self.y, self.a
        u = self.solve_transposed(g_y + (w @ self.W) * 2 * a * y)
        return _parameter_gradients(u, w, y, a, self.gate, z, b, b0, sigma)


def _parameter_gradients(
    u: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    gate: torch.Tensor,
    z: torch.Tensor,
    b: torch.Tensor,
    b0: torch.Tensor,
    sigma: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The gradients for theta = (z, b, b0, sigma, W, W_r) of a loss that reaches the parameters through
    ``y = b z + (1 - sqrt(a)) W_r y`` with the row vector ``u`` and through ``a = (sigma b0)^2 + W (a y^2)`` with
    ``w`` (``gate = 1 - sqrt(a)``), at fixed ``(y, a)``::

        d(b z) = u,     d(sigma b0)^2 = w,     dW_r = sum_batch (u gate) y^T,     dW = sum_batch w (a y^2)^T

    Parameters shared by the batch ((n,) rather than (B, n)) get their gradients summed over it.
    """
    g_z, g_b = u * b, u * z
    g_b0, g_sigma = w * 2 * sigma**2 * b0, w * 2 * sigma * b0**2
    return (
        g_z,
        g_b.sum(0) if b.dim() == 1 else g_b,
        g_b0.sum(0) if b0.dim() == 1 else g_b0,
        g_sigma.sum(0) if sigma.dim() == 1 else g_sigma,
        w.mT @ (a * y**2),
        (u * gate).mT @ y,
    )


def _full_adjoint_gradients(y, a, theta, g_y, g_a):  # noqa: ANN001, ANN202
    """The fallback: ``lam`` from ``(dF/ds)^T lam = -dL/ds`` with the drift's full 2n x 2n Jacobian (unit
    time constants), and ``lam^T dF/dtheta`` by autograd through one evaluation of the drift."""
    one, n = y.new_ones(()), y.shape[-1]
    J = jacobian(CircuitTensors(theta[1], theta[2], theta[3], one, one, theta[4], theta[5], False), y, a)
    lam = torch.linalg.solve(J.transpose(-1, -2), -torch.cat([g_y, g_a], -1)[..., None])[..., 0]
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in theta]
        z, b, b0, sigma, W, W_r = inputs
        F_y, F_a = drift(y, a, z, CircuitTensors(b, b0, sigma, one, one, W, W_r, False))
        return torch.autograd.grad((F_y, F_a), inputs, (lam[..., :n], lam[..., n:]), allow_unused=True)


def implicit_fixed_point(
    z: torch.Tensor, p: CircuitTensors, *, tol: float | None = None, max_iter: int = 200, engine: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, SolveStats]:
    """The fixed point by :func:`solve_fixed_point`, differentiable by the implicit function theorem.

    Same point as :func:`unrolled_fixed_point` run to convergence, with exact gradients (up to
    the convergence tolerance) at the cost of a few vector-Jacobian products of one sweep
    (:func:`sweep_update`) in the backward pass instead of backpropagation through every
    iteration (``_ImplicitFixedPoint``). Returns ``y``, ``a`` and the :class:`SolveStats` of the
    solve (its adjoint fields are filled in by the backward pass). ``engine`` (:data:`ENGINES`) runs the sweeps
    and their adjoint. First derivatives only: a backward pass with ``create_graph=True`` raises
    ``RuntimeError`` (the unrolled gradient supports higher derivatives).
    """
    stats: list[SolveStats] = []
    y, a = _ImplicitFixedPoint.apply(z, p.b, p.b0, p.sigma, p.W, p.W_r, tol, max_iter, engine, stats)
    return y, a, stats[0]


def fixed_point_residual(state: CircuitState) -> torch.Tensor:
    """Absolute residual (max-norm of the drift) at a layer's state, per sample (B,)."""
    return absolute_residual(state.y, state.a, state.z, state.p)


RECURRENCES = ("identity", "learned", "unit_sn")
GRADIENTS = ("unrolled", "implicit")


@dataclass(frozen=True)
class LayerOptions:
    """How a :class:`CircuitLayer` is parametrised (the defaults are this package's first layer).

    Attributes
    ----------
    recurrence : {"identity", "learned", "unit_sn"}
        ``W_r = I`` (closed-form DN fixed point); ``W_r = V / max(1, sigma_max(V))`` (largest
        singular value at most 1); or ``W_r = V / sigma_max(V)`` (exactly 1, the constraint of the
        paper's Fig. 5). ``V`` starts at I.
    gradient : {"unrolled", "implicit"}
        For a learned ``W_r``: backpropagate through ``iterations`` unrolled steps of Algorithm 1
        (:func:`unrolled_fixed_point`), or iterate to convergence without a graph and
        differentiate implicitly (:func:`implicit_fixed_point`).
    iterations : int
        Unrolled iterations (``gradient="unrolled"``); the implicit solve iterates until
        converged (at most ``max_iter``).
    sigma : float
        Initial (or fixed) semi-saturation constant.
    learn_sigma : bool
        Whether ``sigma = exp(log_sigma)`` is learned.
    normalization : {"pooling", "exp_uniform"}
        ``log_W = -log n`` (``W = 1/n``), or ``log_W ~ U(-1, 0)`` off the diagonal and 0 on it.
    gain_bias : bool
        Whether ``b = sigmoid(W_bx x + c_b)`` has the bias ``c_b`` (else ``b = sigmoid(W_bx x)``).
    gain_init : {"uniform", "normal"}
        ``W_bx`` uniform in ``+-1/sqrt(fan_in)`` (PyTorch's default) or ``N(0, 1)``.
    output : {"y", "relu_squared"}
        The layer's output: the fixed point ``y_s`` or the firing rate ``relu(y_s)^2``.
    max_iter : int
        Iterations the implicit solve may take before it raises ``ConvergenceError``.
    engine : {"auto", "torch", "numba"}
        Implementation of the implicit solve's sweeps and of their adjoint (:data:`ENGINES`).
    """

    recurrence: str = "learned"
    gradient: str = "unrolled"
    iterations: int = 15
    sigma: float = 0.1
    learn_sigma: bool = True
    normalization: str = "pooling"
    gain_bias: bool = True
    gain_init: str = "uniform"
    output: str = "y"
    max_iter: int = 200
    engine: str = "auto"

    def __post_init__(self) -> None:
        check_choices(
            self,
            dict(
                recurrence=RECURRENCES,
                gradient=GRADIENTS,
                normalization=NORMALIZATIONS,
                gain_init=("uniform", "normal"),
                output=("y", "relu_squared"),
                engine=ENGINES,
            ),
        )
        check_count("iterations", self.iterations, 0)
        check_count("max_iter", self.max_iter)
        check_positive("sigma", self.sigma)


LAYER_PRESETS = {
    "original": LayerOptions(),
    "paper": LayerOptions(
        recurrence="unit_sn",
        gradient="implicit",
        sigma=1.0,
        learn_sigma=False,
        normalization="exp_uniform",
        gain_bias=False,
        gain_init="normal",
        output="relu_squared",
    ),
}
"""Named layer configurations, this package's first layer and the paper-era layer (spec section 3.2)."""


class CircuitLayer(nn.Module):
    """A layer whose output is the fixed point ``y_s`` of an n-dimensional ORGaNICs circuit (or ``relu(y_s)^2``).

    Parameters
    ----------
    input_size : int
        Input dimension.
    hidden_size : int
        Number n of principal neurons (the circuit has 2n state variables).
    preset : {"original", "paper"}
        :data:`LAYER_PRESETS` entry the options start from.
    tau_y, tau_a : float
        Time constants (ms) of the circuit, used only for its Jacobian.
    **options
        Any :class:`LayerOptions` field, overriding the preset's.

    Attributes
    ----------
    last_solve : SolveStats or None
        Iterations and residual of the last implicit solve (``gradient="implicit"``).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        preset: str = "original",
        tau_y: float = 2.0,
        tau_a: float = 2.0,
        **options: Any,
    ) -> None:
        super().__init__()
        check_choice("preset", preset, tuple(LAYER_PRESETS))
        unknown = sorted(set(options) - {f.name for f in fields(LayerOptions)})
        if unknown:
            raise ValueError(f"unknown layer options {unknown}; options are {[f.name for f in fields(LayerOptions)]}")
        self.options = opt = replace(LAYER_PRESETS[preset], **options)
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            check_count(name, value)
        n = hidden_size
        for name, value in (("tau_y", tau_y), ("tau_a", tau_a)):
            check_positive(name, value)
        self.W_zx = nn.Linear(input_size, n, bias=False)
        self.W_bx = nn.Linear(input_size, n, bias=opt.gain_bias)
        if opt.gain_init == "normal":
            nn.init.normal_(self.W_bx.weight)
        self.b0_logit = nn.Parameter(torch.zeros(n))
        register(self, "log_sigma", torch.full((n,), math.log(opt.sigma)), learned=opt.learn_sigma)
        self.log_W = nn.Parameter(initial_log_W(n, opt.normalization))
        self.V_r = nn.Parameter(torch.eye(n)) if opt.recurrence != "identity" else None
        self.register_buffer("tau_y", torch.full((n,), float(tau_y)))
        self.register_buffer("tau_a", torch.full((n,), float(tau_a)))
        self.last_solve: SolveStats | None = None

    @property
    def recurrence(self) -> str:
        """``"identity"``, ``"learned"`` or ``"unit_sn"`` (``LayerOptions.recurrence``)."""
        return self.options.recurrence

    @property
    def iterations(self) -> int:
        """Unrolled Algorithm 1 iterations of the forward pass (``LayerOptions.iterations``)."""
        return self.options.iterations

    @iterations.setter
    def iterations(self, value: int) -> None:
        self.options = replace(self.options, iterations=value)

    @property
    def W_r(self) -> torch.Tensor:
        """Recurrent weights (the identity, ``V_r / max(1, ||V_r||_2)`` or ``V_r / ||V_r||_2``)."""
        if self.V_r is None:
            return torch.eye(self.log_W.shape[0], dtype=self.log_W.dtype, device=self.log_W.device)
        if self.recurrence == "unit_sn":
            return self.V_r / torch.linalg.matrix_norm(self.V_r, ord=2)
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

        With ``W_r = I`` the closed form is exact; with a learned ``W_r`` Algorithm 1 runs
        ``iterations`` unrolled steps (default :attr:`iterations`), or to convergence with
        ``gradient="implicit"`` (then ``iterations`` is ignored).
        """
        z, p = self.circuit(x)
        if self.V_r is None:
            y, a = dn_fixed_point(z, p.b, p.b0, p.sigma, p.W)
        elif self.options.gradient == "implicit":
            y, a, self.last_solve = implicit_fixed_point(
                z, p, max_iter=self.options.max_iter, engine=self.options.engine
            )
        else:
            y, a = unrolled_fixed_point(z, p, self.iterations if iterations is None else iterations)
        return CircuitState(y, a, z, p)

    def output(self, state: CircuitState) -> torch.Tensor:
        """What the layer passes on from its fixed point: ``y_s`` or ``relu(y_s)^2`` (``LayerOptions.output``)."""
        return torch.relu(state.y) ** 2 if self.options.output == "relu_squared" else state.y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output (B, n) for ``x`` (B, input_size)."""
        return self.output(self.fixed_point(x))


FRONT_END = (784, 360, 120, 40)
"""Layer sizes of the paper-era autoencoder front end (encoder; the decoder mirrors it)."""


class Autoencoder(nn.Module):
    """The paper-era front end: encoder 784-360-120-40 (ReLU, ReLU, sigmoid code), decoder mirrored (sigmoid output).

    ``forward(x)`` returns the code; ``reconstruction_loss`` holds the mean squared error of
    the last batch's reconstruction, which the classifier adds to its loss (weight 1).
    """

    def __init__(self, sizes: Sequence[int] = FRONT_END) -> None:
        super().__init__()
        encoder: list[nn.Module] = []
        decoder: list[nn.Module] = []
        for i, o in pairwise(sizes):
            encoder += [nn.Linear(i, o), nn.ReLU()]
        for i, o in pairwise(sizes[::-1]):
            decoder += [nn.Linear(i, o), nn.ReLU()]
        encoder[-1], decoder[-1] = nn.Sigmoid(), nn.Sigmoid()
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)
        self.reconstruction_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The code (B, 40) of images ``x`` (B, 784); sets ``reconstruction_loss``."""
        code = self.encoder(x)
        self.reconstruction_loss = F.mse_loss(self.decoder(code), x)
        return code


class StaticORGaNICs(nn.Module):
    """Stacked circuit layers and a linear readout: ``logits = W_o h^(L) + c_o``, optionally on an autoencoder's code.

    Parameters
    ----------
    input_size : int
        Input dimension (784 for MNIST).
    hidden_sizes : sequence of int
        Neurons per circuit layer (the first runs: 128 and 64; the paper's rows: 50, 80, or 120 and 60).
    num_classes : int
        Number of logits.
    front_end : {"none", "autoencoder"}
        Feed the circuit layers the images, or the 40-dim code of ``Autoencoder`` (whose
        reconstruction error is then :attr:`auxiliary_loss`).
    **layer_kwargs
        Passed to every :class:`CircuitLayer` (``preset`` and any :class:`LayerOptions` field).
    """

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (128, 64),
        num_classes: int = 10,
        front_end: str = "none",
        **layer_kwargs: Any,
    ) -> None:
        super().__init__()
        if len(hidden_sizes) == 0:
            raise ValueError("hidden_sizes must list at least one layer size")
        check_choice("front_end", front_end, ("none", "autoencoder"))
        if front_end == "autoencoder" and input_size != FRONT_END[0]:
            raise ValueError(f"input_size must be {FRONT_END[0]} with the autoencoder front end, got {input_size}")
        self.front_end = Autoencoder() if front_end == "autoencoder" else None
        sizes = [FRONT_END[-1] if self.front_end else input_size, *hidden_sizes]
        self.layers = nn.ModuleList(CircuitLayer(i, o, **layer_kwargs) for i, o in pairwise(sizes))
        self.readout = nn.Linear(sizes[-1], num_classes)

    @property
    def auxiliary_loss(self) -> torch.Tensor | None:
        """The front end's reconstruction loss of the last batch (added to the classification loss), if any."""
        return None if self.front_end is None else self.front_end.reconstruction_loss

    def fixed_points(self, x: torch.Tensor, iterations: int | None = None) -> list[CircuitState]:
        """Each layer's circuit state for a batch; layer k+1 is driven by layer k's output."""
        states = []
        h = x if self.front_end is None else self.front_end(x)
        for layer in self.layers:
            states.append(layer.fixed_point(h, iterations))
            h = layer.output(states[-1])
        return states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for a batch of flat images ``x`` (B, input_size)."""
        h = x if self.front_end is None else self.front_end(x)
        for layer in self.layers:
            h = layer(h)
        return self.readout(h)
