"""Local stability of the circuit: Jacobian, spectrum and random admissible circuits.

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
from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from .model import Circuit, drift

__all__ = [
    "StabilityReport",
    "SampledCircuit",
    "jacobian",
    "jacobian_autograd",
    "spectrum",
    "spectral_abscissa",
    "loop_gain",
    "classify",
    "analyze",
    "sample_circuit",
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


def jacobian(circuit: Circuit, y: ArrayLike, a: ArrayLike) -> NDArray:
    """Analytic Jacobian of ``d[y, a]/dt`` with respect to ``[y, a]`` (float64).

    Parameters
    ----------
    circuit : Circuit
        Main or rectified model with any ``W_r``.
    y, a : array_like, shape (..., n)
        State(s) at which to evaluate; ``a > 0``. Leading dimensions are batch dimensions.

    Returns
    -------
    ndarray, shape (..., 2n, 2n)
        The block matrix given in the module docstring, rows/columns ordered ``[y, a]``.
        The input drive ``z`` enters the drift additively and does not appear.
    """
    y, a = _state(circuit, y, a)
    if circuit.rectified:
        r, dr = np.maximum(y, 0.0), (y > 0).astype(np.float64)
    else:
        r, dr = y, np.ones_like(y)
    s = np.sqrt(a)
    eye = np.eye(circuit.n)
    inv_tau_y = (1.0 / circuit.tau_y)[:, None]
    inv_tau_a = (1.0 / circuit.tau_a)[:, None]
    J_yy = (-eye + (1 - s)[..., :, None] * circuit.W_r * dr[..., None, :]) * inv_tau_y
    J_ya = eye * (-(r @ circuit.W_r.T) / (2 * s))[..., None, :] * inv_tau_y
    J_ay = circuit.W * (2 * a * r * dr)[..., None, :] * inv_tau_a
    J_aa = (-eye + circuit.W * (r**2)[..., None, :]) * inv_tau_a
    top = np.concatenate([J_yy, J_ya], axis=-1)
    bottom = np.concatenate([J_ay, J_aa], axis=-1)
    return np.concatenate([top, bottom], axis=-2)


def jacobian_autograd(circuit: Circuit, y: ArrayLike, a: ArrayLike) -> NDArray:
    """Jacobian of :func:`organics.model.drift` by :func:`torch.autograd.functional.jacobian` (float64).

    An independent check of :func:`jacobian`: differentiates the model's own drift.

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


def spectral_abscissa(J: ArrayLike) -> NDArray | float:
    """Largest real part ``max_k Re lambda_k(J)`` of the eigenvalues of ``J`` (shape (..., m, m))."""
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
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
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


@dataclass(frozen=True)
class SampledCircuit:
    """A random circuit and input drive drawn by :func:`sample_circuit`."""

    circuit: Circuit
    z: NDArray


def _log_uniform(rng: np.random.Generator, low: float, high: float, size: int | None = None) -> NDArray | float:
    return 10 ** rng.uniform(np.log10(low), np.log10(high), size)


def sample_circuit(
    rng: np.random.Generator,
    n: int | None = None,
    *,
    n_max: int = 30,
    rectified: bool = False,
    recurrent_norm: float | None = None,
) -> SampledCircuit:
    """Draw an admissible circuit and input drive with parameters spread over many decades.

    Distributions (``U`` uniform, ``LU`` log-uniform; "per neuron or shared" is a coin flip):

    - ``n``: LU integer in ``[1, n_max]`` unless given;
    - ``tau_y ~ LU[0.1, 10]`` ms, ``tau_a = tau_y * LU[1e-3, 1e3]`` (per neuron or shared);
    - ``b ~ U(0, 1]``, ``b0 ~ LU[1e-2, 10]``, ``sigma ~ LU[1e-3, 10]`` (per neuron or shared);
    - ``W = scale * U[0, 1]`` entrywise, ``scale ~ LU[1e-2, 1e2] / n``, dense or with a random
      sparsity mask (density ``U[0, 1]``, so rows of zeros occur);
    - ``z = LU[1e-2, 1e2] * N(0, I)``, made nonnegative with probability 1/2;
    - ``W_r = I`` if ``recurrent_norm`` is None, else a Gaussian matrix rescaled to have
      largest singular value ``recurrent_norm``.

    Parameters
    ----------
    rng : numpy.random.Generator
    n : int, optional
        Dimension (number of y neurons); drawn if omitted.
    n_max : int
        Largest dimension drawn when ``n`` is omitted.
    rectified : bool
        Main (False) or rectified (True) model.
    recurrent_norm : float, optional
        Largest singular value of a random ``W_r``; ``W_r = I`` if omitted.
    """
    if n is None:
        if n_max < 1:
            raise ValueError(f"n_max must be >= 1, got {n_max}")
        n = int(np.floor(_log_uniform(rng, 1, n_max + 1)))
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if recurrent_norm is not None and not recurrent_norm > 0:
        raise ValueError(f"recurrent_norm must be > 0, got {recurrent_norm}")

    def maybe_per_neuron() -> int | None:
        return n if rng.random() < 0.5 else None

    tau_y = _log_uniform(rng, 0.1, 10, maybe_per_neuron())
    tau_a = tau_y * _log_uniform(rng, 1e-3, 1e3, maybe_per_neuron())
    b = 1 - rng.uniform(0, 1, maybe_per_neuron())
    b0 = _log_uniform(rng, 1e-2, 10, maybe_per_neuron())
    sigma = _log_uniform(rng, 1e-3, 10, maybe_per_neuron())
    W = _log_uniform(rng, 1e-2, 1e2) / n * rng.uniform(0, 1, (n, n))
    if rng.random() < 0.5:
        W = W * (rng.uniform(0, 1, (n, n)) < rng.uniform(0, 1))
    z = _log_uniform(rng, 1e-2, 1e2) * rng.standard_normal(n)
    if rng.random() < 0.5:
        z = np.abs(z)
    W_r = None
    if recurrent_norm is not None:
        W_r = rng.standard_normal((n, n))
        W_r *= recurrent_norm / np.linalg.norm(W_r, 2)
    circuit = Circuit(W, b=b, b0=b0, sigma=sigma, tau_y=tau_y, tau_a=tau_a, W_r=W_r, rectified=rectified)
    return SampledCircuit(circuit, z)
