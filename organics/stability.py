"""Local stability of the circuit: its Jacobian and spectrum.

The Jacobian of ``d[y, a]/dt`` at a state with ``a > 0`` (elementwise products, ``r(y) = y``
for the main model and ``r(y) = y+`` for the rectified one, ``r'`` its derivative, taken
as 0 at ``y = 0`` like :func:`torch.clamp`)::

    d(dy/dt)/dy = (-I + diag(1 - sqrt(a)) W_r diag(r'(y))) / tau_y
    d(dy/dt)/da = -diag((W_r r(y)) / (2 sqrt(a))) / tau_y
    d(da/dt)/dy = W diag(2 a r(y) r'(y)) / tau_a
    d(da/dt)/da = (-I + W diag(r(y)^2)) / tau_a

(row i divided by ``tau_y[i]`` or ``tau_a[i]``). For ``W_r = I`` at the divisive-normalization
fixed point of the main model this is the block matrix
``[[-diag(sqrt(a)/tau_y), -diag(y/(2 sqrt(a) tau_y))], [W diag(2 a y)/tau_a, (-I + W diag(y^2))/tau_a]]``.
Every fixed point has ``a >= (sigma b0)^2 > 0``, so the square root is differentiable there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from ._checks import check_nonnegative
from .circuit import Circuit, CircuitTensors, drift, relu

__all__ = [
    "StabilityReport",
    "jacobian",
    "jacobian_autograd",
    "spectrum",
    "spectral_abscissa",
    "loop_gain",
    "classify",
    "analyze",
]

Label = Literal["stable", "unstable", "marginal"]


def _state(circuit: Circuit, y: ArrayLike, a: ArrayLike) -> tuple[NDArray, NDArray]:
    y = np.asarray(y, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    if y.ndim == 0 or y.shape[-1] != circuit.n:
        raise ValueError(f"y must have shape (..., {circuit.n}), got shape {y.shape}")
    if a.shape != y.shape:
        raise ValueError(f"a must have the shape of y {y.shape}, got shape {a.shape}")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(a))):
        raise ValueError("y and a must be finite (no NaN or inf)")
    if np.any(a <= 0):
        raise ValueError(f"a must be > 0 (sqrt(a+) is not differentiable at a = 0), got min {a.min():g}")
    return y, a


def jacobian(p: Circuit | CircuitTensors, y: Any, a: Any) -> Any:
    """Analytic Jacobian of ``d[y, a]/dt`` with respect to ``[y, a]``: the one implementation.

    Parameters
    ----------
    p : Circuit or CircuitTensors
        Main or rectified model with any ``W_r``: a :class:`~organics.circuit.Circuit` for
        NumPy states, its tensors (e.g. a trained layer's or cell's circuit) for torch states.
        Only ``W``, ``W_r``, ``tau_y``, ``tau_a`` and ``rectified`` enter: the gains ``b, b0``,
        ``sigma`` and the drive ``z`` enter the drift additively or through constants.
    y, a : array_like or torch.Tensor, shape (..., n)
        State(s) at which to evaluate; ``a > 0``. Leading dimensions are batch dimensions
        (e.g. samples, or samples and time steps).

    Returns
    -------
    ndarray (float64) or torch.Tensor (dtype of ``y``), shape (..., 2n, 2n)
        The block matrix given in the module docstring, rows/columns ordered ``[y, a]``.
    """
    if isinstance(y, torch.Tensor):
        n = y.shape[-1]
        J = y.new_zeros(*y.shape[:-1], 2 * n, 2 * n)
        inv_tau_y, inv_tau_a = ((1 / tau).expand(n) for tau in (p.tau_y, p.tau_a))
        r, dr, s = relu(y) if p.rectified else y, (y > 0).to(y.dtype) if p.rectified else torch.ones_like(y), a.sqrt()
    else:
        y, a = _state(p, y, a)
        n = p.n
        J = np.zeros((*y.shape[:-1], 2 * n, 2 * n))
        inv_tau_y, inv_tau_a = 1 / p.tau_y, 1 / p.tau_a
        r, dr, s = relu(y) if p.rectified else y, (y > 0) * 1.0 if p.rectified else np.ones_like(y), np.sqrt(a)
    # blocks written in place (a batch of 2n x 2n matrices is built without temporaries of its size)
    J[..., :n, :n] = ((1 - s) * inv_tau_y)[..., :, None] * p.W_r * dr[..., None, :]
    J[..., n:, :n] = p.W * inv_tau_a[:, None] * (2 * a * r * dr)[..., None, :]
    J[..., n:, n:] = p.W * inv_tau_a[:, None] * (r**2)[..., None, :]
    _diagonal(J[..., :n, :n])[...] -= inv_tau_y
    _diagonal(J[..., :n, n:])[...] = -(r @ p.W_r.T) / (2 * s) * inv_tau_y
    _diagonal(J[..., n:, n:])[...] -= inv_tau_a
    return J


def _diagonal(M: Any) -> Any:
    """A writable view of the diagonals of a batch of square matrices (NumPy or torch)."""
    if isinstance(M, torch.Tensor):
        return M.diagonal(dim1=-2, dim2=-1)
    return np.einsum("...ii->...i", M)


def jacobian_autograd(circuit: Circuit, y: ArrayLike, a: ArrayLike) -> NDArray:
    """Jacobian of :func:`organics.circuit.drift` by :func:`torch.autograd.functional.jacobian` (float64).

    The oracle that tests and chapter 2 check :func:`jacobian` against: it differentiates the
    circuit's own drift instead of a formula.

    Parameters
    ----------
    circuit : Circuit
    y, a : array_like, shape (n,)
        One state with ``a > 0``.

    Returns
    -------
    ndarray, shape (2n, 2n)
    """
    y, a = _state(circuit, y, a)
    if y.ndim != 1:
        raise ValueError(f"y must have shape ({circuit.n},) for jacobian_autograd, got shape {y.shape}")
    p = circuit.tensors(torch.float64)
    z = torch.zeros(circuit.n, dtype=torch.float64)
    n = circuit.n

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.cat(drift(x[:n], x[n:], z, p))

    x = torch.as_tensor(np.concatenate([y, a]), dtype=torch.float64)
    return torch.autograd.functional.jacobian(f, x).numpy()


def spectrum(J: ArrayLike) -> NDArray:
    """Eigenvalues of ``J`` (shape (..., m, m)), sorted by decreasing real part."""
    lam = np.linalg.eigvals(np.asarray(J, dtype=np.float64))
    order = np.argsort(-lam.real, axis=-1)
    return np.take_along_axis(lam, order, axis=-1)


def spectral_abscissa(J: Any) -> Any:
    """Largest real part ``max_k Re lambda_k(J)`` of the eigenvalues of ``J`` (shape (..., m, m)).

    A float for one NumPy matrix, an array for a NumPy batch, a tensor for torch input.
    """
    if isinstance(J, torch.Tensor):
        return torch.linalg.eigvals(J).real.amax(-1)
    alpha = np.linalg.eigvals(np.asarray(J, dtype=np.float64)).real.max(axis=-1)
    return float(alpha) if np.ndim(alpha) == 0 else alpha


def loop_gain(circuit: Circuit, y: ArrayLike) -> float:
    """Spectral radius ``rho(W diag(r(y)^2))`` of the normalization loop at ``y``.

    At a fixed point ``a > 0`` solves ``(I - W diag(r(y)^2)) a = (sigma b0)^2 > 0``, so by the
    Collatz-Wielandt bound for the nonnegative matrix ``W diag(r(y)^2)`` this is ``< 1``;
    it is the quantity the stability proof for ``W_r = I`` rests on.
    """
    y = np.asarray(y, dtype=np.float64)
    if y.shape != (circuit.n,):
        raise ValueError(f"y must have shape ({circuit.n},), got shape {y.shape}")
    r = np.maximum(y, 0.0) if circuit.rectified else y
    return float(np.abs(np.linalg.eigvals(circuit.W * (r**2)[None, :])).max())


@dataclass(frozen=True)
class StabilityReport:
    """Linear stability of a state.

    Attributes
    ----------
    label : {"stable", "unstable", "marginal"}
        ``"marginal"`` when ``|margin| <= tol``: the sign is below the resolution asked for.
    abscissa : float
        Spectral abscissa ``max Re lambda`` (1/ms when the time constants are in ms).
    margin : float
        ``abscissa * min(tau_y, tau_a)``: the abscissa in units of the fastest time constant.
    eigenvalues : ndarray, shape (2n,)
        Sorted by decreasing real part.
    """

    label: Label
    abscissa: float
    margin: float
    eigenvalues: NDArray


def classify(margin: float, tol: float = 1e-10) -> Label:
    """``"stable"`` if ``margin < -tol``, ``"unstable"`` if ``margin > tol``, else ``"marginal"``."""
    check_nonnegative("tol", tol)
    if np.isnan(margin):
        raise ValueError("margin must be a number, got NaN")
    if margin < -tol:
        return "stable"
    if margin > tol:
        return "unstable"
    return "marginal"


def analyze(circuit: Circuit, y: ArrayLike, a: ArrayLike, *, tol: float = 1e-10) -> StabilityReport:
    """Eigenvalues of :func:`jacobian` at ``(y, a)`` and their classification by :func:`classify`.

    The margin is ``max Re lambda * tau_min`` with ``tau_min`` the fastest time constant of
    the circuit, so ``tol`` is dimensionless.
    """
    lam = spectrum(jacobian(circuit, y, a))
    if lam.ndim != 1:
        raise ValueError("analyze takes one state; use jacobian and spectral_abscissa for batches")
    tau_min = float(min(circuit.tau_y.min(), circuit.tau_a.min()))
    abscissa = float(lam[0].real)
    margin = abscissa * tau_min
    return StabilityReport(classify(margin, tol), abscissa, margin, lam)
